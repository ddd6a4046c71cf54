"""Experiment (not part of the package): fine-tune a trained random-walk run on long walks, with the
labels of each segment shifted by the model's belief carried in from earlier segments.

A tracking slip in an earlier segment makes every later label of that walk unreachable: the carried
state is detached at segment boundaries, so no gradient can reach the slip, and the loss after it
only teaches the model to hedge. Here each lane keeps the offset (predicted - true position, mod P)
that the model held at the end of its previous segment (the commonest one over the segment's last
8 tokens), and the segment's targets, until the lane's next walk starts, are shifted by it. Inside a
segment the loss is the plain one, so a slip there is still penalised at every later token that
back-propagation can reach. Evaluation and the reported training error use the true labels.

usage: python docs/experiments/carried_offset_finetune.py INIT_RUN_DIR CONFIG [--plain] [key=value ...]
  INIT_RUN_DIR  a finished random-walk run whose weights to start from
  --plain       the same fine-tune with the true labels (the baseline)
See docs/reproducing.md, "Fine-tuning on long walks with the carried offset".
"""

import sys

import torch

from stairscale.config import load_config
from stairscale.data.prepare import build_task
from stairscale.data.tasks import IGNORE, RandomWalkTask
from stairscale.model.lm import StaircaseLM
from stairscale.train.checkpoint import load_checkpoint
from stairscale.train.trainer import Trainer

BELIEF_TOKENS = 8


def shift_by_carried_offset(task: RandomWalkTask, doc_start, targets, predicted, offset):
    """The segment's targets shifted by each lane's carried offset (until the lane's next walk), and
    the offset to carry on: the commonest (predicted - true) over the last BELIEF_TOKENS tokens."""
    ring, first = task.positions, task.first_position_id
    before_next_walk = doc_start.long().cumsum(1) == 0
    shift = torch.where(before_next_walk, offset[:, None], torch.zeros_like(targets))
    shifted = torch.where(targets != IGNORE, first + (targets - first + shift) % ring, targets)
    tail_true, tail_predicted = targets[:, -BELIEF_TOKENS:], predicted[:, -BELIEF_TOKENS:]
    usable = (tail_true != IGNORE) & (tail_predicted >= first) & (tail_predicted < first + ring)
    belief = torch.where(usable, (tail_predicted - tail_true) % ring, torch.zeros_like(tail_true)).mode(dim=1).values
    kept = torch.where(doc_start.any(1), torch.zeros_like(offset), offset)
    return shifted, torch.where(usable.all(1), belief, kept)


class CarriedOffset:
    task: RandomWalkTask
    offset: torch.Tensor | None = None
    shifted = total = 0


def forward_with_carried_offset(self, tokens, doc_start, targets, state):
    final, state = self.body(tokens, doc_start, state)
    if not self.training:
        return self.head(final, targets), state
    with torch.no_grad():
        predicted = self.head.logprobs(final).argmax(-1)
        if CarriedOffset.offset is None or len(CarriedOffset.offset) != len(tokens):
            CarriedOffset.offset = torch.zeros(len(tokens), dtype=torch.long, device=tokens.device)
        shifted, CarriedOffset.offset = shift_by_carried_offset(CarriedOffset.task, doc_start, targets.long(), predicted, CarriedOffset.offset)
        supervised = targets != IGNORE
        CarriedOffset.shifted += int((shifted != targets)[supervised].sum())
        CarriedOffset.total += int(supervised.sum())
    return self.head(final, shifted.to(targets.dtype)), state


class CarriedOffsetTrainer(Trainer):
    def _log_progress(self, progress, done, lr, grad_norm):
        if CarriedOffset.total:
            self.log(f"  shifted labels: {100 * CarriedOffset.shifted / CarriedOffset.total:.1f}% of targets")
            CarriedOffset.shifted = CarriedOffset.total = 0
        super()._log_progress(progress, done, lr, grad_norm)


def main(argv: list[str]) -> None:
    init_run, config, *rest = argv
    if "--plain" in rest:
        rest.remove("--plain")
    else:
        StaircaseLM.forward = forward_with_carried_offset
    cfg = load_config(config, rest)
    CarriedOffset.task = build_task(cfg.task)
    if not isinstance(CarriedOffset.task, RandomWalkTask):
        raise SystemExit(f"{config}: task.name is {cfg.task.name!r}; the carried offset needs random_walk")
    trainer = CarriedOffsetTrainer(cfg)
    trainer.model.load_state_dict(load_checkpoint(init_run)["model"])
    trainer.train()


if __name__ == "__main__":
    main(sys.argv[1:])
