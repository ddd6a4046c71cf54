"""What runs a train step's model and optimizer: AdamW with clipping, in plain PyTorch for a single
process or in a DeepSpeed engine (ZeRO, data parallel) otherwise. Both offer forward, backward and
step, and the model as `module`."""

from __future__ import annotations

import torch
from torch import nn

from stairscale.config import RunConfig
from stairscale.parallel.groups import Layout


class TorchEngine:
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float):
        self.module, self.optimizer, self.grad_clip = model, optimizer, grad_clip

    def forward(self, *args):
        return self.module(*args)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, lr: float) -> torch.Tensor:
        """Clip, update and zero the gradients; returns the gradient norm before clipping (on the
        device: reading it back would make the host wait for the step)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip or float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm


def build_engine(model: nn.Module, cfg: RunConfig, layout: Layout, bf16: bool):
    """AdamW, under DeepSpeed where the layout needs it; `bf16`: the forward runs under bf16 autocast."""
    t = cfg.train
    # On a GPU the fused kernel: one launch per step instead of a few per parameter. On the CPU,
    # torch's default, which the CPU recipes (docs/reproducing.md) were tuned and recorded with.
    fused = next(model.parameters()).device.type == "cuda"
    adamw = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(t.beta1, t.beta2), weight_decay=t.weight_decay, fused=fused)
    if layout.distributed or cfg.parallel.zero_stage:
        from stairscale.parallel.deepspeed_engine import DeepSpeedTrainEngine

        return DeepSpeedTrainEngine(model, cfg, layout, adamw, bf16)
    return TorchEngine(model, adamw, t.grad_clip)
