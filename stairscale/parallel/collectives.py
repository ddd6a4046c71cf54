"""The few collectives the trainer needs: reductions over the data-parallel ranks (no-ops in one
process), and a check that every rank read the same data."""

from __future__ import annotations

import torch
import torch.distributed as dist

from stairscale.errors import DataError
from stairscale.parallel.groups import Layout
from stairscale.train.metrics import Tally


def _data_parallel_group():
    """megatron-core's gloo copy of the data-parallel group: these are small host-side values, and
    an nccl group would need them on the GPU."""
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_group_gloo()


def check_same_data(fingerprint: str, root: str, layout: Layout) -> None:
    """Every rank prepares or opens its dataset on its own (nodes may not share a filesystem):
    refuse to train when they differ, rather than train on mismatched lanes."""
    if not layout.distributed:
        return
    everyone = [None] * layout.world
    dist.all_gather_object(everyone, fingerprint)
    if len(set(everyone)) > 1:
        by_rank = ", ".join(f"rank {rank}: {value}" for rank, value in enumerate(everyone))
        raise DataError(f"dataset {root}: the ranks read different data (fingerprints {by_rank}); "
                        "give every node the same corpus and versions, or one prepared data.dir")


def any_rank(flag: bool, layout: Layout, device: torch.device) -> bool:
    """True on every rank where it is true on any: for a decision only some ranks can make (the
    last pipeline stage holds the scores) that every rank must follow."""
    if not layout.distributed:
        return flag
    value = torch.tensor([int(flag)], device=device)  # on the device the default group's backend needs
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def sum_over_data_parallel(value: int | float | torch.Tensor, layout: Layout) -> int | float | torch.Tensor:
    """The sum over the data-parallel ranks; in one process the value itself (a device tensor stays
    on the device)."""
    if layout.dp == 1:
        return value
    if isinstance(value, torch.Tensor):
        value = value.item()
    total = torch.tensor([value], dtype=torch.float64 if isinstance(value, float) else torch.long)
    dist.all_reduce(total, group=_data_parallel_group())
    return type(value)(total.item())


def sum_tallies(tally: Tally, layout: Layout) -> Tally:
    """The tally of the whole data-parallel group (tensor-parallel ranks hold the same tally)."""
    if layout.dp == 1:
        return tally
    parts = [None] * layout.dp
    dist.all_gather_object(parts, tally, group=_data_parallel_group())
    total = Tally(tally.labelled, tally.byte_level)
    for part in parts:
        total.merge(part)
    return total
