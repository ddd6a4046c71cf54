#!/usr/bin/env bash
# Train with the deepspeed launcher. On the hosts of HOSTFILE, as many processes per host as its
# slots (or NUM_GPUS per host if set); without a hostfile, NUM_GPUS processes here (default 2,
# also on CPU, where DeepSpeed would otherwise start one), on the first NUM_GPUS devices of
# CUDA_VISIBLE_DEVICES where it is set.
#   NUM_GPUS=2 launch/deepspeed.sh --config configs/parallel_dp2_zero3.yaml
#   HOSTFILE=hosts launch/deepspeed.sh --config configs/parallel_tp2_pp2.yaml
set -euo pipefail
BIN=${BIN:-$(dirname "$0")/../.venv/bin}
ARGS=()
if [[ -n "${HOSTFILE:-}" ]]; then
    # DeepSpeed's runner takes a missing hostfile for this host alone, and trains on it.
    [[ -r $HOSTFILE ]] || { echo "launch/deepspeed.sh: HOSTFILE=$HOSTFILE cannot be read" >&2; exit 2; }
    ARGS=(--hostfile "$HOSTFILE")
fi
if [[ ! ${NUM_GPUS:-2} =~ ^[1-9][0-9]*$ ]]; then
    echo "launch/deepspeed.sh: NUM_GPUS=$NUM_GPUS must be a process count such as 2" >&2
    exit 2
fi
if [[ -z "${HOSTFILE:-}" && -n "${CUDA_VISIBLE_DEVICES:-}" && ${DS_ACCELERATOR:-cuda} == cuda ]] && command -v nvidia-smi >/dev/null; then
    # Given --num_gpus, DeepSpeed drops CUDA_VISIBLE_DEVICES and counts from GPU 0: name the devices.
    if [[ ! $CUDA_VISIBLE_DEVICES =~ ^[0-9]+(,[0-9]+)*$ ]]; then
        echo "launch/deepspeed.sh: the deepspeed launcher selects GPUs by index, and CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES is not a list of indices (use launch/torchrun.sh)" >&2
        exit 2
    fi
    IFS=, read -ra VISIBLE <<< "$CUDA_VISIBLE_DEVICES"
    if (( ${#VISIBLE[@]} < ${NUM_GPUS:-2} )); then
        echo "launch/deepspeed.sh: NUM_GPUS=${NUM_GPUS:-2} but CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES names ${#VISIBLE[@]}" >&2
        exit 2
    fi
    DEVICES=$(IFS=,; echo "${VISIBLE[*]:0:${NUM_GPUS:-2}}")
    ARGS+=(--include "localhost:$DEVICES")
elif [[ -n "${NUM_GPUS:-}" || -z "${HOSTFILE:-}" ]]; then
    ARGS+=(--num_gpus "${NUM_GPUS:-2}")
fi
# The runner takes the first host's address from `hostname -I` there unless told; MASTER_ADDR tells it.
if [[ -n "${MASTER_ADDR:-}" ]]; then ARGS+=(--master_addr "$MASTER_ADDR"); fi
exec "$BIN/deepspeed" "${ARGS[@]}" --master_port "${MASTER_PORT:-29500}" \
    --no_local_rank --module stairscale.cli train "$@"
