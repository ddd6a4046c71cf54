"""Scoring weights on a split: the evaluation loop of training, and scoring a finished run's
weights (`stairscale eval`, the tables of `stairscale reproduce`)."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import torch

from stairscale.config import ModelConfig, RunConfig, load_config
from stairscale.data.loader import LaneLoader
from stairscale.data.prepare import dataset_dir
from stairscale.data.shards import Dataset
from stairscale.errors import CheckpointError, ConfigError, DataError
from stairscale.model.lm import StaircaseLM
from stairscale.model.state import RecurrentState
from stairscale.parallel import collectives
from stairscale.parallel.groups import Layout
from stairscale.train.checkpoint import BEST, CHECKPOINT, load_checkpoint
from stairscale.train.device import autocast, resolve_device
from stairscale.train.metrics import Tally
from stairscale.train.splits import check_split, make_loader


@torch.no_grad()
def evaluate(model, cfg: RunConfig, loader: LaneLoader, device: torch.device, layout: Layout = Layout(), batches: int = 0) -> Tally:
    """Score a whole split once (or its first `batches` segments of every lane), every lane read
    with carried state from a fresh start; the tally is summed over the data-parallel ranks."""
    was_training = model.training
    model.eval()
    tally = Tally.for_dataset(loader.dataset)
    lanes = len(loader.local_lanes)
    # Pipeline stages split their lanes into micro-batches, as in training, so that they overlap.
    parts = cfg.train.grad_accum if layout.pp > 1 else 1
    states = [RecurrentState.initial(lanes // parts, device) for _ in range(parts)]
    for batch in itertools.islice(loader, batches or None):
        micros = batch.split(parts)
        on_device = [m.to(device) for m in micros]
        with autocast(cfg, device):
            if layout.pp > 1:
                all_scores, states = model.runner.run([(m.tokens, m.doc_start, m.targets) for m in on_device], states, loss_scale=None)
            else:
                scores, states[0] = model(on_device[0].tokens, on_device[0].doc_start, on_device[0].targets, states[0])
                all_scores = [scores]
        for micro, scores in zip(micros, all_scores):
            if scores is not None:  # None on pipeline stages without the head
                tally.add(scores, micro.targets, micro.doc_pos)
    model.train(was_training)
    return collectives.sum_tallies(tally, layout)


def score_run(run_dir: str, split: str, overrides: list[str] = (), weights: str = "final") -> Tally:
    """Load a run's config and its final (or best) weights and score `split` with carried state
    from a fresh start."""
    for assignment in overrides:
        if assignment.startswith(("model.", "parallel.")):
            raise ConfigError(f"--set {assignment!r}: the model and its layout are the run's; scoring may change task, data and train keys")
    run_cfg = load_config(Path(run_dir) / "config.yaml")
    cfg = load_config(Path(run_dir) / "config.yaml", overrides)
    device = resolve_device(cfg)
    dataset = Dataset(dataset_dir(cfg), cfg.data.on_bad_sample)
    check_split(dataset, split)
    name = BEST if weights == "best" else CHECKPOINT
    path = Path(run_dir) / name
    payload = load_checkpoint(run_dir, name)
    check_model_config(payload.get("model_config"), cfg, path)
    other_data_asked = cfg.task != run_cfg.task or any(a.startswith("data.dir=") for a in overrides)
    check_scored_data(payload.get("data", {}), dataset, split, path, other_data_asked)
    model = StaircaseLM(cfg.model, len(dataset.vocab), dataset.vocab.pad_id)  # checkpoints hold single-device weights
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as err:  # shapes or names that differ from the run's config.yaml
        raise CheckpointError(f"checkpoint {path} does not fit the model its config.yaml and the --set keys build: {err}") from err
    return evaluate(model.to(device), cfg, make_loader(cfg, dataset.root, split, training=False), device)


# Model keys that change how a model trains, not what its weights compute when scored.
NOT_THE_MODEL = ("dropout", "attn_dropout", "activation_checkpointing")


def check_model_config(recorded: dict | None, cfg: RunConfig, path: Path) -> None:
    """The checkpoint's weights were trained as the model that the run's config.yaml describes:
    weights of another schedule or window can have the same shapes, and would be scored as this
    model. A key the checkpoint does not record (added since) counts at its default; checkpoints
    written before the model was recorded are not checked."""
    if recorded is None:
        return
    was = {**dataclasses.asdict(ModelConfig()), **recorded}
    changed = [f"model.{key} {was[key]!r} -> {value!r}" for key, value in dataclasses.asdict(cfg.model).items()
               if key not in NOT_THE_MODEL and was[key] != value]
    if changed:
        raise CheckpointError(f"checkpoint {path} was trained as another model than its run's config.yaml describes ({', '.join(changed)})")


def check_scored_data(recorded: dict, dataset: Dataset, split: str, path: Path, other_data_asked: bool) -> None:
    """The checkpoint's weights read the dataset's token ids as the run did, and (unless the
    --set keys asked for another task or named a data.dir) the split holds the documents the run was
    scored on. Checkpoints written before these were recorded are not checked."""
    if recorded.get("vocab", dataset.vocab.digest) != dataset.vocab.digest:
        raise DataError(f"dataset {dataset.root} has another vocabulary than checkpoint {path} was trained with (a "
                        "tokenizer trained again, by another `tokenizers` version, say): its token ids would mean other "
                        "tokens; score it on the run's own dataset: --set data.dir=DIR")
    if split in recorded and not other_data_asked and recorded[split] != dataset.content_digest(split):
        raise DataError(f"dataset {dataset.root}: its {split} split holds other documents than the run of {path} was "
                        "scored on: the corpus changed since (an edited file, another interpreter's standard library); "
                        "to score this data on purpose, name it: --set data.dir=DIR")


def evaluate_run(run_dir: str, split: str, overrides: list[str] = (), weights: str = "final") -> dict:
    tally = score_run(run_dir, split, overrides, weights)
    result = {"run": str(run_dir), "split": split, "weights": weights, **tally.summary()}
    if tally.labelled:
        result["error_by_position"] = tally.error_by_position(bucket=32)
    return result
