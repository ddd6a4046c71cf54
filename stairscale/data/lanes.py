"""Lanes: each batch row is one stream of whole documents, cut into consecutive segments.

A document starts at a chunk boundary: the previous document's tail is padded to a multiple of
the chunk size F with the pad token, which is never a target. The lane packer is the one place
that turns documents into (tokens, targets, doc_start, doc_pos, doc_id) segments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
from torch import Tensor

from stairscale.data.tasks import IGNORE


@dataclass
class Batch:
    tokens: Tensor  # [B, M] token ids
    targets: Tensor  # [B, M] target of the prediction made after reading each token, or IGNORE
    doc_start: Tensor  # [B, M] True at the first token of a document
    doc_pos: Tensor  # [B, M] position of each token in its document, -1 for padding
    doc_id: Tensor  # [B, M] index of each token's document in its split, -1 for padding

    def fields(self) -> tuple[Tensor, ...]:
        return (self.tokens, self.targets, self.doc_start, self.doc_pos, self.doc_id)

    def to(self, device) -> Batch:
        return Batch(*(t.to(device, non_blocking=True) for t in self.fields()))

    def lanes(self, index: slice) -> Batch:
        return Batch(*(t[index] for t in self.fields()))


@dataclass
class Packed:
    """Documents laid out as a lane reads them: each starts at a chunk boundary, tails padded."""

    tokens: np.ndarray
    targets: np.ndarray
    doc_start: np.ndarray
    doc_pos: np.ndarray
    doc_id: np.ndarray

    def columns(self) -> tuple[np.ndarray, ...]:
        return (self.tokens, self.targets, self.doc_start, self.doc_pos, self.doc_id)

    def __len__(self) -> int:
        return len(self.tokens)

    def slice(self, start: int, stop: int) -> tuple[np.ndarray, ...]:
        return tuple(column[start:stop] for column in self.columns())


def padding(length: int, pad_id: int) -> Packed:
    return Packed(
        tokens=np.full(length, pad_id, dtype=np.int64),
        targets=np.full(length, IGNORE, dtype=np.int64),
        doc_start=np.zeros(length, dtype=bool),
        doc_pos=np.full(length, -1, dtype=np.int64),
        doc_id=np.full(length, -1, dtype=np.int64),
    )


def pack(tokens: np.ndarray, labels: np.ndarray | None, lengths: np.ndarray, ids: np.ndarray, chunk: int, pad_id: int) -> Packed:
    """Lay out documents given as one flat token array (and flat aligned labels, or None for
    next-token targets) with their lengths and ids. Vectorised: no Python loop per document."""
    lengths = np.asarray(lengths, dtype=np.int64)
    padded = -(-lengths // chunk) * chunk
    source_start = np.cumsum(lengths) - lengths
    packed_start = np.cumsum(padded) - padded
    doc_of_token = np.repeat(np.arange(len(lengths)), lengths)
    within = np.arange(len(tokens)) - source_start[doc_of_token]
    dest = packed_start[doc_of_token] + within
    if labels is None:
        flat_targets = np.empty(len(tokens), dtype=np.int64)
        flat_targets[:-1] = tokens[1:]
        flat_targets[source_start + lengths - 1] = IGNORE  # a document's last token has no next token
    else:
        flat_targets = labels
    out = padding(int(padded.sum()), pad_id)
    out.tokens[dest] = tokens
    out.targets[dest] = flat_targets
    out.doc_start[packed_start] = True
    out.doc_pos[dest] = within
    out.doc_id[dest] = np.asarray(ids, dtype=np.int64)[doc_of_token]
    return out


class LaneStream:
    """One lane: consecutive segments cut from a sequence of packed blocks, padding at the end."""

    def __init__(self, blocks: Iterator[Packed], pad_id: int):
        self.blocks = blocks
        self.pad_id = pad_id
        self.block: Packed | None = None
        self.cursor = 0

    def take(self, length: int) -> tuple[np.ndarray, ...]:
        parts = []
        while length:
            if self.block is None or self.cursor == len(self.block):
                self.block, self.cursor = next(self.blocks, None), 0
                if self.block is None:  # documents used up: padding from here on
                    self.blocks, self.block = iter(()), padding(length, self.pad_id)
            count = min(length, len(self.block) - self.cursor)
            parts.append(self.block.slice(self.cursor, self.cursor + count))
            self.cursor += count
            length -= count
        if len(parts) == 1:
            return parts[0]
        return tuple(np.concatenate(column) for column in zip(*parts))
