"""The pipeline wavefront schedule as a pure list of actions."""

import collections
import itertools

import pytest

from stairscale.parallel.wavefront import (
    Action,
    closing_transfers,
    dependencies,
    forward_bubble_fraction,
    receives_top,
    schedule,
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


def run_messages(stages, micro, steps, cached, backward):
    """Play every stage's receives and sends (wavefront.transfers) in its action order, with
    asynchronous sends and blocking receives that take the oldest message of their channel (how
    NCCL matches point-to-point messages). Fails on a mismatch; returns False on a deadlock."""
    plan = schedule(stages, micro, steps, backward)
    ops = []
    for p in range(stages):
        stage_ops = []
        actions = plan.per_stage(p)
        last_forward = max(i for i, a in enumerate(actions) if a.phase == "F")
        for i, action in enumerate(actions):
            recvs, sends = transfers(action, stages, steps, cached)
            stage_ops += [("recv", t) for t in recvs] + [("send", t) for t in sends]
            if i == last_forward:
                stage_ops += [("recv", t) for t in closing_transfers(p, stages, micro, steps, cached)]
        ops.append(stage_ops)
    channels = collections.defaultdict(collections.deque)
    done = [0] * stages
    while any(done[p] < len(ops[p]) for p in range(stages)):
        progress = False
        for p in range(stages):
            while done[p] < len(ops[p]):
                kind, transfer = ops[p][done[p]]
                channel = channels[transfer.src, transfer.dst]
                if kind == "send":
                    channel.append(transfer)
                elif not channel:
                    break
                else:
                    assert channel.popleft() == transfer, f"stage {p} expected {transfer}"
                done[p] += 1
                progress = True
        if not progress:
            return False
    assert not any(channels.values()), "messages sent but never received"
    return True


@pytest.mark.parametrize("stages, micro, steps", [s for s in SHAPES if s[0] > 1])
@pytest.mark.parametrize("cached", [False, True])
def test_messages_arrive_in_order_without_deadlock(stages, micro, steps, cached):
    for backward in (False, True):
        assert run_messages(stages, micro, steps, cached, backward)


def test_top_rows_go_to_the_first_stage_and_with_a_cache_to_every_stage():
    assert [receives_top(p, 0, stages=3, steps=4, cached=False) for p in range(3)] == [True, False, False]
    assert not receives_top(0, 3, stages=3, steps=4, cached=False)  # the last call's top rows feed no call
    assert [receives_top(p, 3, stages=3, steps=4, cached=True) for p in range(3)] == [True, True, False]
