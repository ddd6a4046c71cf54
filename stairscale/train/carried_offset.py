"""Training labels shifted by the model's carried belief, for state tracking on a ring (random walk).

The carried state is detached at segment boundaries, so once a lane's belief has slipped in an
earlier segment no gradient can reach the slip, and every later true label of that walk is out of
reach: the loss then only teaches the model to distrust what it carries. With the carried offset,
each lane remembers the offset (predicted - true position, mod P) it held at the end of its previous
segment, the commonest one over the segment's last BELIEF_TOKENS tokens, and its targets are shifted
by that offset until its next walk starts. Inside a segment the loss is the plain one, so a slip
there is still penalised at every later token back-propagation reaches. Evaluation, and the
training error in the log, use the true labels; the training loss in the log is the one trained
on, with the shifted labels. docs/recipe_trials.md has the trials.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor

from stairscale.data.lanes import Batch
from stairscale.data.tasks import IGNORE

BELIEF_TOKENS = 8


class CarriedOffset:
    """Per-lane offsets of one micro-batch's lanes; labels are first_label + position (0..ring-1)."""

    def __init__(self, ring: int, first_label: int, lanes: int, device: torch.device | str = "cpu"):
        self.ring, self.first_label = ring, first_label
        self.offset = torch.zeros(lanes, dtype=torch.long, device=device)
        self.shifted = self.supervised = 0  # label counts since the last `take_counts` (tensors once counted)

    def shift(self, batch: Batch) -> Batch:
        """The batch with its targets shifted by each lane's offset until the lane's next walk."""
        targets = batch.targets.long()
        before_next_walk = batch.doc_start.long().cumsum(1) == 0
        shift = torch.where(before_next_walk, self.offset[:, None], 0)
        supervised = targets != IGNORE
        shifted = torch.where(supervised, self.first_label + (targets - self.first_label + shift) % self.ring, targets)
        self.shifted += (shifted != targets).sum()  # left on the device: no wait for it here
        self.supervised += supervised.sum()
        return dataclasses.replace(batch, targets=shifted.to(batch.targets.dtype))

    def update(self, batch: Batch, predicted: Tensor) -> None:
        """Carry the belief of this segment (true targets in `batch`) into the lane's next segment.
        Where the segment's tail holds padding or a walk's first token, a lane that started a walk
        in this segment carries 0 and any other lane keeps its offset."""
        true, guess = batch.targets[:, -BELIEF_TOKENS:].long(), predicted[:, -BELIEF_TOKENS:].long()
        usable = (true != IGNORE) & (guess >= self.first_label) & (guess < self.first_label + self.ring)
        offsets = torch.where(usable, (guess - true) % self.ring, 0)
        # The commonest offset, ties to the smallest (argmax takes the first maximum on every
        # device; Tensor.mode breaks ties differently on CUDA).
        belief = F.one_hot(offsets, self.ring).sum(1).argmax(1)
        kept = torch.where(batch.doc_start.any(1), 0, self.offset)
        self.offset = torch.where(usable.all(1), belief, kept)

    def take_counts(self) -> tuple[int, int]:
        """(shifted, supervised) labels since the last call."""
        counts = (int(self.shifted), int(self.supervised))
        self.shifted = self.supervised = 0
        return counts
