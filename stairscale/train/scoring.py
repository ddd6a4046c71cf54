"""Score a finished run's weights: `stairscale eval` and the tables of `stairscale reproduce`."""

from __future__ import annotations

from pathlib import Path

from stairscale.config import load_config
from stairscale.data.prepare import dataset_dir
from stairscale.data.shards import Dataset
from stairscale.errors import CheckpointError, ConfigError, DataError
from stairscale.model.lm import StaircaseLM
from stairscale.train.checkpoint import BEST, CHECKPOINT, load_checkpoint
from stairscale.train.metrics import Tally
from stairscale.train.trainer import check_split, evaluate, make_loader, resolve_device


def score_run(run_dir: str, split: str, overrides: list[str] = (), weights: str = "final") -> Tally:
    """Load a run's config and its final (or best) weights and score `split` with carried state
    from a fresh start."""
    for assignment in overrides:
        if assignment.startswith(("model.", "parallel.")):
            raise ConfigError(f"--set {assignment!r}: the model and its layout are the run's; scoring may change task, data and train keys")
    cfg = load_config(Path(run_dir) / "config.yaml", overrides)
    device = resolve_device(cfg)
    dataset = Dataset(dataset_dir(cfg))
    check_split(dataset, split)
    path = Path(run_dir) / (BEST if weights == "best" else CHECKPOINT)
    payload = load_checkpoint(run_dir, path.name)
    check_same_data(payload.get("data", {}), dataset, split, path, data_chosen=any(a.startswith(("task.", "data.")) for a in overrides))
    model = StaircaseLM(cfg.model, len(dataset.vocab), dataset.vocab.pad_id)  # checkpoints hold single-device weights
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as err:  # shapes or names that differ from the run's config.yaml
        raise CheckpointError(f"checkpoint {path} does not fit the model its config.yaml and the --set keys build: {err}") from err
    return evaluate(model.to(device), cfg, make_loader(cfg, dataset.root, split, training=False), device)


def check_same_data(trained: dict, dataset: Dataset, split: str, path: Path, data_chosen: bool) -> None:
    """The checkpoint's weights read the dataset's token ids as the run did, and (unless the
    --set keys chose other data) the split is the one the run was scored on. Checkpoints
    written before these were recorded are not checked."""
    if trained.get("vocab", dataset.vocab.digest) != dataset.vocab.digest:
        raise CheckpointError(f"checkpoint {path} was trained with another vocabulary than dataset {dataset.root} has "
                              "(a tokenizer trained again, by another `tokenizers` version, say), so its token ids "
                              "would mean other tokens; score it on the run's own dataset: --set data.dir=DIR")
    if not data_chosen and trained.get(split, dataset.fingerprint_of([split])) != dataset.fingerprint_of([split]):
        raise DataError(f"dataset {dataset.root}: its {split} split is not the one the run of {path} was scored on "
                        f"(fingerprint {dataset.fingerprint_of([split])}, the run's {trained[split]}): the corpus "
                        "changed since (an edited file, another interpreter's standard library); to score this data "
                        "on purpose, name it: --set data.dir=DIR")



def evaluate_run(run_dir: str, split: str, overrides: list[str] = (), weights: str = "final") -> dict:
    tally = score_run(run_dir, split, overrides, weights)
    result = {"run": str(run_dir), "split": split, "weights": weights, **tally.summary()}
    if tally.labelled:
        result["error_by_position"] = tally.error_by_position(bucket=32)
    return result
