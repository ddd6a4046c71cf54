#!/usr/bin/env bash
# The one prepared check for a lent GPU machine, made to fit one 10-minute device command and to
# return at most 8 files (docs/benchmarks.md, docs/reproducing.md). Each step has its own time
# limit, and a step that fails or runs out costs only itself:
#   0. the machine: CUDA visible and the package importable (env.txt; stops here otherwise);
#   1. with PRECISION_CHECK=1 (DeepSpeed and megatron-core needed): DeepSpeed keeps the trainer's
#      bf16 autocast, the first step's loss of ZeRO-1 in one process being the plain bf16 run's;
#   2. `bench step` of the full reproduction's Staircase (32 lanes, fp32): eager against
#      torch.compile's default mode, measured in the same run;
#   3. the full `reproduce tracking`, fitted to the time left (calibration included), with the
#      faster mode of step 2.
# Usage: launch/gpu_check.sh [SECONDS] [OUT]   (default 560 seconds in all; OUT: $OUT, else
# runs/gpu_check). The runs go to WORK (default a new folder in /tmp); OUT gets env.txt,
# precision_check.txt, bench_step.txt, tracking.txt, table.md and report.json.
# Needs the package importable with the machine's own torch (PYTHONPATH=. and the wheels of
# webdataset and tensorboard; `pip install -e .` would pull setup.cfg's pinned torch instead).
# GPU_CHECK_CPU=1 lets it run without CUDA, to try the script itself on a CPU machine.
# PRECISION_CHECK=1 takes up to 270 s more: give SECONDS that much more (the device allows 600).
set -uo pipefail
budget=${1:-560}
deadline=$((SECONDS + budget))
out=${2:-${OUT:-runs/gpu_check}}
work=${WORK:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
mkdir -p "$out" "$work"
export PYTHONUNBUFFERED=1

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'sees a GPU:', torch.cuda.is_available())"
} > "$out/env.txt" 2>&1
python -c "import torch, stairscale.reproduce; import os; assert torch.cuda.is_available() or os.environ.get('GPU_CHECK_CPU'), 'no CUDA device'" \
  >> "$out/env.txt" 2>&1 || { cat "$out/env.txt"; echo "gpu_check: not a usable GPU machine (env.txt)"; exit 2; }

if [[ ${PRECISION_CHECK:-0} == 1 ]]; then
  for run in fp32 bf16 zero1_bf16; do
    precision=${run#zero1_}
    zero=$([[ $run == zero1_* ]] && echo 1 || echo 0)
    timeout 90 python -m stairscale.cli train --set train.steps=3 --set train.warmup_steps=1 --set train.eval_every=0 \
      --set task.eval_docs=4 --set train.precision="$precision" --set parallel.zero_stage="$zero" \
      --set run_dir="$work/precision/$run" > "$work/precision_$run.log" 2>&1 \
      || { echo "precision run $run failed or ran out of time:"; tail -5 "$work/precision_$run.log"; } >> "$out/precision_check.txt"
  done
  python - "$work/precision" >> "$out/precision_check.txt" 2>&1 <<'EOF'
import json, sys
first = {run: json.load(open(f"{sys.argv[1]}/{run}/results.json"))["steps"][0]["loss"] for run in ("fp32", "bf16", "zero1_bf16")}
ok = abs(first["zero1_bf16"] - first["bf16"]) < 0.1 * abs(first["fp32"] - first["bf16"])
print(f"first-step loss: fp32 {first['fp32']:.6f}, bf16 {first['bf16']:.6f}, ZeRO-1 bf16 {first['zero1_bf16']:.6f}:",
      "PASS, DeepSpeed keeps bf16 autocast" if ok else "FAIL, ZeRO-1 did not compute in bf16")
EOF
fi

timeout 150 python -m stairscale.cli bench step --set train.precision=fp32 --steps 20 --warmup 10 --compile default \
  > "$out/bench_step.txt" 2>&1 || echo "gpu_check: bench step failed or ran out of time" >> "$out/bench_step.txt"
fastest=$(awk '/^fastest:/ {print $2}' "$out/bench_step.txt")
fastest=${fastest:-none}

left=$((deadline - SECONDS))
if (( left < 120 )); then
  echo "gpu_check: $left s left, too few for the reproduction (give SECONDS more room)" | tee "$out/tracking.txt"
  exit 1
fi
minutes=$(python -c "print(round(($left - 20) / 60, 2))")  # 20 s for the table after the runs
echo "gpu_check: reproduce tracking with --compile $fastest, fitted to $minutes minutes" | tee "$out/tracking.txt"
timeout "$left" python -m stairscale.cli reproduce tracking --fit-minutes "$minutes" --compile "$fastest" \
  --out "$work/tracking" >> "$out/tracking.txt" 2>&1
echo "gpu_check: reproduce exited with $? after $((SECONDS - deadline + budget)) s" >> "$out/tracking.txt"
cp "$work/tracking/table.md" "$work/tracking/report.json" "$out/" 2>/dev/null || true
