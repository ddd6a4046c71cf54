"""Experiment (not part of the package): pull each chunk's carried row toward the mean carried row
of the same position in the batch, so that the state holds the position and nothing that changes
with depth.

The carried row of a chunk is the first-pass top output of its last token (window n = 2). While
training, the penalty is the mean squared distance of the row from the batch's mean row of the
same true position (detached), added to that token's loss with weight W: on layer-normed rows
(--layer-norm), or on the raw rows relative to the mean row's mean square. Evaluation is unchanged.

usage: python docs/experiments/carried_row_centre.py W CONFIG [--layer-norm] [key=value ...]
See docs/recipe_trials.md, "The bad seeds' carried state drifts with depth".
"""

import sys

import torch
import torch.nn.functional as F
from first_pass_loss import train_with_forward

from stairscale.config import load_config
from stairscale.data.tasks import IGNORE
from stairscale.model.provider import Scores


def centre_penalty(rows: torch.Tensor, positions: torch.Tensor, layer_norm: bool) -> torch.Tensor:
    """Per row [B, K]: squared distance from the batch's mean row of its position (0 unlabelled)."""
    rows = F.layer_norm(rows, rows.shape[-1:]) if layer_norm else rows
    penalty = torch.zeros(positions.shape, device=rows.device)
    for position in positions.unique():
        if position == IGNORE:
            continue
        members = positions == position
        centre = rows[members].mean(0).detach()
        distance = ((rows - centre) ** 2).mean(-1)
        penalty = penalty + members * (distance if layer_norm else distance / (centre**2).mean())
    return penalty


def forward_with_centre_penalty(weight: float, layer_norm: bool):
    def forward(self, tokens, doc_start, targets, state):
        final, state = self.body(tokens, doc_start, state)
        scores = self.head(final, targets)
        if self.training:
            last = slice(self.cfg.chunk - 1, None, self.cfg.chunk)
            rows = torch.cat(self.schedule.first_pass, dim=1)[:, last]
            nll = scores.nll.clone()
            nll[:, last] += weight * centre_penalty(rows, targets[:, last].long(), layer_norm)
            scores = Scores(nll, scores.predicted)
        return scores, state

    return forward


def main(argv: list[str]) -> None:
    weight, config, *rest = argv
    cfg = load_config(config, [arg for arg in rest if arg != "--layer-norm"])
    train_with_forward(cfg, forward_with_centre_penalty(float(weight), "--layer-norm" in rest))


if __name__ == "__main__":
    main(sys.argv[1:])
