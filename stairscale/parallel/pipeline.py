"""Pipeline parallelism: the core's layers split over stages, run as a wavefront.

Stage p holds layers [first, last) of the core; the first stage also holds the embedding, the last
the output head. Every stage runs the same schedule generator (model/schedules.py) for each
micro-batch, so every stage knows each core call's positions, documents and its own carried rows;
only the tensors differ:

- the query rows of a call come from the schedule on the first stage (embeddings and the previous
  call's top rows), from the previous stage elsewhere;
- the top rows of call s are computed by the last stage and sent to the first stage (the queries of
  call s+1) and, for the cached schedules, to every stage (their cache of final rows).

Each call's graph is cut at its inputs: received activations, top rows and the embeddings become
leaf tensors, so a call's backward is one `torch.autograd.backward` on one stage, and the leaves'
gradients are what travel back. The order of the actions on each stage, what each action receives
and sends, and when messages travel (one batch per time slot of the wavefront, posted in the same
slot order on every stage, so that no stage waits forever even where a send waits for its
receive, as on NCCL: docs/parallel.md) come from the pure wavefront module (parallel/wavefront.py).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch import Tensor, nn

from stairscale.config import ModelConfig
from stairscale.model.core import Core
from stairscale.model.lm import segment_layout
from stairscale.model.provider import LayerProvider, Scores
from stairscale.model.schedules import CoreCall, Steps, make_schedule
from stairscale.model.state import RecurrentState
from stairscale.parallel import wavefront
from stairscale.parallel.groups import Layout


def stage_layers(n_layers: int, stages: int, stage: int) -> range:
    """Contiguous layers of one stage; earlier stages take the remainder."""
    bounds = [sum(n_layers // stages + (i < n_layers % stages) for i in range(k)) for k in range(stages + 1)]
    return range(bounds[stage], bounds[stage + 1])


class PipelineStage(nn.Module):
    """One stage of StaircaseLM, with the single-device parameter names. Its runner drives it:
    `runner.train` for a training step, `runner.run` without a loss scale for evaluation."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, pad_id: int, layout: Layout, layers: LayerProvider | None = None):
        super().__init__()
        layers = layers or LayerProvider()
        self.cfg, self.pad_id, self.layout = cfg, pad_id, layout
        self.embed = layers.embedding(vocab_size, cfg.d_model) if layout.first_stage else None
        self.core = Core(cfg, layers, stage_layers(cfg.n_layers, layout.pp, layout.pp_rank))
        self.head = layers.output(cfg.d_model, vocab_size) if layout.last_stage else None
        if self.core.relative is not None and not layout.first_stage:
            # Every stage holds the relative table; the runner sums its gradient over the stages,
            # and DeepSpeed counts it in the gradient norm on the first stage only.
            self.core.relative.ds_pipe_replicated = True
        self.runner = PipelineRunner(self)


@dataclass
class MicroBatch:
    """One micro-batch's schedule generator and what its actions leave for later ones."""

    steps: Steps  # the schedule's generator of core calls
    tokens: Tensor
    targets: Tensor
    state: RecurrentState
    call: CoreCall | None = None
    embedded: Tensor | None = None  # first stage: the embedding output, and its leaf
    embedded_leaf: Tensor | None = None
    inputs: dict[int, Tensor] = field(default_factory=dict)  # step -> the call's input rows (leaf)
    outputs: dict[int, Tensor] = field(default_factory=dict)  # step -> the call's output rows
    layer_inputs: dict[int, Tensor] = field(default_factory=dict)
    tops: dict[int, Tensor] = field(default_factory=dict)  # step -> top rows as a leaf
    result: tuple | None = None  # (final rows, carried rows) once the generator is done
    scores: Scores | None = None


class PipelineRunner:
    """Executes one stage's share of the wavefront, slot by slot: its action (taking what it
    receives from the inbox, leaving what it sends in the outbox), then the slot's exchange."""

    def __init__(self, stage: PipelineStage):
        self.stage = stage
        self.layout = stage.layout
        self.schedule = make_schedule(stage.cfg)
        self.group = parallel_state.get_pipeline_model_parallel_group()
        self.stage_ranks = dist.get_process_group_ranks(self.group)
        self.cached = stage.cfg.cache_len > 0
        self.joined = False
        # What one `run` (one segment of every micro-batch) shares between its actions.
        self.loss_scale: float | None = None  # None: forward only
        self.posted: list = []  # pending sends, waited for at the segment's end
        self.inbox: dict = {}  # received, not yet taken, by transfer key
        self.outbox: dict = {}  # to send at the slot's exchange
        self.segment_len, self.dtype, self.steps, self.micro_count = 0, torch.float32, 0, 0

    def train(self, micro_batches: list[tuple[Tensor, Tensor, Tensor]], states: list[RecurrentState], loss_scale: float):
        """Forward and backward of every micro-batch's segment; gradients are left in .grad."""
        scores, states[:] = self.run(micro_batches, states, loss_scale)
        relative = self.stage.core.relative
        if relative is not None:  # read by the layers of every stage: sum its gradient
            if relative.grad is None:
                relative.grad = torch.zeros_like(relative)
            dist.all_reduce(relative.grad, group=self.group)
        return scores

    def run(self, micro_batches, states, loss_scale: float | None) -> tuple[list[Scores | None], list[RecurrentState]]:
        """Scores (last stage) and new states of the micro-batches; with a loss scale, also backward."""
        layout, training = self.layout, loss_scale is not None
        self.loss_scale, self.posted, self.inbox, self.outbox = loss_scale, [], {}, {}
        self.segment_len, self.dtype = micro_batches[0][0].shape[1], next(self.stage.parameters()).dtype
        self.steps, self.micro_count = self.schedule.count(self.segment_len), len(micro_batches)
        self._join_group(micro_batches[0][0].device)
        with torch.set_grad_enabled(training):
            micros = [self._start(*batch, state) for batch, state in zip(micro_batches, states)]
            slots, forward_end = _plan(layout.pp, len(micros), self.steps, training, layout.pp_rank, self.cached)
            for t, slot in enumerate(slots):
                if slot.action is not None:
                    run_action = self._forward if slot.action.phase == "F" else self._backward
                    run_action(micros[slot.action.micro], slot.action.step, slot.needs, slot.sends)
                self._exchange(slot, micros)
                if t == forward_end:
                    self._finish_forward(micros)
        for batch in self.posted:
            batch.wait()
        assert not self.inbox and not self.outbox, "a message was never used"
        return [m.scores for m in micros], [m.state for m in micros]

    def _tag(self, transfer: wavefront.Transfer) -> int:
        """Unique per message of a segment (gloo matches by tag; the order also matches, as NCCL needs)."""
        kind = (wavefront.ACTIVATION, wavefront.GRADIENT, wavefront.TOP, wavefront.TOP_GRADIENT).index(transfer.kind)
        return (kind * self.micro_count + transfer.micro) * self.steps + transfer.step

    # -- one micro-batch's generator ------------------------------------------------------------

    def _start(self, tokens: Tensor, doc_start: Tensor, targets: Tensor, state: RecurrentState) -> MicroBatch:
        pos, doc, key_doc = segment_layout(tokens, doc_start, state, self.stage.pad_id)
        micro = MicroBatch(None, tokens, targets, RecurrentState(state.position + tokens.shape[1], doc[:, -1], {}))
        if self.layout.first_stage:
            micro.embedded = self.stage.embed(tokens)
            micro.embedded_leaf = micro.embedded.detach().requires_grad_(torch.is_grad_enabled())
            x = micro.embedded_leaf
        else:  # only shapes the schedule's query rows, which this stage receives instead
            x = torch.zeros(*tokens.shape, self.stage.cfg.d_model, device=tokens.device)
        micro.steps = self.schedule.steps(x, pos, key_doc, state.rows)
        micro.call = next(micro.steps)
        return micro

    def _advance(self, micro: MicroBatch, step: int, received_top: Tensor | None = None) -> None:
        """Hand call `step`'s top rows (as a leaf) and this stage's layer inputs to the generator."""
        if self.layout.last_stage:
            top = micro.outputs[step].detach()
        elif received_top is not None:
            top = received_top
        else:
            top = torch.zeros_like(micro.call.queries)  # this stage never reads these top rows
        micro.tops[step] = top.requires_grad_(torch.is_grad_enabled())
        try:
            micro.call = micro.steps.send((micro.tops[step], micro.layer_inputs.pop(step)))
        except StopIteration as finished:
            self._end_segment(micro, finished.value)

    def _end_segment(self, micro: MicroBatch, result: tuple) -> None:
        """The segment's last call is done: keep the final rows and the carried state; the last
        stage scores the micro-batch (and, training, runs the loss's backward into the top rows)."""
        micro.result = result
        micro.state.rows = result[1]
        if self.layout.last_stage:
            self._score(micro)

    def _finish_forward(self, micros: list[MicroBatch]) -> None:
        """End every micro-batch's generator with its last call's top rows."""
        for transfer in wavefront.closing_transfers(self.layout.pp_rank, self.layout.pp, len(micros), self.steps, self.cached):
            self._advance(micros[transfer.micro], self.steps - 1, self._take(transfer))
        for micro in micros:
            if micro.result is None:
                self._advance(micro, self.steps - 1)

    def _score(self, micro: MicroBatch) -> None:
        finals = micro.result[0]
        micro.scores = self.stage.head(finals, micro.targets)
        if self.loss_scale is not None:
            _backward(micro.scores.nll.sum() * self.loss_scale)  # into the top rows' leaves
            micro.scores = Scores(micro.scores.nll.detach(), micro.scores.predicted)

    # -- actions ----------------------------------------------------------------------------------

    def _forward(self, micro: MicroBatch, step: int, recvs: tuple, sends: tuple) -> None:
        """Takes what `recvs` names: the previous call's top rows (TOP) and, after the first stage,
        this call's input rows (ACTIVATION)."""
        top = [self._take(t) for t in recvs if t.kind == wavefront.TOP]
        if step > 0:
            self._advance(micro, step - 1, top[0] if top else None)
        call = micro.call
        if self.layout.first_stage:
            rows = call.queries
        else:
            (transfer,) = [t for t in recvs if t.kind == wavefront.ACTIVATION]
            rows = self._take(transfer).requires_grad_(torch.is_grad_enabled())
        out, micro.layer_inputs[step] = self.stage.core(rows, call.pos, call.doc, call.context)
        micro.inputs[step], micro.outputs[step] = rows, out
        for transfer in sends:
            self._send(out, transfer)
        if self.layout.last_stage and step == self.steps - 1:
            self._advance(micro, step)

    def _backward(self, micro: MicroBatch, step: int, recvs: tuple, sends: tuple) -> None:
        grads = [self._take(t) for t in recvs]
        out = micro.outputs.pop(step)
        if self.layout.last_stage:
            grad = sum(grads, _grad_or_zeros(micro.tops[step]))  # the head's and the stages' uses
        else:
            (grad,) = grads
        _backward(out, grad)
        rows = micro.inputs.pop(step)
        for transfer in sends:
            leaf = rows if transfer.kind == wavefront.GRADIENT else micro.tops[step - 1]
            self._send(_grad_or_zeros(leaf), transfer)
        if self.layout.first_stage and step == 0:
            _backward(micro.embedded, _grad_or_zeros(micro.embedded_leaf))

    # -- point to point ---------------------------------------------------------------------------
    # An action leaves what it sends in the outbox; the slot's exchange posts those sends and the
    # receives of what other stages produced in the same slot as one batch (one NCCL group); an
    # action takes what it needs from the inbox, waiting for it there.

    def _join_group(self, device: torch.device) -> None:
        """NCCL needs every rank of a group in its first operation; later batches may use pairs."""
        if not self.joined:
            dist.all_reduce(torch.zeros(1, device=device), group=self.group)
            self.joined = True

    def _send(self, tensor: Tensor, transfer: wavefront.Transfer) -> None:
        self.outbox[transfer] = tensor.detach().to(self.dtype).contiguous()

    def _exchange(self, slot: wavefront.Slot, micros: list[MicroBatch]) -> None:
        ops, received = [], []
        for transfer in slot.sends:
            ops.append(dist.P2POp(dist.isend, self.outbox.pop(transfer), self.stage_ranks[transfer.dst], self.group, self._tag(transfer)))
        for transfer in slot.recvs:
            lanes = micros[transfer.micro].tokens.shape[0]
            rows = self.schedule.rows(transfer.step, self.segment_len)
            buffer = torch.empty(lanes, rows, self.stage.cfg.d_model, dtype=self.dtype, device=micros[0].tokens.device)
            ops.append(dist.P2POp(dist.irecv, buffer, self.stage_ranks[transfer.src], self.group, self._tag(transfer)))
            received.append((transfer, buffer))
        if not ops:
            return
        batch = PostedBatch(dist.batch_isend_irecv(ops))
        self.posted.append(batch)
        for transfer, buffer in received:
            self.inbox[transfer] = (buffer, batch)

    def _take(self, transfer: wavefront.Transfer) -> Tensor:
        buffer, batch = self.inbox.pop(transfer)
        batch.wait()
        return buffer


class PostedBatch:
    """The handles of one posted batch: one per operation on gloo, one for the whole batch on NCCL
    (its operations form one group), so a receive is waited for with its whole batch. Waits once:
    waiting twice on a gloo handle blocks."""

    def __init__(self, handles: list):
        self.handles, self.done = handles, False

    def wait(self) -> None:
        if not self.done:
            for handle in self.handles:
                handle.wait()
            self.done = True


def _backward(tensor: Tensor, grad: Tensor | None = None) -> None:
    """Backward outside autocast, as the single-device step runs it (the trainer runs the whole
    wavefront under its autocast, which would recast the backward's own operations)."""
    with torch.autocast(tensor.device.type, enabled=False):
        torch.autograd.backward(tensor, grad)


def _grad_or_zeros(leaf: Tensor) -> Tensor:
    return leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)


@functools.lru_cache(maxsize=64)
def _plan(stages: int, micro_batches: int, steps: int, backward: bool, stage: int, cached: bool) -> tuple[list[wavefront.Slot], int]:
    """This stage's slots, and the slot after whose exchange every forward is done."""
    plan = wavefront.schedule(stages, micro_batches, steps, backward)
    return wavefront.stage_slots(plan, stage, cached), wavefront.forward_end(plan)
