#!/usr/bin/env bash
# The one prepared check for a lent GPU machine (docs/benchmarks.md, docs/reproducing.md):
#   1. `bench step` of the full reproduction's Staircase (fp32, as the reproduction trains): eager
#      at 512 lanes, and at 128 lanes eager against two torch.compile modes, measured in the same
#      run (a few minutes);
#   2. the full `reproduce tracking`, fitted to MINUTES, with the fastest mode of step 1.
# Usage: launch/gpu_check.sh [MINUTES] [OUT]   (default 6 minutes, $OUT or runs/gpu_check)
# Needs a CUDA device and the package importable with the machine's own torch: PYTHONPATH=. plus
# webdataset and tensorboard (`pip install -e .` would pull setup.cfg's pinned torch instead).
set -euo pipefail
minutes=${1:-6}
out=${2:-${OUT:-runs/gpu_check}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
bench_step="python -m stairscale.cli bench step --set train.precision=fp32"
$bench_step --set train.lanes=512 --steps 10 --warmup 3 --compile none | tee "$out/bench_step_512.txt"
$bench_step --set train.lanes=128 --steps 20 --warmup 10 --compile default,reduce-overhead | tee "$out/bench_step_128.txt"
fastest=$(awk '/^fastest:/ {print $2}' "$out/bench_step_128.txt")
python -m stairscale.cli reproduce tracking --fit-minutes "$minutes" --compile "$fastest" --out "$out/tracking" | tee "$out/tracking.txt"
