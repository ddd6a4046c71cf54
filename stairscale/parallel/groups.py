"""Process groups, made in one place for every launcher.

torchrun and the deepspeed launcher set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; under srun
the rank and size come from SLURM_PROCID and SLURM_NTASKS (launch/slurm.sbatch sets MASTER_ADDR);
an MPI launch (mpirun) gives rank and size through mpi4py, and rank 0 broadcasts an address and a
free port. The torch backend is gloo on CPU and nccl on GPU; the
tensor, pipeline and data-parallel groups come from megatron-core's `parallel_state`
(rank order tp, dp, pp: the ranks of one tensor-parallel group are neighbours).
"""

from __future__ import annotations

import functools
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from stairscale.config import ParallelConfig, RunConfig
from stairscale.errors import ConfigError


@dataclass(frozen=True)
class Layout:
    """Where this process sits. A single process is Layout() with every size 1."""

    world: int = 1
    rank: int = 0
    tp: int = 1
    pp: int = 1
    dp: int = 1
    tp_rank: int = 0
    pp_rank: int = 0
    dp_rank: int = 0
    launcher: str = "single"

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def reports(self) -> bool:
        """The one rank that prints, writes TensorBoard and results: it holds the scores."""
        return self.last_stage and self.tp_rank == 0 and self.dp_rank == 0

    def describe(self) -> str:
        return f"world {self.world} = dp {self.dp} x tp {self.tp} x pp {self.pp} ({self.launcher})"


@functools.cache  # the MPI branch sets RANK for later readers; ask once per process
def launch_environment() -> tuple[str, int, int]:
    """(launcher, rank, world size) of this process, read from what the launcher set."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in os.environ else "deepspeed" if "CROSS_RANK" in os.environ else "env"
        return launcher, int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ:
        if "MASTER_ADDR" not in os.environ:
            raise RuntimeError("srun: set MASTER_ADDR (and MASTER_PORT) to the first node, as launch/slurm.sbatch does")
        os.environ["RANK"], os.environ["WORLD_SIZE"] = os.environ["SLURM_PROCID"], os.environ["SLURM_NTASKS"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
        return "srun", int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if any(key in os.environ for key in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")):
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        if comm.Get_size() > 1:
            address = comm.bcast(_rendezvous_address() if comm.Get_rank() == 0 else None, root=0)
            os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = address[0], str(address[1])
        # What torchrun would have set, for DeepSpeed and for device selection.
        os.environ["RANK"], os.environ["WORLD_SIZE"] = str(comm.Get_rank()), str(comm.Get_size())
        os.environ["LOCAL_RANK"] = str(comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank())
        return "mpirun", comm.Get_rank(), comm.Get_size()
    return "single", 0, 1


def _rendezvous_address() -> tuple[str, int]:
    host = os.environ.get("MASTER_ADDR") or _routable_address()
    with socket.socket() as s:
        s.bind(("", 0))
        return host, s.getsockname()[1]


def _routable_address() -> str:
    """This host's address as other nodes see it: the source address of a route out (a UDP
    connect sends nothing). The host name often resolves to loopback (127.0.1.1 on Debian)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            return s.getsockname()[0]
    except OSError:  # no route at all: a single machine
        return socket.gethostbyname(socket.gethostname())


def init_distributed(cfg: ParallelConfig, device: torch.device) -> Layout:
    """Join the launch's processes and build the model-parallel groups; a single process returns
    Layout() without making any group unless ZeRO asks for DeepSpeed."""
    launcher, rank, world = launch_environment()
    model_parallel = cfg.tensor * cfg.pipeline
    if world % model_parallel:
        raise ConfigError(
            f"parallel.tensor x parallel.pipeline = {model_parallel} does not divide the world size {world} "
            "(start one process per rank with a launcher from launch/)"
        )
    if world == 1 and cfg.zero_stage == 0:
        return Layout()
    # megatron-core's tensor-parallel linears overlap their gradient all-reduce with compute when
    # CUDA runs kernels in launch order (its recommended setting; read before CUDA starts).
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_rendezvous_address()[1]) if world == 1 else "29500")
    # DeepSpeed needs LOCAL_RANK; a single process, or RANK and WORLD_SIZE set by hand, lack it.
    local_rank = int(os.environ.setdefault("LOCAL_RANK", str(rank % torch.cuda.device_count() if device.type == "cuda" else rank)))
    if not dist.is_initialized():
        backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend, rank=rank, world_size=world)
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(cfg.tensor, cfg.pipeline)
    built = (parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_pipeline_model_parallel_world_size())
    if built != (cfg.tensor, cfg.pipeline):
        raise ConfigError(f"parallel: this process already has groups for tensor {built[0]} x pipeline {built[1]}; "
                          "one process trains one layout")
    return Layout(
        world=world,
        rank=rank,
        tp=cfg.tensor,
        pp=cfg.pipeline,
        dp=world // model_parallel,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        launcher=launcher,
    )


def check_layout(cfg: RunConfig, layout: Layout) -> None:
    """What the config asks must fit the launch: the global batch splits evenly into data-parallel
    ranks and their micro-batches, and compiled core calls run in a plain single process only (the
    layout tested against eager)."""
    t = cfg.train
    if t.compile != "none" and (layout.distributed or cfg.parallel.zero_stage):
        raise ConfigError(f"train.compile: {t.compile!r} is supported in a single process without ZeRO only; "
                          f"this run has {layout.world} process(es) and parallel.zero_stage {cfg.parallel.zero_stage}")
    if t.lanes % layout.dp:
        raise ConfigError(f"train.lanes: {t.lanes} lanes do not split over {layout.dp} data-parallel ranks")
    if (t.lanes // layout.dp) % t.grad_accum:
        raise ConfigError(f"train.grad_accum: {t.grad_accum} micro-batches do not divide the {t.lanes // layout.dp} lanes of each rank")


def shutdown() -> None:
    if dist.is_initialized():
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
