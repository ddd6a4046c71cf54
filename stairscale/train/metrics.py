"""Metrics as the tasks define them: error % over supervised positions, or bits per byte."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from stairscale.data.tasks import IGNORE
from stairscale.model.provider import Scores


class Tally:
    """Sums of loss and errors over supervised positions, also by position in the document.

    What needs the model's outputs (loss, errors) is summed where the outputs are, on the device,
    and read back only when a total is asked for: adding a batch never waits for the GPU. What the
    batch alone tells (which positions are supervised) is counted on the host.
    """

    def __init__(self, labelled: bool, byte_level: bool):
        self.labelled = labelled
        self.byte_level = byte_level  # language modelling: one target is one byte (bits per byte)
        self.count = 0
        self.count_at = np.zeros(0, dtype=np.int64)  # supervised targets by position in the document
        self._nll = 0.0
        self._errors_at = np.zeros(0, dtype=np.int64)  # by position (labelled tasks)
        self._device_nll: Tensor | None = None  # summed on the device, not yet read back
        self._device_errors_at: Tensor | None = None

    @classmethod
    def for_dataset(cls, dataset) -> Tally:
        return cls(dataset.labelled, dataset.byte_level)

    def add(self, scores: Scores, targets: Tensor, doc_pos: Tensor) -> None:
        """Add one batch: scores on the model's device, targets and doc_pos [B, M] on the host."""
        supervised = targets != IGNORE
        self.count += int(supervised.sum())
        nll = scores.nll.sum(dtype=torch.float64)
        self._device_nll = nll if self._device_nll is None else self._device_nll + nll
        if self.labelled:
            positions = doc_pos[supervised].numpy()
            self._grow(int(positions.max()) + 1 if len(positions) else 0)
            np.add.at(self.count_at, positions, 1)
            self._add_errors(scores.predicted, targets, doc_pos.masked_fill(~supervised, len(self.count_at)))

    def _add_errors(self, predicted: Tensor, targets: Tensor, slot: Tensor) -> None:
        """Errors by position, on the device; slot is each target's position, or one past the
        last for unsupervised positions."""
        device = predicted.device
        wrong = predicted != targets.to(device, non_blocking=True)
        errors = torch.zeros(len(self.count_at) + 1, dtype=torch.long, device=device)
        errors.index_add_(0, slot.to(device, non_blocking=True).flatten(), wrong.flatten().long())
        errors = errors[:-1]
        if self._device_errors_at is not None:
            errors[: len(self._device_errors_at)] += self._device_errors_at
        self._device_errors_at = errors

    def _read_back(self) -> None:
        """Move what was summed on the device into the host totals (the one place that waits)."""
        if self._device_nll is not None:
            self._nll += float(self._device_nll)
            self._device_nll = None
        if self._device_errors_at is not None:
            errors = self._device_errors_at.cpu().numpy()
            self._grow(len(errors))
            self._errors_at[: len(errors)] += errors
            self._device_errors_at = None

    @property
    def nll(self) -> float:
        self._read_back()
        return self._nll

    @property
    def errors_at(self) -> np.ndarray:
        self._read_back()
        return self._errors_at

    @property
    def errors(self) -> int:
        return int(self.errors_at.sum())

    def __getstate__(self) -> dict:  # pickled to be summed over ranks: host values only
        self._read_back()
        return self.__dict__

    def _grow(self, size: int) -> None:
        if size > len(self.count_at):
            self._errors_at = np.pad(self._errors_at, (0, size - len(self._errors_at)))
            self.count_at = np.pad(self.count_at, (0, size - len(self.count_at)))

    def merge(self, other: Tally) -> None:
        self._read_back()
        self._nll += other.nll
        self.count += other.count
        self._grow(len(other.count_at))
        self._errors_at[: len(other.errors_at)] += other.errors_at
        self.count_at[: len(other.count_at)] += other.count_at

    def error_from(self, start: int, stop: int | None = None) -> float:
        """Error % over supervised positions start <= position < stop of each document."""
        errors, count = self.errors_at[start:stop].sum(), self.count_at[start:stop].sum()
        return 100.0 * errors / count if count else float("nan")

    def summary(self) -> dict[str, float]:
        """Loss and the task's metric; NaN where no target was counted (nothing was measured)."""
        loss = self.nll / self.count if self.count else float("nan")
        out = {"loss": loss, "targets": self.count}
        if self.labelled:
            out["error"] = self.error_from(0)
        else:
            out["perplexity"] = math.inf if loss > 709 else math.exp(loss)  # exp overflows a float beyond 709.78
            if self.byte_level:
                out["bpb"] = loss / math.log(2)
        return out

    def error_by_position(self, bucket: int) -> list[tuple[int, float]]:
        """(first position, error %) for each bucket of positions along the document."""
        starts = range(0, len(self.count_at), bucket)
        return [(start, self.error_from(start, start + bucket)) for start in starts if self.count_at[start : start + bucket].sum()]


def headline(summary: dict[str, float]) -> str:
    if "error" in summary:
        return f"error {summary['error']:.2f}%"
    if "bpb" in summary:
        return f"bpb {summary['bpb']:.4f}"
    return f"perplexity {summary['perplexity']:.2f}"
