"""Run under torchrun: every rank reads its lanes with 2 loader workers, uninterrupted and with a
stop-and-resume at --stop, and rank 0 saves the global batches (lanes of all ranks, in rank order)."""

import argparse
import json

import numpy as np
import torch.distributed as dist

from stairscale.data.loader import LaneLoader, LoaderSpec


def take(loader, steps):
    batches = []
    for _, batch in zip(range(steps), loader):
        batches.append(np.stack([batch.tokens.numpy(), batch.doc_start.numpy(), batch.doc_id.numpy(), batch.targets.numpy()]))
    return batches


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--root")
    parser.add_argument("--split")
    parser.add_argument("--lanes", type=int)
    parser.add_argument("--segment", type=int)
    parser.add_argument("--chunk", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--stop", type=int)
    parser.add_argument("--resume-from", default="")
    parser.add_argument("--out")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    spec = LoaderSpec(args.root, args.split, args.lanes, args.segment, args.chunk, seed=7, shuffle=True)

    def loader():
        return LaneLoader(spec, dp_rank=rank, dp_size=world, workers=2, prefetch=2)

    if args.resume_from:  # continue a run that another layout stopped
        resumed = loader()
        resumed.load_state_dict(json.load(open(args.resume_from)))
        uninterrupted = take(resumed, args.steps)
        interrupted = uninterrupted
    else:
        uninterrupted = take(loader(), args.steps)
        first = loader()
        interrupted = take(first, args.stop)
        state = first.state_dict()
        second = loader()
        second.load_state_dict(state)
        interrupted += take(second, args.steps - args.stop)
    gathered = [None] * world
    dist.all_gather_object(gathered, {"uninterrupted": uninterrupted, "interrupted": interrupted})
    if rank == 0:
        out = {
            key: np.stack([np.concatenate([g[key][s] for g in gathered], axis=1) for s in range(len(uninterrupted))])
            for key in ("uninterrupted", "interrupted")
        }
        np.savez(args.out, **out)
        if not args.resume_from:
            json.dump(state, open(args.out + ".state.json", "w"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
