"""The pipeline schedule for recurrent cores, as a pure list of actions (no processes).

A segment of a staircase-family model is S sequential core calls ("steps"; S = M/F + n - 1 for
the staircase, S = R for the ladder). With the core's layers split over P pipeline stages, the
forward of (micro-batch g, step s) on stage p needs

- stage p-1's output of (g, s): the activations flowing down the layers, and
- for stage 0, stage P-1's output of (g, s-1): the top rows a step carries to the next one.

Backward mirrors it: (g, s) on stage p needs stage p+1's backward of (g, s), and stage P-1 needs
stage 0's backward of (g, s+1), because step s's top rows fed step s+1's first layer.

One micro-batch alone walks the stages one at a time, so it keeps one stage busy. Independent
micro-batches (disjoint groups of lanes) fill the others: a wavefront. `schedule` simulates unit-time
slots and, on each stage, runs the ready action that comes first in (phase, step, micro-batch)
order; backward waits until every forward of the segment is done (truncated back-propagation
through the whole segment).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Action:
    phase: str  # "F" forward, "B" backward
    step: int
    micro: int
    stage: int


def dependencies(action: Action, stages: int, steps: int) -> list[Action]:
    """The actions whose results this action needs."""
    p, g, s = action.stage, action.micro, action.step
    if action.phase == "F":
        if p > 0:
            return [Action("F", s, g, p - 1)]
        return [Action("F", s - 1, g, stages - 1)] if s > 0 else []
    needs = [Action("F", s, g, p)]  # its own forward (the saved activations)
    if p < stages - 1:
        needs.append(Action("B", s, g, p + 1))
    elif s < steps - 1:
        needs.append(Action("B", s + 1, g, 0))
    return needs


@dataclass
class Schedule:
    slots: list[list[Action | None]]  # slots[t][p]: what stage p does in time slot t
    stages: int
    steps: int

    @property
    def length(self) -> int:
        return len(self.slots)

    @property
    def bubble_fraction(self) -> float:
        idle = sum(a is None for slot in self.slots for a in slot)
        return idle / (self.length * self.stages)


def schedule(stages: int, micro_batches: int, steps: int, backward: bool = True) -> Schedule:
    phases = ("F", "B") if backward else ("F",)
    actions = [Action(phase, s, g, p) for phase in phases for s in range(steps) for g in range(micro_batches) for p in range(stages)]
    waiting: dict[Action, int] = {}  # how many of its inputs are not there yet
    dependents: dict[Action, list[Action]] = {action: [] for action in actions}
    for action in actions:
        needs = dependencies(action, stages, steps)
        waiting[action] = len(needs)
        for needed in needs:
            dependents[needed].append(action)
    ready = {phase: [[] for _ in range(stages)] for phase in phases}  # a heap per phase and stage
    for action in actions:
        if not waiting[action]:
            heapq.heappush(ready[action.phase][action.stage], (_priority(action), action))
    forwards_left, left = steps * micro_batches * stages, len(actions)
    slots = []
    while left:
        phase = "F" if forwards_left else "B"
        slot = [heapq.heappop(heap)[1] if heap else None for heap in ready[phase]]
        for action in filter(None, slot):  # what this slot finishes is ready from the next slot on
            left -= 1
            forwards_left -= action.phase == "F"
            for later in dependents[action]:
                waiting[later] -= 1
                if not waiting[later]:
                    heapq.heappush(ready[later.phase][later.stage], (_priority(later), later))
        slots.append(slot)
    return Schedule(slots, stages, steps)


def _priority(action: Action) -> tuple:
    # Forward: earliest step first, so every micro-batch advances; backward: latest step first.
    return (action.phase, action.step if action.phase == "F" else -action.step, action.micro)


def forward_bubble_fraction(stages: int, micro_batches: int, steps: int) -> float:
    """Idle share of the forward wavefront, in closed form (unit-time actions).

    With G >= P micro-batches every stage is busy once the wave has filled: S*G + P - 1 slots.
    With G < P a step's chain of P stages bounds the period: S*P + G - 1 slots.
    Busy slots are S*G per stage either way."""
    length = steps * max(micro_batches, stages) + min(micro_batches, stages) - 1
    return 1 - steps * micro_batches / length


# -- what travels between the stages ---------------------------------------------------------------

ACTIVATION, GRADIENT, TOP, TOP_GRADIENT = "activation", "gradient", "top", "top gradient"


@dataclass(frozen=True)
class Transfer:
    kind: str
    micro: int
    step: int  # the core call the tensor belongs to
    src: int  # stages
    dst: int


def receives_top(stage: int, step: int, stages: int, steps: int, cached: bool) -> bool:
    """Whether `stage` needs the last stage's top rows of `step`: the first stage for the next
    call's queries, every stage when the schedule keeps a cache of final rows."""
    if stage == stages - 1:
        return False
    return cached or (stage == 0 and step < steps - 1)


def transfers(action: Action, stages: int, steps: int, cached: bool) -> tuple[list[Transfer], list[Transfer]]:
    """What `action` receives before it computes, and what it sends after."""
    p, g, s, last = action.stage, action.micro, action.step, stages - 1
    tops = [q for q in range(last) if receives_top(q, s, stages, steps, cached)]
    recvs, sends = [], []
    if action.phase == "F":
        if s > 0 and receives_top(p, s - 1, stages, steps, cached):
            recvs.append(Transfer(TOP, g, s - 1, last, p))  # the previous call's top rows
        if p > 0:
            recvs.append(Transfer(ACTIVATION, g, s, p - 1, p))
        if p < last:
            sends.append(Transfer(ACTIVATION, g, s, p, p + 1))
        else:
            sends += [Transfer(TOP, g, s, p, q) for q in tops]
        return recvs, sends
    if p < last:
        recvs.append(Transfer(GRADIENT, g, s, p + 1, p))
    elif s < steps - 1:
        # Every use of these top rows is in calls > s, whose backward is done on every stage.
        recvs += [Transfer(TOP_GRADIENT, g, s, q, p) for q in tops]
    if p > 0:
        sends.append(Transfer(GRADIENT, g, s, p, p - 1))
    if s > 0 and receives_top(p, s - 1, stages, steps, cached):
        sends.append(Transfer(TOP_GRADIENT, g, s - 1, p, last))
    return recvs, sends


def closing_transfers(stage: int, stages: int, micro_batches: int, steps: int, cached: bool) -> list[Transfer]:
    """The last call's top rows (the cache carried out of the segment), received after the
    stage's last forward action."""
    if not receives_top(stage, steps - 1, stages, steps, cached):
        return []
    return [Transfer(TOP, g, steps - 1, stages - 1, stage) for g in range(micro_batches)]


# -- when messages travel ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Slot:
    """One time slot of one stage: its action (None when idle), which takes `needs` (received in
    earlier slots), then one exchange that sends what the action produced and receives what the
    other stages produced for this stage in this slot."""

    action: Action | None
    needs: tuple[Transfer, ...]
    sends: tuple[Transfer, ...]
    recvs: tuple[Transfer, ...]


def stage_slots(plan: Schedule, stage: int, cached: bool) -> list[Slot]:
    """The slots of one stage. Every stage posts its exchanges in slot order, and the exchange of
    slot t matches the other stages' exchanges of slot t only: like a sequence of collectives, it
    cannot deadlock even when a send waits for its receive (NCCL)."""
    slots = []
    for slot in plan.slots:
        moves = {action: transfers(action, plan.stages, plan.steps, cached) for action in slot if action is not None}
        needs = moves[slot[stage]][0] if slot[stage] is not None else []
        produced = [t for _, sends in moves.values() for t in sends]
        sends = tuple(t for t in produced if t.src == stage)
        recvs = tuple(t for t in produced if t.dst == stage)
        slots.append(Slot(slot[stage], tuple(needs), sends, recvs))
    return slots


def forward_end(plan: Schedule) -> int:
    """The last slot with a forward action on any stage: after its exchange every stage holds the
    top rows of every last call (closing_transfers)."""
    return max(t for t, slot in enumerate(plan.slots) if any(a is not None and a.phase == "F" for a in slot))
