"""A run's splits: their loaders, and the checks a run makes on them before it trains."""

from __future__ import annotations

import sys

from stairscale.config import RunConfig
from stairscale.data.loader import LaneLoader, LoaderSpec, check_a_shard_per_lane, deal_warning
from stairscale.data.prepare import train_split
from stairscale.data.shards import Dataset
from stairscale.errors import DataError
from stairscale.parallel.groups import Layout


def loader_spec(cfg: RunConfig, root, split: str, training: bool) -> LoaderSpec:
    return LoaderSpec(str(root), split, cfg.train.lanes, cfg.train.segment_len, cfg.model.chunk, cfg.train.seed,
                      shuffle=training, on_bad_sample=cfg.data.on_bad_sample)


def make_loader(cfg: RunConfig, root, split: str, training: bool, layout: Layout = Layout()) -> LaneLoader:
    spec = loader_spec(cfg, root, split, training)
    return LaneLoader(spec, layout.dp_rank, layout.dp, workers=cfg.data.workers, prefetch=cfg.data.prefetch)


def training_splits(cfg: RunConfig) -> list[str]:
    """The splits of the run's curriculum stages, each once."""
    return list(dict.fromkeys(train_split(cfg.task, stage) for stage in range(cfg.task.stages)))


def warn_of_uneven_deals(dataset: Dataset, cfg: RunConfig) -> None:
    """A training split whose shards deal badly to the lanes trains, with a warning on stderr."""
    for split in training_splits(cfg):
        warning = deal_warning(loader_spec(cfg, dataset.root, split, training=True), dataset.shards(split))
        if warning:
            print(f"stairscale: warning: {warning}", file=sys.stderr, flush=True)


def check_splits(dataset: Dataset, cfg: RunConfig) -> dict[str, str]:
    """Every split the run reads is there and holds something to predict, and each training split
    a shard per lane; the evaluation splits (small) are read whole, every shard checked against its
    sha256: fail now, not at the first validation or after training. Returns the evaluation
    splits' content digests."""
    for split in training_splits(cfg):
        check_split(dataset, split, cfg.train.lanes)
    digests = {}
    for split in ("valid", "test"):
        check_split(dataset, split)
        digests[split] = dataset.content_digest(split)
    return digests


def check_split(dataset: Dataset, split: str, lanes: int = 0) -> None:
    """The split is there, has something to predict, (`lanes`: a training split) a shard per lane,
    and every shard file, none shorter than its manifest entry says."""
    shards = dataset.shards(split)
    if not shards:
        raise DataError(f"dataset {dataset.root}: split {split} has no documents; a run trains on its train "
                        "split(s) and is scored on valid and test")
    if not dataset.labelled and sum(s.tokens - s.documents for s in shards) == 0:
        raise DataError(f"dataset {dataset.root}: split {split} has nothing to predict (its documents "
                        "hold only their start token)")
    if lanes:
        check_a_shard_per_lane(str(dataset.root), split, shards, lanes)
    missing = [str(s.path) for s in shards if not s.path.is_file()]
    if missing:
        raise DataError(f"dataset {dataset.root}: split {split} lacks {len(missing)} of its shards ({missing[0]}, ...); "
                        "prepare the dataset again")
    short = [str(s.path) for s in shards if dataset.truncated(s)]
    if short:
        raise DataError(f"dataset {dataset.root}: split {split}: {len(short)} of its shards end before the samples the "
                        f"manifest lists ({', '.join(short[:3])}{', ...' if len(short) > 3 else ''}); prepare the dataset again")
