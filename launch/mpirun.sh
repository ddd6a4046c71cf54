#!/usr/bin/env bash
# Train under MPI: mpi4py gives each process its rank, rank 0 broadcasts the rendezvous address,
# and the torch backend (gloo on CPU, nccl on GPU) starts from there.
#   NP=4 launch/mpirun.sh --config configs/parallel_tp2_pp2.yaml
# Extra mpirun flags go in MPIRUN_ARGS: on two nodes of 8 GPUs with MPICH's hydra,
#   NP=16 MPIRUN_ARGS="-ppn 8 -hosts node0,node1" launch/mpirun.sh --config ...
# (-ppn 8 keeps ranks 0-7 on node0; without it hydra deals ranks to the hosts in turn, and every
# tensor-parallel pair would cross the network).
set -euo pipefail
BIN=${BIN:-$(dirname "$0")/../.venv/bin}
exec "$BIN/mpirun" -n "${NP:-2}" ${MPIRUN_ARGS:-} "$BIN/python" -m stairscale.cli train "$@"
