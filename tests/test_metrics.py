"""The tally of losses and errors (train/metrics.py), against counts made independently here."""

import math
import pickle

import numpy as np
import pytest
import torch

from stairscale.data.tasks import IGNORE
from stairscale.model.provider import Scores
from stairscale.train.metrics import Tally


def random_batches(seed: int, longest: tuple[int, ...], lanes: int = 3, length: int = 8):
    """(scores, targets, doc_pos) batches over 4 labels, about a third of the targets IGNORE, the
    positions of batch i below longest[i]."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for reach in longest:
        doc_pos = torch.randint(0, reach, (lanes, length), generator=gen)
        targets = torch.randint(0, 4, (lanes, length), generator=gen).masked_fill(torch.rand(lanes, length, generator=gen) < 0.3, IGNORE)
        predicted = torch.randint(0, 4, (lanes, length), generator=gen)
        nll = torch.rand(lanes, length, generator=gen).masked_fill(targets == IGNORE, 0.0)
        batches.append((Scores(nll, predicted), targets, doc_pos))
    return batches


def counted(batches):
    """Per position: supervised targets and wrong predictions; and the summed nll. Plain Python."""
    count, errors, nll = {}, {}, 0.0
    for scores, targets, doc_pos in batches:
        for pos, target, guess, loss in zip(doc_pos.flatten().tolist(), targets.flatten().tolist(),
                                            scores.predicted.flatten().tolist(), scores.nll.flatten().tolist()):
            nll += loss
            if target != IGNORE:
                count[pos] = count.get(pos, 0) + 1
                errors[pos] = errors.get(pos, 0) + (guess != target)
    return count, errors, nll


def percent(count, errors, start, stop):
    n = sum(c for p, c in count.items() if start <= p < stop)
    return 100.0 * sum(e for p, e in errors.items() if start <= p < stop) / n if n else math.nan


def tally_of(batches) -> Tally:
    tally = Tally(labelled=True, byte_level=False)
    for batch in batches:
        tally.add(*batch)
    return tally


def test_error_from_and_by_position_count_only_their_positions():
    batches = random_batches(0, (12, 40, 25, 40))
    count, errors, _ = counted(batches)
    tally = tally_of(batches)
    last = max(count) + 1
    for start, stop in ((0, None), (0, 5), (5, 10), (10, 17), (17, 40), (33, None), (last, None)):
        want = percent(count, errors, start, last if stop is None else stop)
        got = tally.error_from(start, stop)
        assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want), (start, stop)
    assert tally.error_from(0) == pytest.approx(tally.summary()["error"])
    for bucket in (1, 7, 16):
        want = [(start, percent(count, errors, start, start + bucket)) for start in range(0, last, bucket)
                if any(start <= p < start + bucket for p in count)]
        got = tally.error_by_position(bucket)
        assert [s for s, _ in got] == [s for s, _ in want]
        assert [e for _, e in got] == pytest.approx([e for _, e in want]), bucket
    # A bucket without a supervised position is left out, not reported as 0% or nan.
    sparse = Tally(labelled=True, byte_level=False)
    targets = torch.tensor([[1, IGNORE, 2, 3]])
    sparse.add(Scores(torch.zeros(1, 4), torch.tensor([[1, 0, 0, 3]])), targets, torch.tensor([[0, 5, 9, 10]]))
    assert sparse.error_by_position(4) == [(0, 0.0), (8, 50.0)]


@pytest.mark.parametrize("pickled", [False, True])  # data-parallel evaluation merges tallies gathered as pickles
def test_merged_tallies_equal_one_tally_fed_every_batch(pickled):
    first, second = random_batches(1, (10, 30)), random_batches(2, (40, 5, 20))
    whole = tally_of(first + second)
    count, errors, nll = counted(first + second)
    for a, b in ((first, second), (second, first)):  # the longer tally merged into the shorter, and the other way
        merged, other = tally_of(a), tally_of(b)
        if pickled:
            other = pickle.loads(pickle.dumps(other))
        merged.merge(other)
        assert merged.count == whole.count == sum(count.values())
        assert merged.nll == pytest.approx(whole.nll) and merged.nll == pytest.approx(nll)
        assert merged.errors == whole.errors == sum(errors.values()) > 0
        size = max(count) + 1
        assert merged.count_at.tolist() == whole.count_at.tolist() == [count.get(p, 0) for p in range(size)]
        assert merged.errors_at.tolist() == whole.errors_at.tolist() == [errors.get(p, 0) for p in range(size)]
        assert merged.summary() == pytest.approx(whole.summary())
        assert merged.error_by_position(8) == whole.error_by_position(8)  # the same integer counts


def test_merging_an_empty_tally_changes_nothing():
    batches = random_batches(3, (20,))
    tally = tally_of(batches)
    before = (tally.count, tally.nll, tally.count_at.copy(), tally.errors_at.copy())
    tally.merge(Tally(labelled=True, byte_level=False))
    assert (tally.count, tally.nll) == before[:2]
    assert np.array_equal(tally.count_at, before[2]) and np.array_equal(tally.errors_at, before[3])
    empty = Tally(labelled=True, byte_level=False)
    empty.merge(tally)
    assert empty.summary() == tally.summary() and np.array_equal(empty.errors_at, tally.errors_at)


def test_perplexity_of_a_diverging_text_run_is_infinite_not_an_overflow():
    tally = Tally(labelled=False, byte_level=True)
    targets = torch.zeros(1, 2, dtype=torch.long)
    tally.add(Scores(torch.full((1, 2), 800.0), torch.zeros(1, 2, dtype=torch.long)), targets, torch.arange(2)[None])
    summary = tally.summary()
    assert summary["loss"] == 800.0 and summary["perplexity"] == math.inf


def test_bits_per_byte_and_perplexity_follow_from_the_loss_in_nats():
    tally = Tally(labelled=False, byte_level=True)
    targets = torch.zeros(1, 4, dtype=torch.long)
    tally.add(Scores(torch.full((1, 4), math.log(2)), torch.zeros(1, 4, dtype=torch.long)), targets, torch.arange(4)[None])
    summary = tally.summary()  # ln 2 nats per byte: one bit per byte, perplexity 2
    assert summary["loss"] == pytest.approx(math.log(2)) and summary["targets"] == 4
    assert summary["bpb"] == pytest.approx(1.0) and summary["perplexity"] == pytest.approx(2.0)


def test_a_tally_that_counted_no_target_reports_nothing_measured_not_zero_error():
    tally = Tally(labelled=True, byte_level=False)
    tally.add(Scores(torch.zeros(1, 3), torch.zeros(1, 3, dtype=torch.long)), torch.full((1, 3), IGNORE), torch.arange(3)[None])
    summary = tally.summary()
    assert summary["targets"] == 0 and math.isnan(summary["loss"]) and math.isnan(summary["error"])
    text = Tally(labelled=False, byte_level=True).summary()
    assert math.isnan(text["bpb"]) and math.isnan(text["perplexity"])
