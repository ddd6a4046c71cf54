#!/usr/bin/env bash
# Train with the deepspeed launcher: NUM_GPUS processes per node (also on CPU, where DeepSpeed
# would otherwise start one), on the hosts of HOSTFILE if given.
#   NUM_GPUS=2 launch/deepspeed.sh --config configs/parallel_dp2_zero3.yaml
set -euo pipefail
BIN=${BIN:-$(dirname "$0")/../.venv/bin}
HOSTS=()
if [[ -n "${HOSTFILE:-}" ]]; then HOSTS=(--hostfile "$HOSTFILE"); fi
exec "$BIN/deepspeed" "${HOSTS[@]}" --num_gpus "${NUM_GPUS:-2}" --master_port "${MASTER_PORT:-29500}" \
    --no_local_rank --module stairscale.cli train "$@"
