"""The lane loader: shards -> lanes -> segments, for any number of ranks and worker processes.

The global batch is G lanes with global ids 0..G-1; data-parallel rank r owns lanes
[r*G/dp, (r+1)*G/dp). Each epoch the split's shards are dealt to the G lanes from (seed, epoch):
shuffled, then each to the lane with the fewest tokens so far. A lane reads its shards' documents
in order, packed chunk-aligned (see lanes.py). Every lane yields the same number of steps per
epoch, the longest lane's; shorter lanes are padded at the end (padding is never a target).

Because the plan is a pure function of (manifest, seed, epoch, G, M, F), the position of the whole
run is just (epoch, step): any rank of any data-parallel size can find where each of its lanes
stands, which makes resumption exact, also after changing the data-parallel size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from stairscale.data.lanes import FIELDS, PACKED, Batch, LaneStream, pack
from stairscale.data.shards import Dataset, Shard
from stairscale.errors import DataError


@dataclass(frozen=True)
class LoaderSpec:
    """Everything that determines the sequence of global batches."""

    root: str
    split: str
    lanes: int  # G, global
    segment_len: int  # M
    chunk: int  # F
    seed: int
    shuffle: bool  # shuffle shards every epoch (training); evaluation reads in order, one epoch
    on_bad_sample: str = "error"


def padded(length: int, chunk: int) -> int:
    return -(-length // chunk) * chunk


def padded_tokens(lengths, chunk: int) -> int:
    """Positions documents of these lengths take in a lane, each padded to whole chunks."""
    return sum(padded(n, chunk) for n in lengths)


@dataclass
class EpochPlan:
    lanes: list[list[Shard]]  # shards of each global lane, in reading order
    steps: int  # steps per epoch, the same on every rank


def plan_epoch(spec: LoaderSpec, shards: list[Shard], epoch: int) -> EpochPlan:
    order = np.random.default_rng([spec.seed, epoch]).permutation(len(shards)) if spec.shuffle else range(len(shards))
    loads = [0] * spec.lanes
    lanes: list[list[Shard]] = [[] for _ in range(spec.lanes)]
    for index in order:
        shard = shards[index]
        lane = loads.index(min(loads))
        lanes[lane].append(shard)
        loads[lane] += padded_tokens(shard.lengths, spec.chunk)
    return EpochPlan(lanes, math.ceil(max(loads) / spec.segment_len))


def check_a_shard_per_lane(root: str, split: str, shards: list[Shard], lanes: int) -> None:
    """A lane reads whole shards: a training split needs one per lane (evaluation may leave lanes idle)."""
    if len(shards) < lanes:
        documents = sum(shard.documents for shard in shards)
        raise DataError(
            f"dataset {root}: split {split} has {len(shards)} shards ({documents} documents) for {lanes} lanes; a lane "
            "reads whole shards, so some lanes would train on padding only. Prepare it again, into a new directory, with "
            "this run's train.lanes and data.shard_docs 0 (two shards a lane or more, given as many documents: "
            "task.train_docs for the random walk), or use fewer lanes"
        )


def deal_warning(spec: LoaderSpec, shards: list[Shard]) -> str | None:
    """What dealing whole shards to the training lanes costs, or None: with fewer than two shards a
    lane, epochs repeat the same batches (with one each, exactly, rows permuted), and an uneven
    deal leaves lanes padding while others still read."""
    plan = plan_epoch(spec, shards, 0)
    data = sum(padded_tokens(shard.lengths, spec.chunk) for shard in shards)
    used = data / (plan.steps * spec.segment_len * spec.lanes)
    problems = []
    if len(shards) < 2 * spec.lanes:
        problems.append(f"{len(shards)} shards for {spec.lanes} lanes, so epochs repeat batches (a lane reads whole "
                        "shards, each in its own order: at one shard a lane every epoch holds the same batches)")
    if used < 0.85:
        problems.append(f"{used:.0%} of each epoch's lane steps hold documents, the rest padding (the shards "
                        f"do not deal evenly to {spec.lanes} lanes)")
    if not problems:
        return None
    return (f"dataset {spec.root}: split {spec.split}: " + "; ".join(problems) + ". Prepare it into a new directory "
            "with data.shard_docs 0 (the default: at least two shards a lane, a multiple of the lanes) "
            "and this run's train.lanes, or cut text into more pieces (task.piece_len)")


def lane_position(spec: LoaderSpec, lane_shards: list[Shard], step: int) -> tuple[int, int, int]:
    """(shard in lane, document in shard, token offset in document) at the start of `step`."""
    remaining = step * spec.segment_len
    for k, shard in enumerate(lane_shards):
        for d, length in enumerate(shard.lengths):
            size = padded(length, spec.chunk)
            if remaining < size:
                return k, d, remaining
            remaining -= size
    return len(lane_shards), 0, 0  # past the lane's last document: padding only


PACK_TOKENS = 1 << 16  # tokens of whole documents packed at a time (20 bytes each once packed)


def _lane_blocks(spec: LoaderSpec, dataset: Dataset, lane_shards: list[Shard], first: int) -> Iterator[np.ndarray]:
    """A lane's shards as packed blocks of whole documents, about PACK_TOKENS tokens each (a
    longer document is a block of its own): a lane holds its shard in the shard's compact dtype
    and only one block packed, so memory follows the lanes, not the split's size."""
    for shard in lane_shards[first:]:
        docs = dataset.read_shard(shard)
        ends = np.cumsum(docs.lengths)
        for a, b in document_groups(docs.lengths, PACK_TOKENS):
            start, stop = ends[a] - docs.lengths[a], ends[b - 1]
            labels = None if docs.labels is None else docs.labels[start:stop]
            yield pack(docs.tokens[start:stop], labels, docs.lengths[a:b], docs.ids[a:b], spec.chunk, dataset.vocab.pad_id)


def document_groups(lengths: np.ndarray, size: int) -> list[tuple[int, int]]:
    """Consecutive ranges [a, b) of documents, each ending at the first document that brings it to
    `size` tokens or more (the last may be shorter)."""
    groups, a, total = [], 0, 0
    for index, length in enumerate(lengths.tolist()):
        total += length
        if total >= size:
            groups.append((a, index + 1))
            a, total = index + 1, 0
    if a < len(lengths):
        groups.append((a, len(lengths)))
    return groups


def epoch_segments(spec: LoaderSpec, dataset: Dataset, plan: EpochPlan, lanes: list[int], start_step: int) -> Iterator[np.ndarray]:
    """Segments of the given global lanes for steps start_step .. plan.steps-1 of one epoch."""
    streams = []
    for lane in lanes:
        shard_index, doc_index, offset = lane_position(spec, plan.lanes[lane], start_step)
        stream = LaneStream(_lane_blocks(spec, dataset, plan.lanes[lane], shard_index), dataset.vocab.pad_id)
        if shard_index < len(plan.lanes[lane]):  # resume inside the shard
            lengths = plan.lanes[lane][shard_index].lengths[:doc_index]
            skip = padded_tokens(lengths, spec.chunk) + offset
            if skip:
                stream.take(skip)
        streams.append(stream)
    for _ in range(start_step, plan.steps):
        # [lanes, fields, M]; a worker with no lanes still answers every step
        yield np.stack([stream.take(spec.segment_len) for stream in streams]) if streams else np.zeros((0, len(FIELDS), spec.segment_len), dtype=PACKED)


class _LaneData(IterableDataset):
    """Runs in each loader worker: its share of the rank's lanes, epoch after epoch."""

    def __init__(self, spec: LoaderSpec, lanes: list[int], epoch: int, step: int):
        self.spec, self.lanes, self.epoch, self.step = spec, lanes, epoch, step

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        mine = [int(x) for x in np.array_split(np.array(self.lanes, dtype=int), workers)[worker]]
        try:
            dataset = Dataset(self.spec.root, self.spec.on_bad_sample)
            shards = dataset.shards(self.spec.split)
            epoch, step = self.epoch, self.step
            while True:
                plan = plan_epoch(self.spec, shards, epoch)
                yield from epoch_segments(self.spec, dataset, plan, mine, step)
                if not self.spec.shuffle:
                    return
                epoch, step = epoch + 1, 0
        except DataError as err:  # passed on as an item: torch would re-raise it with this worker's traceback
            yield _Failed(str(err))


@dataclass
class _Failed:
    """A DataError met while reading, on its way to the loader's caller."""

    message: str


class LaneLoader:
    """Iterates Batches of this rank's lanes; `state_dict` is the global position (epoch, step)."""

    def __init__(self, spec: LoaderSpec, dp_rank: int = 0, dp_size: int = 1, workers: int = 0, prefetch: int = 4):
        if spec.lanes % dp_size:
            raise ValueError(f"train.lanes={spec.lanes} is not divisible by the data-parallel size {dp_size}")
        self.spec = spec
        self.workers, self.prefetch = workers, prefetch
        per_rank = spec.lanes // dp_size
        self.local_lanes = list(range(dp_rank * per_rank, (dp_rank + 1) * per_rank))
        self.dataset = Dataset(spec.root, spec.on_bad_sample)
        self.shards = self.dataset.shards(spec.split)
        if not self.shards:
            raise DataError(f"dataset {spec.root}: split {spec.split} has no documents")
        if spec.shuffle:
            check_a_shard_per_lane(spec.root, spec.split, self.shards, spec.lanes)
        self.epoch, self.step = 0, 0
        self._plans: dict[int, EpochPlan] = {}

    def plan(self, epoch: int) -> EpochPlan:
        if epoch not in self._plans:
            self._plans = {epoch: plan_epoch(self.spec, self.shards, epoch)}
        return self._plans[epoch]

    def steps_per_epoch(self, epoch: int | None = None) -> int:
        return self.plan(self.epoch if epoch is None else epoch).steps

    def __iter__(self) -> Iterator[Batch]:
        data = _LaneData(self.spec, self.local_lanes, self.epoch, self.step)
        workers = min(self.workers, len(self.local_lanes))
        if workers:
            items = iter(DataLoader(data, batch_size=None, num_workers=workers, prefetch_factor=self.prefetch, collate_fn=_identity))
        else:
            items = iter(data)
        groups = max(workers, 1)
        while True:
            try:
                parts = [next(items) for _ in range(groups)]  # workers answer in turn, in lane order
            except StopIteration:
                return
            for part in parts:
                if isinstance(part, _Failed):
                    raise DataError(part.message)
            self.step += 1
            if self.step == self.steps_per_epoch():
                self.epoch, self.step = self.epoch + 1, 0
            yield Batch.from_packed(np.concatenate(parts))

    def lane_positions(self, epoch: int, step: int) -> list[dict]:
        """Where every global lane stands at the start of `step` of `epoch`."""
        positions = []
        plan = self.plan(epoch)
        for lane in range(self.spec.lanes):
            shard_index, doc_index, offset = lane_position(self.spec, plan.lanes[lane], step)
            shard = plan.lanes[lane][shard_index].number if shard_index < len(plan.lanes[lane]) else None
            positions.append({"lane": lane, "shard": shard, "document": doc_index, "offset": offset})
        return positions

    def state_dict(self) -> dict:
        """The global position: what the next batch will be, for any data-parallel layout."""
        return {
            "split": self.spec.split,
            "epoch": self.epoch,
            "step": self.step,
            "lanes": self.spec.lanes,
            "segment_len": self.spec.segment_len,
            "chunk": self.spec.chunk,
            "seed": self.spec.seed,
            "shuffle": self.spec.shuffle,
            "data": self.dataset.fingerprint,
            "lane_positions": self.lane_positions(self.epoch, self.step),
        }

    def load_state_dict(self, state: dict) -> None:
        for key, mine in (("split", self.spec.split), ("lanes", self.spec.lanes), ("segment_len", self.spec.segment_len),
                          ("chunk", self.spec.chunk), ("seed", self.spec.seed), ("shuffle", self.spec.shuffle),
                          ("data", self.dataset.fingerprint)):
            if state[key] != mine:
                raise DataError(
                    f"loader state: {key} was {state[key]!r}, now {mine!r}; the lane plan would differ, "
                    "so the run cannot resume at the exact token (keep the global batch, segment, chunk, seed and data)"
                )
        if self.lane_positions(state["epoch"], state["step"]) != state["lane_positions"]:
            raise DataError("loader state: the lanes' saved positions differ from this plan's at the same step; "
                            "the lane plan changed, so the run cannot resume at the exact token")
        self.epoch, self.step = state["epoch"], state["step"]


def _identity(item):
    return item
