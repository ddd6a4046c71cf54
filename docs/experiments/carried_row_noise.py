"""Experiment (not part of the package): train a Staircase with Gaussian noise on the rows it carries.

Each core call's top outputs, but for the chunk that has had its last pass, become the next
call's backward rows (the older chunks' inputs and the state the new chunk reads). While
training, noise of standard deviation SIGMA per dimension (with --relative: SIGMA times each row's
root mean square) is added to them, so the model has to keep its state where a small error is
corrected rather than carried along. Evaluation is unchanged.

usage: python docs/experiments/carried_row_noise.py SIGMA CONFIG [--relative] [key=value ...]
See docs/reproducing.md, "The first-stage profile marks a good run; training for it does not
make one".
"""

import sys

import torch

from stairscale.config import load_config
from stairscale.model.lm import StaircaseLM
from stairscale.model.schedules import StaircaseSchedule
from stairscale.train.trainer import Trainer

plain_steps = StaircaseSchedule.steps
plain_body = StaircaseLM.body


def steps_with_noisy_rows(self, x, pos, doc, carried):
    """The schedule's own core calls, with noise added in training to the top outputs that are
    carried to the next call (not to the chunk that has had its last pass)."""
    inner = plain_steps(self, x, pos, doc, carried)
    call = next(inner)
    for step in range(x.shape[1] // self.chunk + self.window - 1):
        top, layer_inputs = yield call
        if self.noise:
            final = top[:, : self.chunk] if step >= self.window - 1 else top[:, :0]
            carried_on = top[:, final.shape[1] :]
            scale = carried_on.pow(2).mean(-1, keepdim=True).sqrt().detach() if self.relative else 1.0
            top = torch.cat([final, carried_on + self.noise * scale * torch.randn_like(carried_on)], dim=1)
        try:
            call = inner.send((top, layer_inputs))
        except StopIteration as finished:
            return finished.value


def body_with_noise(sigma: float, relative: bool):
    def body(self, tokens, doc_start, state):
        self.schedule.noise = sigma if self.training else 0.0
        self.schedule.relative = relative
        return plain_body(self, tokens, doc_start, state)

    return body


def main(argv: list[str]) -> None:
    sigma, config, *rest = argv
    cfg = load_config(config, [arg for arg in rest if arg != "--relative"])
    if cfg.model.schedule != "staircase":
        sys.exit(f"{sys.argv[0]}: needs model.schedule staircase")
    StaircaseSchedule.steps = steps_with_noisy_rows
    StaircaseLM.body = body_with_noise(float(sigma), "--relative" in rest)
    Trainer(cfg).train()


if __name__ == "__main__":
    main(sys.argv[1:])
