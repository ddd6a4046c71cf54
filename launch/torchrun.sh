#!/usr/bin/env bash
# Train with torchrun on this node, or on several (run it on every node with the same MASTER_ADDR).
#   NPROC_PER_NODE=4 launch/torchrun.sh --config configs/parallel_tp2_pp2.yaml
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 launch/torchrun.sh --config ... --set train.steps=2000
# The layout (parallel.tensor, parallel.pipeline, parallel.zero_stage) comes from the config;
# the data-parallel size is what is left of the world size. On one node without MASTER_PORT,
# torchrun picks a free port (--standalone), so two jobs on one node do not collide.
set -euo pipefail
BIN=${BIN:-$(dirname "$0")/../.venv/bin}
if [[ ! ${NNODES:-1} =~ ^[1-9][0-9]*$ ]]; then  # the static rendezvous waits for a fixed count
    echo "launch/torchrun.sh: NNODES=$NNODES must be a node count such as 2 (no elastic ranges)" >&2
    exit 2
fi
if [[ ${NNODES:-1} != 1 ]]; then  # several nodes
    if [[ -z ${MASTER_ADDR:-} || -z ${NODE_RANK:-} ]]; then
        echo "launch/torchrun.sh: NNODES=$NNODES needs MASTER_ADDR (the first node) and NODE_RANK (0 to NNODES-1) on every node" >&2
        exit 2
    fi
    if [[ ! $NODE_RANK =~ ^(0|[1-9][0-9]*)$ ]] || (( NODE_RANK >= NNODES )); then
        echo "launch/torchrun.sh: NODE_RANK=$NODE_RANK must be one of 0 to $((NNODES - 1)) (NNODES=$NNODES)" >&2
        exit 2
    fi
    RENDEZVOUS=(--nnodes="$NNODES" --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" --master_port="${MASTER_PORT:-29500}")
elif [[ -n ${MASTER_PORT:-} ]]; then
    RENDEZVOUS=(--nnodes=1 --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="$MASTER_PORT")
else
    RENDEZVOUS=(--standalone)
fi
exec "$BIN/python" -m torch.distributed.run "${RENDEZVOUS[@]}" --nproc_per_node="${NPROC_PER_NODE:-2}" \
    -m stairscale.cli train "$@"
