"""Experiment (not part of the package): supervise the rows a Staircase carries to the next chunk.

With window n = 2, a chunk's first-pass top outputs are what the next chunk reads (as the layer
inputs of the older chunk's second pass); only the second pass reaches the loss. This script adds,
while training, the output head's loss on each token's first-pass output, weighted W, so the
carried rows themselves must name the position. Evaluation is unchanged.

usage: python docs/experiments/first_pass_loss.py W CONFIG [key=value ...]
See docs/recipe_trials.md, "Supervising the carried rows does not help".
"""

import sys

import torch

from stairscale.config import load_config
from stairscale.model.lm import StaircaseLM
from stairscale.model.provider import Scores
from stairscale.model.schedules import StaircaseSchedule
from stairscale.train.trainer import Trainer

plain_steps = StaircaseSchedule.steps


def steps_with_top_hook(on_top):
    """StaircaseSchedule.steps with `on_top(schedule, step, new_chunk, top)` given each core call's
    top outputs, and what it returns sent on in their place (new_chunk: the call has a new chunk)."""

    def steps(self, x, pos, doc, carried):
        inner = plain_steps(self, x, pos, doc, carried)
        chunks = x.shape[1] // self.chunk
        call = next(inner)
        for step in range(chunks + self.window - 1):
            top, layer_inputs = yield call
            top = on_top(self, step, step < chunks, top)
            try:
                call = inner.send((top, layer_inputs))
            except StopIteration as finished:
                return finished.value

    return steps


def keep_first_pass(schedule, step, new_chunk, top):
    if step == 0:
        schedule.first_pass = []
    if new_chunk:
        schedule.first_pass.append(top[:, -schedule.chunk :])  # the new chunk sits last in the window
    return top


steps_keeping_first_pass = steps_with_top_hook(keep_first_pass)


def forward_with_first_pass_loss(weight: float):
    def forward(self, tokens, doc_start, targets, state):
        final, state = self.body(tokens, doc_start, state)
        scores = self.head(final, targets)
        if self.training:
            first = self.head(torch.cat(self.schedule.first_pass, dim=1), targets)
            scores = Scores(scores.nll + weight * first.nll, scores.predicted)
        return scores, state

    return forward


def train_with_forward(cfg, forward) -> None:
    """Train `cfg` with the schedule keeping its first-pass rows and the model's forward replaced."""
    if cfg.model.schedule != "staircase" or cfg.model.window != 2:
        sys.exit(f"{sys.argv[0]}: needs model.schedule staircase with model.window 2")
    StaircaseSchedule.steps = steps_keeping_first_pass
    StaircaseLM.forward = forward
    Trainer(cfg).train()


def main(argv: list[str]) -> None:
    weight, config, *overrides = argv
    train_with_forward(load_config(config, overrides), forward_with_first_pass_loss(float(weight)))


if __name__ == "__main__":
    main(sys.argv[1:])
