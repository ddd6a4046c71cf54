"""The files of a run directory: checkpoints, written whole or not at all (temporary file, then
an atomic rename), and the rule that a directory holds one run."""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

import torch

from stairscale.config import RunConfig, load_config
from stairscale.errors import CheckpointError, ConfigError
from stairscale.files import put_in_place

CHECKPOINT = "checkpoint.pt"  # the weights at the end of the run
BEST = "best.pt"  # train.keep_best: the weights of the best validation
RESULTS = "results.json"
RUN_OUTPUTS = (CHECKPOINT, BEST, RESULTS)  # what a run writes besides its config and curves


def save_checkpoint(run_dir: str | Path, payload: dict, name: str = CHECKPOINT) -> Path:
    """Write the payload with a digest of its weights; if that fails, the earlier checkpoint (if
    any) stays as it was."""
    path = Path(run_dir) / name
    tmp = path.with_suffix(".pt.tmp")
    try:
        torch.save({**payload, "model_sha256": weights_digest(payload["model"])}, tmp)
        put_in_place(tmp, path)
    except (OSError, RuntimeError) as err:  # a full disk, say (torch.save raises RuntimeError)
        raise CheckpointError(f"checkpoint {path} could not be written: {err}") from err
    finally:  # (Ctrl-C mid-write included)
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return path


def load_checkpoint(run_dir: str | Path, name: str = CHECKPOINT) -> dict:
    """The checkpoint's payload; tensors and plain values only (no pickled code runs)."""
    path = Path(run_dir) / name
    if not path.is_file():
        hint = "did the run keep its best weights? see train.keep_best" if name == BEST else "was the run finished or saved?"
        raise CheckpointError(f"no checkpoint at {path} ({hint})")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: say which file
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(err).__name__}: {err})") from err
    if not isinstance(payload, dict) or not isinstance(payload.get("model"), dict):
        raise CheckpointError(f"checkpoint {path} has no 'model' entry of named tensors: not a stairscale checkpoint")
    # (Checkpoints from before digests were recorded have none.)
    if "model_sha256" in payload and payload.pop("model_sha256") != weights_digest(payload["model"]):
        raise CheckpointError(f"checkpoint {path} is corrupt: its weights do not match the digest written with them")
    return payload


def weights_digest(weights: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(weights.items()):
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)};".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


# Keys that change how a run is executed, not what it computes.
NOT_THE_RUN = ("run_dir", "data.cache", "data.workers", "data.prefetch", "train.threads", "train.log_every", "parallel.timeout_minutes")


def holds_a_run(run_dir: Path) -> bool:
    return any((run_dir / name).exists() for name in RUN_OUTPUTS)


def refuse_another_run(cfg: RunConfig) -> None:
    """A run directory holds one run. A run with another config there would overwrite config.yaml
    at once and the checkpoint and results at its end, leaving the two mixed if it stops early."""
    run_dir = Path(cfg.run_dir)
    if not holds_a_run(run_dir):
        return
    refuse = f"run_dir: {run_dir} holds another run"
    try:
        earlier = load_config(run_dir / "config.yaml")
    except ConfigError as err:
        raise ConfigError(f"{refuse}, whose config.yaml cannot be read ({err}); choose another run_dir or remove that run") from None
    was, now = _dotted(earlier.to_dict()), _dotted(cfg.to_dict())
    changed = [key for key in now if was[key] != now[key] and key not in NOT_THE_RUN]
    if changed:
        what = ", ".join(f"{key} {was[key]!r} -> {now[key]!r}" for key in changed[:3]) + (", ..." if len(changed) > 3 else "")
        raise ConfigError(f"{refuse} ({what}); choose another run_dir or remove that run")


def _dotted(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        flat.update(_dotted(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return flat
