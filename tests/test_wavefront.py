"""The pipeline wavefront schedule as a pure list of actions."""

import itertools

import pytest

from stairscale.parallel.wavefront import (
    Action,
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
    """Play the runner's communication under the strictest rules NCCL allows: each stage runs its
    slot's action, then posts the slot's exchange and waits for it; an exchange completes only
    when every stage it names has posted its own exchange of that slot (a send waits for its
    receive). Fails when an action's input has not arrived or a message is unmatched; returns
    False on a deadlock."""
    plan = schedule(stages, micro, steps, backward)
    slots = [stage_slots(plan, p, cached) for p in range(stages)]
    end = forward_end(plan)
    at, posted, inbox = [0] * stages, [False] * stages, [set() for _ in range(stages)]
    while any(i < len(plan.slots) for i in at):
        progress = False
        for p in range(stages):
            i = at[p]
            if i == len(plan.slots):
                continue
            slot = slots[p][i]
            if not posted[p]:
                if slot.action is not None:
                    for needed in transfers(slot.action, stages, steps, cached)[0]:
                        assert needed in inbox[p], f"stage {p} runs {slot.action} before {needed} arrived"
                        inbox[p].remove(needed)
                posted[p] = progress = True
                continue
            assert all(t in slots[t.dst][i].recvs for t in slot.sends) and all(t in slots[t.src][i].sends for t in slot.recvs)
            peers = {t.dst for t in slot.sends} | {t.src for t in slot.recvs}
            if all(at[q] > i or (at[q] == i and posted[q]) for q in peers):
                inbox[p].update(slot.recvs)
                if i == end:
                    for needed in closing_transfers(p, stages, micro, steps, cached):
                        inbox[p].remove(needed)
                at[p], posted[p], progress = i + 1, False, True
        if not progress:
            return False
    assert not any(inbox), "messages received but never used"
    return True


@pytest.mark.parametrize("stages, micro, steps", [s for s in SHAPES if s[0] > 1])
@pytest.mark.parametrize("cached", [False, True])
def test_exchanges_deliver_every_input_in_time_without_deadlock(stages, micro, steps, cached):
    for backward in (False, True):
        assert replay_exchanges(stages, micro, steps, cached, backward)


def test_top_rows_go_to_the_first_stage_and_with_a_cache_to_every_stage():
    assert [receives_top(p, 0, stages=3, steps=4, cached=False) for p in range(3)] == [True, False, False]
    assert not receives_top(0, 3, stages=3, steps=4, cached=False)  # the last call's top rows feed no call
    assert [receives_top(p, 3, stages=3, steps=4, cached=True) for p in range(3)] == [True, True, False]
