"""The pipeline wavefront schedule as a pure list of actions."""

import itertools

import pytest

from stairscale.parallel.wavefront import Action, dependencies, forward_bubble_fraction, schedule

SHAPES = list(itertools.product([1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 9]))  # stages, micro-batches, steps


@pytest.mark.parametrize("stages, micro, steps", SHAPES)
def test_every_action_once_after_its_dependencies(stages, micro, steps):
    plan = schedule(stages, micro, steps)
    when = {}
    for t, slot in enumerate(plan.slots):
        assert len(slot) == stages
        for p, action in enumerate(slot):
            if action is not None:
                assert action.stage == p and action not in when
                when[action] = t
    assert len(when) == 2 * stages * micro * steps
    for action, t in when.items():
        for needed in dependencies(action, stages, steps):
            assert when[needed] < t, (needed, action)
    last_forward = max(t for a, t in when.items() if a.phase == "F")
    assert all(t > last_forward for a, t in when.items() if a.phase == "B")


def test_the_recurrence_crosses_from_the_last_stage_to_the_first():
    assert dependencies(Action("F", 3, 1, 0), stages=4, steps=5) == [Action("F", 2, 1, 3)]
    assert Action("B", 3, 1, 0) in dependencies(Action("B", 2, 1, 3), stages=4, steps=5)


@pytest.mark.parametrize("stages, micro, steps", SHAPES)
def test_bubble_fraction_matches_the_closed_form(stages, micro, steps):
    expected = forward_bubble_fraction(stages, micro, steps)
    assert schedule(stages, micro, steps, backward=False).bubble_fraction == pytest.approx(expected)
    assert schedule(stages, micro, steps).bubble_fraction == pytest.approx(expected)


def test_enough_micro_batches_fill_the_pipeline():
    # 4 stages, 9 steps (M/F + n - 1 for M=64, F=8, n=2): one micro-batch idles 3/4 of the time.
    assert forward_bubble_fraction(4, 1, 9) == pytest.approx(0.75)
    assert forward_bubble_fraction(4, 4, 9) == pytest.approx(3 / 39)
    assert forward_bubble_fraction(4, 8, 9) < 0.05
