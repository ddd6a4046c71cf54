"""Lanes: each batch row is one stream of whole documents, cut into consecutive segments.

A document starts at a chunk boundary: the previous document's tail is padded to a multiple of
the chunk size F with the pad token, which is never a target. The lane packer is the one place
that turns documents into (tokens, targets, doc_start, doc_pos) segments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from stairscale.data.tasks import IGNORE, Document


@dataclass
class Batch:
    tokens: Tensor  # [B, M] token ids
    targets: Tensor  # [B, M] target of the prediction made after reading each token, or IGNORE
    doc_start: Tensor  # [B, M] True at the first token of a document
    doc_pos: Tensor  # [B, M] position of each token in its document, -1 for padding

    def to(self, device) -> Batch:
        return Batch(*(t.to(device, non_blocking=True) for t in (self.tokens, self.targets, self.doc_start, self.doc_pos)))

    def lanes(self, index: slice) -> Batch:
        return Batch(self.tokens[index], self.targets[index], self.doc_start[index], self.doc_pos[index])


def document_targets(doc: Document) -> np.ndarray:
    """Aligned labels for labelled tasks; next-token targets for language modelling."""
    if doc.labels is not None:
        return doc.labels.astype(np.int64)
    targets = np.full(len(doc.tokens), IGNORE, dtype=np.int64)
    targets[:-1] = doc.tokens[1:]
    return targets


class LaneStream:
    """Packs one lane's documents into consecutive segments of `segment_len` tokens."""

    def __init__(self, documents: Iterator[Document], chunk: int, pad_id: int):
        self.documents = documents
        self.chunk = chunk
        self.pad_id = pad_id
        self.pieces: list[tuple[np.ndarray, ...]] = []  # (tokens, targets, doc_start, doc_pos)
        self.buffered = 0
        self.exhausted = False

    def _add_document(self, doc: Document) -> None:
        length = len(doc.tokens)
        if length == 0:
            raise ValueError("empty document: it has no tokens to predict")
        padded = -(-length // self.chunk) * self.chunk
        tokens = np.full(padded, self.pad_id, dtype=np.int64)
        tokens[:length] = doc.tokens
        targets = np.full(padded, IGNORE, dtype=np.int64)
        targets[:length] = document_targets(doc)
        start = np.zeros(padded, dtype=bool)
        start[0] = True
        pos = np.full(padded, -1, dtype=np.int64)
        pos[:length] = np.arange(length)
        self.pieces.append((tokens, targets, start, pos))
        self.buffered += padded

    def take(self, length: int) -> tuple[np.ndarray, ...]:
        """The next `length` positions; padding once the documents run out."""
        while self.buffered < length and not self.exhausted:
            doc = next(self.documents, None)
            if doc is None:
                self.exhausted = True
            else:
                self._add_document(doc)
        if self.buffered < length:
            missing = length - self.buffered
            self.pieces.append(
                (
                    np.full(missing, self.pad_id, dtype=np.int64),
                    np.full(missing, IGNORE, dtype=np.int64),
                    np.zeros(missing, dtype=bool),
                    np.full(missing, -1, dtype=np.int64),
                )
            )
            self.buffered = length
        joined = [np.concatenate(parts) for parts in zip(*self.pieces)]
        out = [a[:length] for a in joined]
        rest = [a[length:] for a in joined]
        self.pieces = [tuple(rest)] if len(rest[0]) else []
        self.buffered = len(rest[0])
        return tuple(out)

    @property
    def finished(self) -> bool:
        return self.exhausted and self.buffered == 0


def lane_batches(sources: list[Iterator[Document]], segment_len: int, chunk: int, pad_id: int) -> Iterator[Batch]:
    """Segments of all lanes in lockstep, until every lane's documents are used up.

    For infinite sources this never ends; for finite ones (evaluation) lanes that finish early
    are padded until the longest lane is done.
    """
    lanes = [LaneStream(source, chunk, pad_id) for source in sources]
    while True:
        parts = [lane.take(segment_len) for lane in lanes]
        if not any((part[3] >= 0).any() for part in parts):  # nothing but padding left
            return
        yield Batch(*(torch.from_numpy(np.stack(column)) for column in zip(*parts)))


def deal(documents: list[Document], lanes: int) -> list[list[Document]]:
    """Deal documents to lanes, each to the lane with the fewest tokens so far (balanced, in order)."""
    loads = [0] * lanes
    dealt: list[list[Document]] = [[] for _ in range(lanes)]
    for doc in documents:
        lane = loads.index(min(loads))
        dealt[lane].append(doc)
        loads[lane] += len(doc.tokens)
    return dealt
