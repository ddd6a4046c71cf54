"""Lanes: each batch row is one stream of whole documents, cut into consecutive segments.

A document starts at a chunk boundary: the previous document's tail is padded to a multiple of
the chunk size F with the pad token, which is never a target. The lane packer is the one place
that turns documents into (tokens, targets, doc_start, doc_pos, doc_id) segments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from stairscale.data.tasks import IGNORE


FIELDS = ("tokens", "targets", "doc_start", "doc_pos", "doc_id")  # the rows of a packed array
PACKED = np.int32  # a lane holds a whole shard packed: 20 bytes per token, not 40 (batches are int64)


@dataclass
class Batch:
    tokens: Tensor  # [B, M] token ids
    targets: Tensor  # [B, M] target of the prediction made after reading each token, or IGNORE
    doc_start: Tensor  # [B, M] True at the first token of a document
    doc_pos: Tensor  # [B, M] position of each token in its document, -1 for padding
    doc_id: Tensor  # [B, M] index of each token's document in its split, -1 for padding

    @classmethod
    def from_packed(cls, lanes: np.ndarray) -> Batch:
        """From packed segments of B lanes, [B, len(FIELDS), M]."""
        column = {name: torch.from_numpy(lanes[:, i].astype(np.int64)) for i, name in enumerate(FIELDS)}
        column["doc_start"] = column["doc_start"].bool()
        return cls(**column)

    def fields(self) -> tuple[Tensor, ...]:
        return tuple(getattr(self, name) for name in FIELDS)

    def to(self, device) -> Batch:
        return Batch(*(t.to(device, non_blocking=True) for t in self.fields()))

    def split(self, parts: int) -> list[Batch]:
        """`parts` micro-batches of consecutive lanes (lanes are independent streams)."""
        return [Batch(*fields) for fields in zip(*(t.chunk(parts) for t in self.fields()))]


def padding(length: int, pad_id: int) -> np.ndarray:
    """`length` positions of padding, one row per field of FIELDS."""
    out = np.empty((len(FIELDS), length), dtype=PACKED)
    out[:] = np.array([pad_id, IGNORE, 0, -1, -1])[:, None]
    return out


def pack(tokens: np.ndarray, labels: np.ndarray | None, lengths: np.ndarray, ids: np.ndarray, chunk: int, pad_id: int) -> np.ndarray:
    """Lay out documents as a lane reads them: each starts at a chunk boundary, tails padded.

    Documents come as one flat token array (and flat aligned labels, or None for next-token
    targets) with their lengths and ids; the result has one row per field of FIELDS.
    Vectorised: no Python loop per document."""
    lengths = np.asarray(lengths, dtype=np.int64)
    ids = np.asarray(ids, dtype=np.int64)
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
    out[0, dest] = tokens
    out[1, dest] = flat_targets
    out[2, packed_start] = 1
    out[3, dest] = within
    out[4, dest] = ids[doc_of_token]
    skipped = ids < 0  # bad samples skipped under on_bad_sample="skip": padding in their place
    if skipped.any():
        out[:, dest[skipped[doc_of_token]]] = padding(1, pad_id)
        out[2, packed_start[skipped]] = 0
    return out


class LaneStream:
    """One lane: consecutive segments cut from a sequence of packed blocks, padding at the end."""

    def __init__(self, blocks: Iterator[np.ndarray], pad_id: int):
        self.blocks = blocks
        self.pad_id = pad_id
        self.block: np.ndarray | None = None
        self.cursor = 0

    def take(self, length: int) -> np.ndarray:
        """The next `length` positions, [len(FIELDS), length]."""
        parts = []
        while length:
            if self.block is None or self.cursor == self.block.shape[1]:
                self.block, self.cursor = next(self.blocks, None), 0
                if self.block is None:  # documents used up: padding from here on
                    self.blocks, self.block = iter(()), padding(length, self.pad_id)
            count = min(length, self.block.shape[1] - self.cursor)
            parts.append(self.block[:, self.cursor : self.cursor + count])
            self.cursor += count
            length -= count
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
