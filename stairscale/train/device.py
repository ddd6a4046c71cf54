"""The device a run trains on, and its precision."""

from __future__ import annotations

import contextlib

import torch

from stairscale.config import RunConfig
from stairscale.errors import ConfigError


def resolve_device(cfg: RunConfig) -> torch.device:
    if cfg.train.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(cfg.train.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device: {cfg.train.device!r}, but torch sees no CUDA device here (use auto or cpu)")
    return device


def check_backend(cfg: RunConfig, device: torch.device) -> None:
    if cfg.parallel.backend == "nccl" and device.type != "cuda":
        raise ConfigError(f"parallel.backend: nccl runs on CUDA devices, but train.device {cfg.train.device!r} is the CPU here (use auto or gloo)")


def uses_bf16(cfg: RunConfig, device: torch.device) -> bool:
    return cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda")


def autocast(cfg: RunConfig, device: torch.device):
    if not uses_bf16(cfg, device):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)
