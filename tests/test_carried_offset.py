"""Training on labels shifted by the carried offset (train/carried_offset.py)."""

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from stairscale.config import load_config
from stairscale.data.lanes import Batch
from stairscale.data.tasks import IGNORE
from stairscale.errors import ConfigError
from stairscale.train.carried_offset import BELIEF_TOKENS, CarriedOffset
from stairscale.train.metrics import Tally
from stairscale.train.trainer import Trainer

RING, FIRST = 8, 5  # the random walk's ring and the token id of position 0


def walk_batch(positions: list[list[int]], doc_start: list[list[bool]]) -> Batch:
    """Lanes whose labels are the given positions (-1: no label)."""
    targets = torch.tensor([[FIRST + p if p >= 0 else IGNORE for p in lane] for lane in positions])
    starts = torch.tensor(doc_start)
    zeros = torch.zeros_like(targets)
    return Batch(zeros, targets, starts, zeros, zeros)


def test_shift_moves_each_lanes_labels_until_its_next_walk():
    shifts = CarriedOffset(RING, FIRST, lanes=2)
    shifts.offset = torch.tensor([3, 6])
    batch = walk_batch([[7, 0, 1, 2, 3], [1, 2, -1, 0, 1]], [[False] * 5, [False, False, True, False, False]])
    shifted = shifts.shift(batch)
    assert shifted.targets.tolist() == [[FIRST + p for p in (2, 3, 4, 5, 6)], [FIRST + 7, FIRST + 0, IGNORE, FIRST + 0, FIRST + 1]]
    assert shifts.take_counts() == (7, 9) and shifts.take_counts() == (0, 0)
    assert torch.equal(shifted.tokens, batch.tokens) and torch.equal(shifted.doc_start, batch.doc_start)


def test_update_carries_the_commonest_offset_of_the_segment_tail():
    length = BELIEF_TOKENS + 2
    true = [[p % RING for p in range(length)] for _ in range(4)]
    ahead = [(p + 1) % RING for p in range(length)]
    ahead[-1] = (ahead[-1] + 1) % RING  # one token two ahead: the commonest offset is still 1
    predicted = torch.tensor([[FIRST + p for p in lane] for lane in (ahead, true[1], true[2], true[3])])
    true[2][-3] = -1  # a walk's first token in the tail: this lane started a walk here
    true[3][-1] = -1  # padding at the end, no walk started here
    starts = [[False] * length for _ in range(4)]
    starts[2][-3] = True
    shifts = CarriedOffset(RING, FIRST, lanes=4)
    shifts.offset = torch.tensor([5, 5, 5, 5])
    shifts.update(walk_batch(true, starts), predicted)
    assert shifts.offset.tolist() == [1, 0, 0, 5]


def test_a_tied_tail_carries_the_smallest_offset():
    """The same on every device (Tensor.mode breaks ties differently on CUDA)."""
    true = [p % RING for p in range(BELIEF_TOKENS)]
    half = BELIEF_TOKENS // 2
    tails = ([3] * half + [0] * half, [5] * half + [2] * half, [2, 6] * half)
    predicted = torch.tensor([[FIRST + (p + d) % RING for p, d in zip(true, tail)] for tail in tails])
    shifts = CarriedOffset(RING, FIRST, lanes=3)
    shifts.update(walk_batch([true] * 3, [[False] * BELIEF_TOKENS] * 3), predicted)
    assert shifts.offset.tolist() == [0, 2, 2]


@pytest.fixture
def walk(tmp_path):
    """A tiny random-walk config: 8 steps on 20-token walks, then 6 on 40-token walks over 16-token
    segments, at a learning rate high enough that the model soon predicts positions."""
    def make(name, *overrides):
        return load_config(None, [
            "model.d_model=16", "model.d_ff=32", "model.n_heads=2", "model.chunk=4", "model.attn_lim=16",
            "train.lanes=4", "train.segment_len=16", "train.steps=14", "train.log_every=2", "train.eval_every=0",
            "train.lr=1e-2", "train.warmup_steps=2",
            "task.train_lengths=[20,40]", "task.train_length_steps=[0,8]", "task.eval_length=40", "task.eval_docs=8",
            "task.train_docs=100", f"data.cache={tmp_path / 'datasets'}", f"run_dir={tmp_path / name}", *overrides])
    return make


def test_training_on_carried_offset_labels_from_a_later_stage(walk, tmp_path, capsys):
    plain = Trainer(walk("plain"), quiet=True).train()
    shifted = Trainer(walk("shifted", "train.carried_offset_stages=[1]")).train()
    losses = lambda results: [step["loss"] for step in results["steps"]]
    # Stage 0 and the first step of stage 1 (every lane starts with offset 0) are the plain run's.
    assert losses(shifted)[:9] == losses(plain)[:9]
    assert losses(shifted)[9:] != losses(plain)[9:]
    log = capsys.readouterr().out.splitlines()
    steps = [line for line in log if line.startswith("step ")]
    assert ["shifted labels" in line for line in steps] == [False] * 4 + [True] * 3
    events = EventAccumulator(str(tmp_path / "shifted" / "tensorboard"))
    events.Reload()
    fractions = events.Scalars("train/shifted_labels")
    assert [e.step for e in fractions] == [10, 12, 14] and max(e.value for e in fractions) > 0


def test_a_train_step_scores_and_measures_the_offset_against_the_true_labels(walk):
    """Trained on shifted labels, the step counts its errors against the true labels and carries
    the offset the model's guesses hold against the true labels. The head is biased to always
    guess one position, so both are known from the batch alone."""
    cfg = walk("run", "task.train_lengths=[40]", "task.train_length_steps=[0]", "task.train_length_spread=0",
               "train.carried_offset_stages=[0]", "train.grad_accum=2", "train.steps=2", "train.warmup_steps=1")
    trainer = Trainer(cfg, quiet=True)
    guess = 3
    with torch.no_grad():
        trainer.model.head.proj.bias[FIRST + guess] += 1000.0
    batches = trainer.batches()
    step, batch, states = next(batches)
    trainer.train_step(batch, states, 0.0, Tally(labelled=True, byte_level=False))
    step, batch, states = next(batches)  # 40-token walks, 16-token segments: the second is inside every lane's walk
    assert step == 1 and not batch.doc_start.any()
    given = [torch.tensor([1, 2]), torch.tensor([5, 7])]  # per micro-batch of 2 lanes
    for shift, offsets in zip(trainer.label_shifts, given):
        shift.offset = offsets.clone()
        shift.take_counts()
    tally = Tally(labelled=True, byte_level=False)
    loss, _ = trainer.train_step(batch, states, 0.0, tally)  # lr 0: the biased head stays as it is

    true = batch.targets
    supervised = true != IGNORE
    assert supervised.all()
    assert tally.count == int(supervised.sum())
    assert tally.errors == int((true != FIRST + guess).sum())  # not the shifted labels' errors
    offsets = torch.cat(given)
    shifted = FIRST + (true - FIRST + offsets[:, None]) % RING
    assert tally.errors != int((shifted != FIRST + guess).sum())  # so the check above tells them apart
    # The loss as trained is on the shifted labels: about 1000 nats for each one the guess misses.
    assert [shift.take_counts() for shift in trainer.label_shifts] == [(16 * 2, 16 * 2)] * 2
    assert round(float(loss) * tally.count / 1000) == int((shifted != FIRST + guess).sum())
    for lane in range(4):
        tail = [(guess - (t - FIRST)) % RING for t in true[lane, -BELIEF_TOKENS:].tolist()]
        commonest = min(range(RING), key=lambda o: (-tail.count(o), o))
        carried = trainer.label_shifts[lane // 2].offset[lane % 2].item()
        assert carried == commonest, (lane, tail)


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["task.name=algorithmic", "train.carried_offset_stages=[0]"], "needs labels on a ring"),
        (["train.carried_offset_stages=[1]"], "stage 1 is not one of the 1 curriculum stages"),
    ],
)
def test_carried_offset_config_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=f"train.carried_offset_stages: .*{key}"):
        load_config(None, overrides)
