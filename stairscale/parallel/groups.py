"""Process groups, made in one place for every launcher (launchers.py reads which one started
this process). The torch backend is gloo on CPU and nccl on GPU; the tensor, pipeline and
data-parallel groups come from megatron-core's `parallel_state` (rank order tp, dp, pp: the ranks
of one tensor-parallel group are neighbours).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from stairscale.config import ParallelConfig, RunConfig
from stairscale.errors import ConfigError, LaunchError
from stairscale.parallel.launchers import launch_environment


DEFAULT_TIMEOUT_MINUTES = {"gloo": 30, "nccl": 10}  # torch's, for parallel.timeout_minutes 0


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


def cuda_device_index(local_rank: int, visible: int) -> int:
    """The GPU a process takes: its only visible one (srun --gpus-per-task=1, CUDA_VISIBLE_DEVICES
    per rank), else the one its local rank names. A local rank beyond the visible GPUs is refused:
    wrapping around would put two ranks on one GPU."""
    if visible == 1:
        return 0
    if local_rank >= visible:
        raise LaunchError(f"LOCAL_RANK {local_rank} but this process sees {visible} GPUs (CUDA_VISIBLE_DEVICES="
                          f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): start one process per GPU on each node, or "
                          "give each process its own GPU (srun --gpus-per-task=1)")
    return local_rank


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
    if world == 1:  # ZeRO in one process: a store in memory, no port (a free one found first could be taken)
        store, address = dist.HashStore(), "its own store"
    elif "MASTER_ADDR" not in os.environ:  # on another node, a default of 127.0.0.1 would wait for ranks that never come
        raise LaunchError(f"rank {rank} of {world} ({launcher}): MASTER_ADDR is not set: set it to the address of rank 0's host "
                          "(and MASTER_PORT, default 29500), or start the ranks with a launcher from launch/")
    else:
        os.environ.setdefault("MASTER_PORT", "29500")
        store, address = None, f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    # DeepSpeed needs LOCAL_RANK, and on a GPU takes it for the device index; a single process, or
    # RANK and WORLD_SIZE set by hand, lack it.
    local_rank = os.environ.get("LOCAL_RANK")
    if device.type == "cuda":
        visible = torch.cuda.device_count()  # ranks set by hand: numbered node by node
        local_rank = cuda_device_index(rank % visible if local_rank is None else int(local_rank), visible)
    os.environ["LOCAL_RANK"] = str(rank if local_rank is None else local_rank)
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    timeout = cfg.timeout_minutes or DEFAULT_TIMEOUT_MINUTES[backend]
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
        try:
            dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(minutes=timeout), store=store)
        except dist.DistError as err:  # a rank that never came, or an address nobody listens at
            raise LaunchError(f"rank {rank} of {world} ({launcher}) could not join the others at {address} within "
                              f"{timeout:g} minutes (parallel.timeout_minutes): {err}") from err
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(cfg.tensor, cfg.pipeline, distributed_timeout_minutes=timeout)
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
