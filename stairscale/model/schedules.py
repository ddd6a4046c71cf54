"""Schedules: which rows the core sees at each call and what is carried to the next segment.

Both schedules take the segment's token embeddings x [B, M, d] with positions pos [M] and key
document ids doc [B, M], plus the rows carried in from the previous segment, and return the final
top-layer rows [B, M, d] (each token exactly once) and the rows to carry out (detached).

A schedule is written as a generator of core calls (`steps`): it yields CoreCall(queries, pos, doc,
context) and is sent back (top outputs, per-layer inputs). In one process `run` answers each call
with the whole core; the pipeline (parallel/pipeline.py) answers it stage by stage, interleaving
the generators of several micro-batches, with the same schedule code.
"""

from __future__ import annotations

from typing import Generator, NamedTuple

import torch
from torch import Tensor

from stairscale.config import ModelConfig
from stairscale.model.core import Core
from stairscale.model.state import Rows


class CoreCall(NamedTuple):
    queries: Tensor  # [B, T, d] layer-0 inputs of the query rows
    pos: Tensor  # [T]
    doc: Tensor  # [B, T]
    context: Rows | None  # earlier rows the queries may attend to


Steps = Generator[CoreCall, tuple[Tensor, Tensor], tuple[Tensor, dict[str, Rows]]]


def run(core: Core, steps: Steps) -> tuple[Tensor, dict[str, Rows]]:
    """Drive a schedule's core calls with the whole core (single device, or tensor parallel)."""
    call = next(steps)
    while True:
        try:
            call = steps.send(core(*call))
        except StopIteration as finished:
            return finished.value


class StaircaseSchedule:
    """Staircase (Fig. 1a), and with a cache of final rows, Cached / Global Cached (Fig. 1b, 1c).

    Step s of a segment of K chunks holds the window of chunks max(0, s-n+1) .. min(s, K-1): the
    new chunk s as embeddings, older chunks as their top outputs from step s-1. Steps K .. K+n-2
    are drain steps with no new chunk. Rows from before the segment are not recomputed: for its
    first n-1 steps the segment reads them from the carried "step{s}" rows, which hold exactly the
    per-layer key/value context those rows had in the previous segment's drain step K'+s (K' its
    chunk count). Cached and Global Cached run the same code: what differs is how long a cache
    their configs ask for (docs/model.md).
    """

    def __init__(self, cfg: ModelConfig):
        self.chunk = cfg.chunk
        self.window = cfg.window
        self.cache_len = cfg.cache_len

    def count(self, segment_len: int) -> int:
        """Core calls per segment."""
        return segment_len // self.chunk + self.window - 1

    def rows(self, step: int, segment_len: int) -> int:
        """Query rows of core call `step`: the chunks of its window."""
        oldest, newest = self._window(step, segment_len // self.chunk)
        return (newest - oldest + 1) * self.chunk

    def _window(self, step: int, chunks: int) -> tuple[int, int]:
        """The oldest and the newest chunk of step `step`'s window."""
        return max(0, step - self.window + 1), min(step, chunks - 1)

    def steps(self, x: Tensor, pos: Tensor, doc: Tensor, carried: dict[str, Rows]) -> Steps:
        F, n = self.chunk, self.window
        if x.shape[1] % F:
            raise ValueError(f"a segment of {x.shape[1]} tokens is not a whole number of chunks of {F}")
        K = x.shape[1] // F
        cache = carried.get("cache")
        finals, carry_out = [], {}
        previous_top = None
        for s in range(K + n - 1):
            oldest, newest = self._window(s, K)
            queries = []
            if previous_top is not None:
                # Drop the chunk that became final at step s-1.
                queries.append(previous_top[:, F:] if s >= n else previous_top)
            if s < K:
                queries.append(x[:, s * F : (s + 1) * F])
            rows = slice(oldest * F, (newest + 1) * F)
            from_before = carried.get(f"step{s}")
            visible_cache = None
            if cache is not None:
                # The cache ends where this step's window starts, except in the first n-1 steps,
                # whose windows start before the segment and overlap the cache's last rows.
                visible_cache = cache.last(self.cache_len, skip=max(0, n - 1 - s) * F)
            top, layer_inputs = yield CoreCall(torch.cat(queries, dim=1), pos[rows], doc[:, rows], Rows.cat([visible_cache, from_before]))
            if s >= K:
                drain_context = Rows.cat([from_before, Rows(layer_inputs, pos[rows], doc[:, rows])])
                carry_out[f"step{s - K}"] = drain_context.detach()
            if s >= n - 1:  # the oldest chunk has had its n-th pass
                finals.append(top[:, :F])
                if self.cache_len:
                    final_rows = Rows(top[None, :, :F], pos[rows][:F], doc[:, rows][:, :F])
                    cache = Rows.cat([cache, final_rows]).last(self.cache_len + (n - 1) * F)
            previous_top = top
        if self.cache_len:
            carry_out["cache"] = cache.detach()
        return torch.cat(finals, dim=1), carry_out


class LadderSchedule:
    """Transformer (R=1), Transformer-XL (R=1, mem_len>0) and Ladder (R>1): the core R times
    over the whole segment; with memory, each (repeat, layer) attends to its own detached
    memory of earlier layer inputs."""

    def __init__(self, cfg: ModelConfig):
        self.repeats = cfg.repeats
        self.mem_len = cfg.mem_len

    def count(self, segment_len: int) -> int:
        return self.repeats

    def rows(self, step: int, segment_len: int) -> int:
        return segment_len

    def steps(self, x: Tensor, pos: Tensor, doc: Tensor, carried: dict[str, Rows]) -> Steps:
        carry_out = {}
        for r in range(self.repeats):
            memory = carried.get(f"memory{r}")
            x, layer_inputs = yield CoreCall(x, pos, doc, memory)
            if self.mem_len:
                carry_out[f"memory{r}"] = Rows.cat([memory, Rows(layer_inputs, pos, doc)]).last(self.mem_len).detach()
        return x, carry_out


def make_schedule(cfg: ModelConfig) -> StaircaseSchedule | LadderSchedule:
    if cfg.is_staircase:
        return StaircaseSchedule(cfg)
    return LadderSchedule(cfg)
