"""Score a finished run's weights: `stairscale eval` and the tables of `stairscale reproduce`."""

from __future__ import annotations

from pathlib import Path

from stairscale.config import load_config
from stairscale.data.prepare import dataset_dir
from stairscale.data.shards import Dataset
from stairscale.errors import CheckpointError, ConfigError
from stairscale.model.lm import StaircaseLM
from stairscale.train.checkpoint import BEST, CHECKPOINT, load_checkpoint
from stairscale.train.metrics import Tally
from stairscale.train.trainer import evaluate, make_loader, resolve_device


def score_run(run_dir: str, split: str, overrides: list[str] = (), weights: str = "final") -> Tally:
    """Load a run's config and its final (or best) weights and score `split` with carried state
    from a fresh start."""
    for assignment in overrides:
        if assignment.startswith(("model.", "parallel.")):
            raise ConfigError(f"--set {assignment!r}: the model and its layout are the run's; scoring may change task, data and train keys")
    cfg = load_config(Path(run_dir) / "config.yaml", overrides)
    device = resolve_device(cfg)
    root = dataset_dir(cfg)
    vocab = Dataset(root).vocab
    model = StaircaseLM(cfg.model, len(vocab), vocab.pad_id)  # checkpoints hold single-device weights
    name = BEST if weights == "best" else CHECKPOINT
    try:
        model.load_state_dict(load_checkpoint(run_dir, name)["model"])
    except RuntimeError as err:  # shapes or names that differ from the run's config.yaml
        raise CheckpointError(f"checkpoint {Path(run_dir) / name} does not fit the model its config.yaml and the --set keys build: {err}") from err
    return evaluate(model.to(device), cfg, make_loader(cfg, root, split, training=False), device)


def evaluate_run(run_dir: str, split: str, overrides: list[str] = (), weights: str = "final") -> dict:
    tally = score_run(run_dir, split, overrides, weights)
    result = {"run": str(run_dir), "split": split, "weights": weights, **tally.summary()}
    if tally.labelled:
        result["error_by_position"] = tally.error_by_position(bucket=32)
    return result
