"""The core: L pre-norm Transformer layers with one set of weights, called by every schedule.

A core call takes query rows (their layer-0 inputs, positions and document ids) and an optional
key/value context of earlier rows (their per-layer inputs). It returns the queries' top-layer
outputs and their per-layer inputs, which schedules carry forward as later keys/values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from stairscale.config import ModelConfig
from stairscale.model.provider import LayerProvider
from stairscale.model.state import HIDDEN, Rows


@dataclass
class AttentionGeometry:
    """What every layer of one core call needs to know about query/key placement."""

    visible: Tensor  # [B, 1, Tq, Tk] bool
    rope: tuple[Tensor, Tensor] | None = None  # cos, signed sin [Tk, head_dim] of the keys; queries are the last Tq keys
    relative_table: Tensor | None = None  # [head_dim, attn_lim] the learned table
    relative_index: Tensor | None = None  # [Tq, Tk] column of the table for each query/key pair


def attention_geometry(cfg: ModelConfig, q_pos: Tensor, q_doc: Tensor, k_pos: Tensor, k_doc: Tensor,
                       relative_table: Tensor | None) -> AttentionGeometry:
    """Causal, span-limited, document-masked visibility, plus the position encoding inputs.

    A query sees a key of the same document at distance 0 <= d < attn_lim. Every query also sees
    itself, so padding rows (HIDDEN, invisible to all others) still have one key.
    """
    distance = q_pos[:, None] - k_pos[None, :]  # [Tq, Tk]
    in_span = (distance >= 0) & (distance < cfg.attn_lim)
    same_doc = (q_doc[:, :, None] == k_doc[:, None, :]) & (k_doc[:, None, :] != HIDDEN)
    context = k_pos.shape[0] - q_pos.shape[0]
    is_self = torch.zeros_like(in_span)
    is_self[:, context:] = torch.eye(q_pos.shape[0], dtype=torch.bool, device=q_pos.device)
    visible = ((same_doc & in_span) | is_self)[:, None]
    if cfg.positions == "relative":
        # The authors' layout: distance d lives in column attn_lim - 1 - d.
        index = (cfg.attn_lim - 1 - distance).clamp(0, cfg.attn_lim - 1)
        return AttentionGeometry(visible, relative_table=relative_table, relative_index=index)
    return AttentionGeometry(visible, rope=_rope_tables(k_pos - k_pos[0], cfg.head_dim))


def _rope_tables(offsets: Tensor, head_dim: int) -> tuple[Tensor, Tensor]:
    """cos and signed sin [T, head_dim] of each row's angles, for `_rotate`. Angles are taken
    relative to the call's oldest key, in float32, so long streams lose no precision."""
    half = head_dim // 2
    inv_freq = 10000.0 ** (-torch.arange(half, dtype=torch.float32, device=offsets.device) / half)
    angles = offsets.float()[:, None] * inv_freq[None, :]
    cos, sin = angles.cos(), angles.sin()
    return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)


def _rotate(x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
    """Rotary embedding of x's rows, which are the last rows of the call's keys (queries are the
    last of them), half-split pairing (dimension i rotates with i + head_dim/2): first * cos -
    second * sin, second * cos + first * sin, as one expression. At least float32 throughout."""
    rows = x.shape[-2]
    cos, signed_sin = rope[0][-rows:], rope[1][-rows:]
    wide = x.to(torch.promote_types(x.dtype, torch.float32))
    first, second = wide.chunk(2, dim=-1)
    return (wide * cos + torch.cat([second, first], dim=-1) * signed_sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, linears: LayerProvider):
        super().__init__()
        d = cfg.d_model
        self.head_dim = cfg.head_dim
        self.dropout = cfg.attn_dropout
        self.q = linears.linear(d, d, bias=False, split="column")
        self.k = linears.linear(d, d, bias=False, split="column")
        self.v = linears.linear(d, d, bias=False, split="column")
        self.o = linears.linear(d, d, bias=False, split="row")

    def _heads(self, x: Tensor) -> Tensor:
        batch, rows, width = x.shape
        return x.view(batch, rows, width // self.head_dim, self.head_dim).transpose(1, 2)

    def forward(self, x: Tensor, kv: Tensor, geometry: AttentionGeometry) -> Tensor:
        q, k, v = self._heads(self.q(x)), self._heads(self.k(kv)), self._heads(self.v(kv))
        attn_mask = geometry.visible
        if geometry.rope is not None:
            q, k = _rotate(q, geometry.rope), _rotate(k, geometry.rope)
        if geometry.relative_table is not None:
            # score = (q.k + q.p_d) / sqrt(head_dim): add q.p_d as a bias scaled like q.k.
            q_p = torch.matmul(q, geometry.relative_table.to(q.dtype))  # [B, H, Tq, attn_lim]
            index = geometry.relative_index.expand(*q_p.shape[:2], -1, -1)
            bias = q_p.gather(-1, index) / math.sqrt(self.head_dim)
            attn_mask = bias.masked_fill(~attn_mask, float("-inf"))
        dropout = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)
        batch, heads, rows, head_dim = out.shape
        return self.o(out.transpose(1, 2).reshape(batch, rows, heads * head_dim))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig, linears: LayerProvider):
        super().__init__()
        self.fc1 = linears.linear(cfg.d_model, cfg.d_ff, bias=True, split="column")
        self.fc2 = linears.linear(cfg.d_ff, cfg.d_model, bias=True, split="row")
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.dropout(F.relu(self.fc1(x))))


class CoreLayer(nn.Module):
    """Pre-norm layer; one LN1 normalises both the queries and their key/value context."""

    def __init__(self, cfg: ModelConfig, linears: LayerProvider):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.d_model, eps=1e-5)
        self.attn = Attention(cfg, linears)
        self.norm2 = nn.LayerNorm(cfg.d_model, eps=1e-5)
        self.ffn = FeedForward(cfg, linears)

    def forward(self, x: Tensor, context: Tensor | None, geometry: AttentionGeometry) -> Tensor:
        kv = x if context is None else torch.cat([context, x], dim=1)
        kv = self.norm1(kv)
        h = x + self.attn(kv[:, -x.shape[1]:], kv, geometry)
        return h + self.ffn(self.norm2(h))


def call_shapes_bound(cfg: ModelConfig) -> int:
    """How many shapes of core call a run may make, at most (torch.compile's recompile limit):
    calls differ in rows and context (a stream's first steps, drain steps), lanes (training,
    evaluation) and grad mode, a few dozen kinds, for which 64 leaves room; a filling cache or
    layer memory makes one more shape per chunk it holds (a segment is whole chunks), in each
    kind of call that reads it."""
    return 64 + 4 * ((cfg.cache_len + cfg.mem_len) // cfg.chunk + 1)


class Core(nn.Module):
    """The core's layers, keyed by their global index: a pipeline stage holds a range of them
    (`layers`) under the same names as the single-device model."""

    def __init__(self, cfg: ModelConfig, linears: LayerProvider, layers: range | None = None):
        super().__init__()
        self.cfg = cfg
        layers = range(cfg.n_layers) if layers is None else layers
        self.layers = nn.ModuleDict({str(i): CoreLayer(cfg, linears) for i in layers})
        # One table of shape head_dim x attn_lim shared by all heads, layers and steps.
        self.relative = nn.Parameter(torch.randn(cfg.head_dim, cfg.attn_lim) * cfg.head_dim**-0.5) if cfg.positions == "relative" else None
        self.read_by_every_head = linears.read_by_every_head
        self.calls = 0  # sequential core calls made (tests count them against M/F + n - 1)
        self.run_layers = self._layers  # or its compiled version (compile_calls)

    def compile_calls(self, mode: str = "default", backend: str = "inductor") -> None:
        """Compile what one core call computes, one graph for each shape of call a schedule makes
        (a handful per segment). Meant for the GPU, where an eager call is a hundred-odd small
        kernel launches (docs/benchmarks.md: measured on the CPU only so far)."""
        limits, shapes = torch._dynamo.config, call_shapes_bound(self.cfg)
        limits.recompile_limit = max(limits.recompile_limit, shapes)
        limits.accumulated_recompile_limit = max(limits.accumulated_recompile_limit, shapes)
        limits.fail_on_recompile_limit_hit = True  # never fall back to eager in silence
        compiled = torch.compile(self._layers, mode=mode, backend=backend, fullgraph=True, dynamic=False)
        if mode == "reduce-overhead":
            # CUDA graphs replay into the same output memory and free a generation's outputs when
            # the next one starts (every call without a pending backward, e.g. in evaluation).
            # Schedules keep outputs across calls and segments, so they get their own copies.
            self.run_layers = lambda *args: tuple(out.clone() for out in compiled(*args))
        else:
            self.run_layers = compiled

    def forward(self, x: Tensor, pos: Tensor, doc: Tensor, context: Rows | None = None) -> tuple[Tensor, Tensor]:
        """Run the layers over query rows x [B, T, d] at positions pos [T] with documents doc [B, T].

        context holds earlier rows (per-layer inputs [L or 1, B, C, d]) that the queries may attend
        to. Returns the top outputs [B, T, d] and the queries' per-layer inputs [L, B, T, d].
        """
        self.calls += 1
        if self.cfg.activation_checkpointing and torch.is_grad_enabled():
            return checkpoint(self.run_layers, x, pos, doc, context, use_reentrant=False)
        return self.run_layers(x, pos, doc, context)

    def _layers(self, x: Tensor, pos: Tensor, doc: Tensor, context: Rows | None) -> tuple[Tensor, Tensor]:
        if context is not None and context.h.shape[0] not in (1, len(self.layers)):
            raise ValueError(f"carried rows hold {context.h.shape[0]} layers, the core has {len(self.layers)} "
                             "(a state from another model?)")
        k_pos = pos if context is None else torch.cat([context.pos, pos])
        k_doc = doc if context is None else torch.cat([context.doc, doc], dim=1)
        relative = None if self.relative is None else self.read_by_every_head(self.relative)
        geometry = attention_geometry(self.cfg, pos, doc, k_pos, k_doc, relative)
        inputs = []
        for index, layer in enumerate(self.layers.values()):
            inputs.append(x)
            layer_context = None if context is None else context.h[min(index, context.h.shape[0] - 1)]
            x = layer(x, layer_context, geometry)
        return x, torch.stack(inputs)
