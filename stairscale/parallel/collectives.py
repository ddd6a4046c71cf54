"""The few reductions the trainer needs over the data-parallel ranks (no-ops in one process)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from stairscale.parallel.groups import Layout
from stairscale.train.metrics import Tally


def _data_parallel_group():
    """megatron-core's gloo copy of the data-parallel group: these are small host-side values, and
    an nccl group would need them on the GPU."""
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_group_gloo()


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
