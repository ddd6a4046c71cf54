#!/usr/bin/env bash
# The one prepared check for a lent GPU machine (docs/benchmarks.md, docs/reproducing.md):
#   0. DeepSpeed keeps the trainer's bf16 autocast (docs/parallel.md, "Precision"): the first
#      step's loss of ZeRO-1 in one process must be the plain bf16 run's, not the fp32 run's;
#   1. `bench step` of the full reproduction's Staircase (its 32 lanes, fp32, as the reproduction
#      trains): eager against two torch.compile modes, measured in the same run, and eager at the
#      algorithmic runs' 128 lanes (a few minutes);
#   2. the full `reproduce tracking`, fitted to MINUTES, with the fastest mode of step 1.
# Usage: launch/gpu_check.sh [MINUTES] [OUT]   (default 6 minutes, $OUT or runs/gpu_check; an OUT
# that already holds a reproduction is refused at step 2, so give each call an empty one)
# Needs a CUDA device and the package importable with the machine's own torch: PYTHONPATH=. plus
# webdataset, tensorboard, deepspeed and megatron-core (step 0 runs ZeRO-1; `pip install -e .`
# would pull setup.cfg's pinned torch instead).
set -euo pipefail
minutes=${1:-6}
out=${2:-${OUT:-runs/gpu_check}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
for run in fp32 bf16 zero1_bf16; do
  precision=${run#zero1_}
  zero=$([[ $run == zero1_* ]] && echo 1 || echo 0)
  python -m stairscale.cli train --set train.steps=3 --set train.warmup_steps=1 --set train.eval_every=0 --set task.eval_docs=4 \
    --set train.precision="$precision" --set parallel.zero_stage="$zero" --set run_dir="$out/precision/$run" \
    > "$out/precision_$run.log" 2>&1 || echo "precision run $run failed: see $out/precision_$run.log"
done
python - "$out/precision" <<'EOF' 2>&1 | tee "$out/precision_check.txt" || true
import json, sys
first = {run: json.load(open(f"{sys.argv[1]}/{run}/results.json"))["steps"][0]["loss"] for run in ("fp32", "bf16", "zero1_bf16")}
ok = abs(first["zero1_bf16"] - first["bf16"]) < 0.1 * abs(first["fp32"] - first["bf16"])
print(f"first-step loss: fp32 {first['fp32']:.6f}, bf16 {first['bf16']:.6f}, ZeRO-1 bf16 {first['zero1_bf16']:.6f}:",
      "PASS, DeepSpeed keeps bf16 autocast" if ok else "FAIL, ZeRO-1 did not compute in bf16")
EOF
bench_step="python -m stairscale.cli bench step --set train.precision=fp32"
# A benchmark that fails must not cost the steps after it (one device session, one try).
$bench_step --steps 20 --warmup 10 --compile default,reduce-overhead 2>&1 | tee "$out/bench_step_32.txt" \
  || echo "bench at 32 lanes failed"
$bench_step --set train.lanes=128 --steps 10 --warmup 3 --compile none 2>&1 | tee "$out/bench_step_128.txt" || echo "bench at 128 lanes failed"
fastest=$(awk '/^fastest:/ {print $2}' "$out/bench_step_32.txt")
fastest=${fastest:-none}
python -m stairscale.cli reproduce tracking --fit-minutes "$minutes" --compile "$fastest" --out "$out/tracking" | tee "$out/tracking.txt"
