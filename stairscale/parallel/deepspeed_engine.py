"""DeepSpeed ZeRO over the data-parallel group of megatron-core's parallel_state.

The engine owns the optimizer step: ZeRO partitioning (stages 0-3), the gradient reduction over
the data-parallel ranks, and gradient-norm clipping that counts every tensor-parallel shard once and
sums over tensor and pipeline ranks (DeepSpeed's model-parallel norm with the `mpu` below).
Compute precision stays with the trainer (bf16 autocast on GPU), so the engine holds fp32 weights
and every layout computes what the single-process run computes.
"""

from __future__ import annotations

import logging
import os

import torch
from megatron.core import parallel_state
from torch import nn

from stairscale.config import RunConfig
from stairscale.parallel.groups import Layout
from stairscale.parallel.tensor import is_sharded


class MegatronGroups:
    """The `mpu` DeepSpeed asks for, answered by parallel_state. Norms are summed over the
    model-parallel group (tensor x pipeline); a replicated tensor is counted on tensor rank 0 only."""

    get_tensor_model_parallel_rank = staticmethod(parallel_state.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(parallel_state.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_group = staticmethod(parallel_state.get_tensor_model_parallel_group)
    # DeepSpeed counts a tensor that is not tensor-parallel (e.g. a LayerNorm weight) only where
    # this rank is 0; such tensors are copies across the tensor ranks, so it is the tensor rank.
    get_model_parallel_rank = staticmethod(parallel_state.get_tensor_model_parallel_rank)
    get_model_parallel_group = staticmethod(parallel_state.get_model_parallel_group)
    get_pipeline_model_parallel_rank = staticmethod(parallel_state.get_pipeline_model_parallel_rank)
    get_pipeline_model_parallel_world_size = staticmethod(parallel_state.get_pipeline_model_parallel_world_size)
    get_pipeline_model_parallel_group = staticmethod(parallel_state.get_pipeline_model_parallel_group)
    get_data_parallel_rank = staticmethod(parallel_state.get_data_parallel_rank)
    get_data_parallel_world_size = staticmethod(parallel_state.get_data_parallel_world_size)
    get_data_parallel_group = staticmethod(parallel_state.get_data_parallel_group)

    @staticmethod
    def get_model_parallel_world_size() -> int:
        return parallel_state.get_tensor_model_parallel_world_size() * parallel_state.get_pipeline_model_parallel_world_size()


def deepspeed_config(cfg: RunConfig, layout: Layout, bf16: bool) -> dict:
    t, stage = cfg.train, cfg.parallel.zero_stage
    # The pipeline runs all micro-batches' backward itself: DeepSpeed sees one batch per step.
    micro_batches = t.grad_accum if layout.pp == 1 else 1
    return {
        # The engine's forward switches off a CUDA autocast it was not configured with, so the
        # trainer's bf16 autocast is declared here too. No module may reduce its gradients in bf16
        # (DeepSpeed's default would for every Linear): they are reduced in fp32 as without ZeRO.
        "torch_autocast": {"enabled": bf16, "dtype": "bfloat16", "lower_precision_safe_modules": []},
        "train_micro_batch_size_per_gpu": t.lanes // layout.dp // micro_batches,
        "gradient_accumulation_steps": micro_batches,
        # ZeRO-0 clips in DeepSpeedTrainEngine.step (clip_gradients), which keeps the norm for the logs.
        "gradient_clipping": t.grad_clip if stage > 0 else 0.0,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,  # torch's AdamW, as in the single-process run
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


class DeepSpeedTrainEngine:
    """The trainer's engine interface (forward, backward, step) on a DeepSpeed engine."""

    def __init__(self, model: nn.Module, cfg: RunConfig, layout: Layout, optimizer: torch.optim.Optimizer, bf16: bool):
        # Also for train.device=cpu on a machine with a GPU. DeepSpeed reads this once per process,
        # when it first picks its accelerator.
        if next(model.parameters()).device.type == "cpu":
            os.environ["DS_ACCELERATOR"] = "cpu"
        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its INFO lines come from every rank
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
        self.cfg = cfg
        self.pipeline = layout.pp > 1
        self.deepspeed, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(cfg, layout, bf16), mpu=MegatronGroups()
        )

    @property
    def module(self) -> nn.Module:
        return self.deepspeed.module

    def forward(self, *args):
        return self.deepspeed(*args)

    def backward(self, loss: torch.Tensor) -> None:
        self.deepspeed.backward(loss, scale_wrt_gas=False)  # the trainer normalises the loss itself
        if not self.deepspeed.is_gradient_accumulation_boundary():
            self.deepspeed.step()  # DeepSpeed counts micro-batches in step(); it updates at the boundary

    def step(self, lr: float) -> float:
        """Clip, update and zero the gradients; returns the gradient norm before clipping."""
        for group in self.deepspeed.optimizer.param_groups:
            group["lr"] = lr
        if self.pipeline:  # the pipeline ran backward outside the engine: reduce over data parallel now
            self.deepspeed.allreduce_gradients()
        norm = None
        if self.cfg.parallel.zero_stage == 0:
            norm = clip_gradients(list(self.deepspeed.module.parameters()), self.cfg.train.grad_clip)
        self.deepspeed.step()
        return float(norm if norm is not None else self.deepspeed.get_global_grad_norm())


def clip_gradients(params: list[torch.Tensor], max_norm: float) -> float:
    """ZeRO-0's clipping (ZeRO 1-3 clip inside DeepSpeed by the same rule): the norm of the whole
    model's gradient, counting a tensor-parallel shard on its rank, a replicated tensor on tensor
    rank 0, and the pipeline-replicated relative table on the first stage only."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    squares = torch.zeros((), dtype=torch.float64, device=params[0].device)  # nccl reduces device tensors
    for p in params:
        counted = is_sharded(p) or tp_rank == 0
        if p.grad is not None and counted and not getattr(p, "ds_pipe_replicated", False):
            squares += p.grad.detach().double().pow(2).sum()
    torch.distributed.all_reduce(squares, group=parallel_state.get_model_parallel_group())
    norm = float(squares.sqrt())
    if max_norm and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for p in params:
            if p.grad is not None:
                p.grad.mul_(scale)
    return norm
