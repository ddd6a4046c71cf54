#!/usr/bin/env bash
# Train with torchrun on this node, or on several (run it on every node with the same MASTER_ADDR).
#   NPROC_PER_NODE=4 launch/torchrun.sh --config configs/parallel_tp2_pp2.yaml
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 launch/torchrun.sh --config ... --set train.steps=100
# The layout (parallel.tensor, parallel.pipeline, parallel.zero_stage) comes from the config;
# the data-parallel size is what is left of the world size.
set -euo pipefail
BIN=${BIN:-$(dirname "$0")/../.venv/bin}
exec "$BIN/python" -m torch.distributed.run \
    --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" --nproc_per_node="${NPROC_PER_NODE:-2}" \
    --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-29500}" \
    -m stairscale.cli train "$@"
