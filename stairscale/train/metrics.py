"""Metrics as the tasks define them: error % over supervised positions, or bits per byte."""

from __future__ import annotations

import math

import numpy as np
from torch import Tensor

from stairscale.data.tasks import IGNORE
from stairscale.model.provider import Scores


class Tally:
    """Sums of loss and errors over supervised positions, also by position in the document."""

    def __init__(self, labelled: bool, byte_level: bool = True):
        self.labelled = labelled
        self.byte_level = byte_level  # language modelling: one target is one byte (bits per byte)
        self.nll = 0.0
        self.count = 0
        self.errors = 0
        self.errors_at = np.zeros(0, dtype=np.int64)  # by position in the document (labelled tasks)
        self.count_at = np.zeros(0, dtype=np.int64)

    @classmethod
    def for_dataset(cls, dataset) -> Tally:
        return cls(dataset.labelled, dataset.byte_level)

    def add(self, scores: Scores, targets: Tensor, doc_pos: Tensor) -> None:
        supervised = targets != IGNORE
        self.nll += float(scores.nll.sum())
        self.count += int(supervised.sum())
        if self.labelled:
            wrong = (scores.predicted[supervised] != targets[supervised]).cpu().numpy()
            positions = doc_pos[supervised].cpu().numpy()
            self.errors += int(wrong.sum())
            size = int(positions.max()) + 1 if len(positions) else 0
            self._grow(size)
            np.add.at(self.errors_at, positions, wrong)
            np.add.at(self.count_at, positions, 1)

    def _grow(self, size: int) -> None:
        if size > len(self.count_at):
            self.errors_at = np.pad(self.errors_at, (0, size - len(self.errors_at)))
            self.count_at = np.pad(self.count_at, (0, size - len(self.count_at)))

    def merge(self, other: Tally) -> None:
        self.nll += other.nll
        self.count += other.count
        self.errors += other.errors
        self._grow(len(other.count_at))
        self.errors_at[: len(other.errors_at)] += other.errors_at
        self.count_at[: len(other.count_at)] += other.count_at

    def error_from(self, start: int, stop: int | None = None) -> float:
        """Error % over supervised positions start <= position < stop of each document."""
        errors, count = self.errors_at[start:stop].sum(), self.count_at[start:stop].sum()
        return 100.0 * errors / count if count else float("nan")

    def summary(self) -> dict[str, float]:
        loss = self.nll / max(self.count, 1)
        out = {"loss": loss, "targets": self.count}
        if self.labelled:
            out["error"] = 100.0 * self.errors / max(self.count, 1)
        else:
            out["perplexity"] = math.exp(loss)
            if self.byte_level:
                out["bpb"] = loss / math.log(2)
        return out

    def error_by_position(self, bucket: int) -> list[tuple[int, float]]:
        """(first position, error %) for each bucket of positions along the document."""
        return [(start, self.error_from(start, start + bucket)) for start in range(0, len(self.count_at), bucket) if self.count_at[start : start + bucket].sum()]


def headline(summary: dict[str, float]) -> str:
    if "error" in summary:
        return f"error {summary['error']:.2f}%"
    if "bpb" in summary:
        return f"bpb {summary['bpb']:.4f}"
    return f"perplexity {summary['perplexity']:.2f}"
