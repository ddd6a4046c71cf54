"""Checkpoints: written whole or not at all (temporary file, then an atomic rename)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from stairscale.errors import CheckpointError

CHECKPOINT = "checkpoint.pt"


def save_checkpoint(run_dir: str | Path, payload: dict) -> Path:
    """Write the payload; if that fails, the earlier checkpoint (if any) stays as it was."""
    path = Path(run_dir) / CHECKPOINT
    tmp = path.with_suffix(".pt.tmp")
    try:
        torch.save(payload, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # a full disk, say (torch.save raises RuntimeError)
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise CheckpointError(f"checkpoint {path} could not be written: {err}") from err
    return path


def load_checkpoint(run_dir: str | Path) -> dict:
    """The checkpoint's payload; tensors and plain values only (no pickled code runs)."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path} (was the run finished or saved?)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: say which file
        raise CheckpointError(f"checkpoint {path} cannot be read: {err}") from err
    if not isinstance(payload, dict) or "model" not in payload:
        raise CheckpointError(f"checkpoint {path} has no 'model' entry: not a stairscale checkpoint")
    return payload
