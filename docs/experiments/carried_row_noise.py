"""Experiment (not part of the package): train a Staircase with Gaussian noise on the rows it carries.

Each core call's top outputs, but for the chunk that has had its last pass, become the next
call's backward rows (the older chunks' inputs and the state the new chunk reads). While
training, noise of standard deviation SIGMA per dimension (with --relative: SIGMA times each row's
root mean square) is added to them, so the model has to keep its state where a small error is
corrected rather than carried along. Evaluation is unchanged.

usage: python docs/experiments/carried_row_noise.py SIGMA CONFIG [--relative] [key=value ...]
See docs/recipe_trials.md, "The first-stage profile marks a good run; training for it does not
make one".
"""

import sys

import torch
from first_pass_loss import steps_with_top_hook

from stairscale.config import load_config
from stairscale.model.lm import StaircaseLM
from stairscale.model.schedules import StaircaseSchedule
from stairscale.train.trainer import Trainer

plain_body = StaircaseLM.body


def noisy_rows(sigma: float, relative: bool):
    """A top hook (first_pass_loss.steps_with_top_hook) adding noise, in training, to the rows
    carried to the next call: all but the chunk that has had its last pass."""

    def on_top(schedule, step, new_chunk, top):
        if not schedule.training:
            return top
        final = schedule.chunk if step >= schedule.window - 1 else 0
        carried_on = top[:, final:]
        scale = carried_on.pow(2).mean(-1, keepdim=True).sqrt().detach() if relative else 1.0
        return torch.cat([top[:, :final], carried_on + sigma * scale * torch.randn_like(carried_on)], dim=1)

    return on_top


def body_telling_schedule_training(self, tokens, doc_start, state):
    self.schedule.training = self.training
    return plain_body(self, tokens, doc_start, state)


def main(argv: list[str]) -> None:
    sigma, config, *rest = argv
    cfg = load_config(config, [arg for arg in rest if arg != "--relative"])
    if cfg.model.schedule != "staircase":
        sys.exit(f"{sys.argv[0]}: needs model.schedule staircase")
    StaircaseSchedule.steps = steps_with_top_hook(noisy_rows(float(sigma), "--relative" in rest))
    StaircaseLM.body = body_telling_schedule_training
    Trainer(cfg).train()


if __name__ == "__main__":
    main(sys.argv[1:])
