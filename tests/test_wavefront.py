"""The pipeline wavefront schedule as a pure list of actions."""

import itertools

import pytest

from stairscale.parallel.wavefront import (
    ACTIVATION,
    GRADIENT,
    TOP,
    TOP_GRADIENT,
    Action,
    Transfer,
    closing_transfers,
    dependencies,
    forward_end,
    forward_bubble_fraction,
    receives_top,
    schedule,
    stage_slots,
    transfers,
)

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


def replay_exchanges(stages, micro, steps, cached, backward):
    """Play the runner's slots on every stage: the slot's action takes its inputs from the inbox,
    then the slot's batch delivers what the stages produced for it, and after the exchange of
    forward_end the closing top rows are taken. Each batch of slot t is matched by the other
    stages' batches of slot t only, so under NCCL it completes once every stage has acted in slot
    t; this replay checks that each action's inputs arrived in an earlier slot and that every
    message is used."""
    plan = schedule(stages, micro, steps, backward)
    slots = [stage_slots(plan, p, cached) for p in range(stages)]
    inbox = [set() for _ in range(stages)]
    for t in range(plan.length):
        for p in range(stages):
            action = slots[p][t].action
            for needed in transfers(action, stages, steps, cached)[0] if action else []:
                assert needed in inbox[p], f"stage {p} runs {action} before {needed} arrived"
                inbox[p].remove(needed)
        for p in range(stages):
            inbox[p].update(slots[p][t].recvs)
            if t == forward_end(plan):
                for needed in closing_transfers(p, stages, micro, steps, cached):
                    inbox[p].remove(needed)
    assert not any(inbox), "messages received but never used"


@pytest.mark.parametrize("stages, micro, steps", [s for s in SHAPES if s[0] > 1])
@pytest.mark.parametrize("cached", [False, True])
def test_exchanges_deliver_every_input_before_it_is_used(stages, micro, steps, cached):
    for backward in (False, True):
        replay_exchanges(stages, micro, steps, cached, backward)
    # The replay checks transfers() against itself; the dependencies are what the math needs: every
    # result an action needs from another stage arrives as one of its receives.
    for action in (a for slot in schedule(stages, micro, steps).slots for a in slot if a is not None):
        recvs = transfers(action, stages, steps, cached)[0]
        for needed in dependencies(action, stages, steps):
            if needed.stage != action.stage:
                down_the_layers = needed.step == action.step  # else across calls: the top rows
                if action.phase == "F":
                    kind, step = (ACTIVATION, needed.step) if down_the_layers else (TOP, needed.step)
                else:
                    kind, step = (GRADIENT, action.step) if down_the_layers else (TOP_GRADIENT, action.step)
                assert Transfer(kind, needed.micro, step, needed.stage, action.stage) in recvs, f"{action} never receives what {needed} computed"


def test_top_rows_go_to_the_first_stage_and_with_a_cache_to_every_stage():
    assert [receives_top(p, 0, stages=3, steps=4, cached=False) for p in range(3)] == [True, False, False]
    assert not receives_top(0, 3, stages=3, steps=4, cached=False)  # the last call's top rows feed no call
    assert [receives_top(p, 3, stages=3, steps=4, cached=True) for p in range(3)] == [True, True, False]


def test_a_small_schedule_slot_by_slot():
    """Two stages, two micro-batches, two steps, written out: forwards in (step, micro-batch)
    order as soon as their inputs arrive; backward from the last step, each stage as soon as it can."""
    slots = [" ".join(f"{a.phase}{a.step}{a.micro}" if a else "---" for a in slot) for slot in schedule(2, 2, 2).slots]
    assert slots == ["F00 ---", "F01 F00", "F10 F01", "F11 F10", "--- F11",
                     "--- B10", "B10 B11", "B11 B00", "B00 B01", "B01 ---"]
