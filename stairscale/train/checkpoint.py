"""Checkpoints: written whole or not at all (temporary file, then an atomic rename)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from stairscale.errors import CheckpointError

CHECKPOINT = "checkpoint.pt"


def save_checkpoint(run_dir: str | Path, payload: dict) -> Path:
    path = Path(run_dir) / CHECKPOINT
    tmp = path.with_suffix(".pt.tmp")
    torch.save(payload, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(run_dir: str | Path) -> dict:
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path} (was the run finished or saved?)")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a truncated or foreign file: say which file
        raise CheckpointError(f"checkpoint {path} cannot be read: {err}") from err
