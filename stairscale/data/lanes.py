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
    doc_id: Tensor  # [B, M] index of each token's document in its split, -1 for padding

    def fields(self) -> tuple[Tensor, ...]:
        return (self.tokens, self.targets, self.doc_start, self.doc_pos, self.doc_id)

    def to(self, device) -> Batch:
        return Batch(*(t.to(device, non_blocking=True) for t in self.fields()))

    def lanes(self, index: slice) -> Batch:
        return Batch(*(t[index] for t in self.fields()))


def document_targets(doc: Document) -> np.ndarray:
    """Aligned labels for labelled tasks; next-token targets for language modelling."""
    if doc.labels is not None:
        return doc.labels.astype(np.int64)
    targets = np.full(len(doc.tokens), IGNORE, dtype=np.int64)
    targets[:-1] = doc.tokens[1:]
    return targets


class LaneStream:
    """Packs one lane's (document id, document) pairs into consecutive segments."""

    def __init__(self, documents: Iterator[tuple[int, Document]], chunk: int, pad_id: int):
        self.documents = documents
        self.chunk = chunk
        self.pad_id = pad_id
        self.pieces: list[tuple[np.ndarray, ...]] = []  # (tokens, targets, doc_start, doc_pos, doc_id)
        self.buffered = 0
        self.exhausted = False

    def _add_document(self, doc_id: int, doc: Document) -> None:
        length = len(doc.tokens)
        padded = -(-length // self.chunk) * self.chunk
        tokens = np.full(padded, self.pad_id, dtype=np.int64)
        tokens[:length] = doc.tokens
        targets = np.full(padded, IGNORE, dtype=np.int64)
        targets[:length] = document_targets(doc)
        start = np.zeros(padded, dtype=bool)
        start[0] = True
        pos = np.full(padded, -1, dtype=np.int64)
        pos[:length] = np.arange(length)
        ids = np.full(padded, -1, dtype=np.int64)
        ids[:length] = doc_id
        self.pieces.append((tokens, targets, start, pos, ids))
        self.buffered += padded

    def take(self, length: int) -> tuple[np.ndarray, ...]:
        """The next `length` positions; padding once the documents run out."""
        while self.buffered < length and not self.exhausted:
            item = next(self.documents, None)
            if item is None:
                self.exhausted = True
            else:
                self._add_document(*item)
        if self.buffered < length:
            missing = length - self.buffered
            self.pieces.append(
                (
                    np.full(missing, self.pad_id, dtype=np.int64),
                    np.full(missing, IGNORE, dtype=np.int64),
                    np.zeros(missing, dtype=bool),
                    np.full(missing, -1, dtype=np.int64),
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
