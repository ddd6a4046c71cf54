"""Measurement (not part of the package): how much a training loader's lanes hold in memory.

usage: python docs/experiments/loader_memory.py DATASET_DIR SPLIT [--lanes 32] [--segment 64] [--chunk 8]
Reads 200 batches of the split in this process (no workers) and prints how far the peak
resident memory grew, and how long the batches took. Run it on two checkouts one after the other
(`git worktree add /tmp/before COMMIT`, then `PYTHONPATH=/tmp/before python ...`) to compare them:
docs/data.md, "Why our own tar reader".
"""

import argparse
import resource
import time

from stairscale.data.loader import LaneLoader, LoaderSpec

parser = argparse.ArgumentParser()
parser.add_argument("root")
parser.add_argument("split")
parser.add_argument("--lanes", type=int, default=32)
parser.add_argument("--segment", type=int, default=64)
parser.add_argument("--chunk", type=int, default=8)
args = parser.parse_args()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
batches = iter(LaneLoader(LoaderSpec(args.root, args.split, args.lanes, args.segment, args.chunk, seed=0, shuffle=True)))
started = time.perf_counter()
for _ in range(200):
    next(batches)
took = time.perf_counter() - started
grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(f"peak RSS grew {grew:.0f} MB over 200 batches of {args.lanes} lanes x {args.segment} ({took:.2f} s)")
