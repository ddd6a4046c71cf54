"""The language model: embedding, one core driven by a schedule, and the output head."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from stairscale.config import ModelConfig
from stairscale.model.core import Core
from stairscale.model.provider import LayerProvider, Scores
from stairscale.model.schedules import make_schedule, run
from stairscale.model.state import HIDDEN, RecurrentState


class StaircaseLM(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, pad_id: int, layers: LayerProvider | None = None):
        super().__init__()
        layers = layers or LayerProvider()
        self.cfg = cfg
        self.pad_id = pad_id
        self.embed = layers.embedding(vocab_size, cfg.d_model)
        self.core = Core(cfg, layers)
        self.head = layers.output(cfg.d_model, vocab_size)
        self.schedule = make_schedule(cfg)
        self._init_weights()

    def _init_weights(self) -> None:
        """The authors' init: N(0, 1) embedding; wo and fc2 (and fc2's bias) scaled by 1/sqrt(2L)."""
        nn.init.normal_(self.embed.weight, 0.0, 1.0)
        scale = 1.0 / math.sqrt(2 * self.cfg.n_layers)
        with torch.no_grad():
            for layer in self.core.layers.values():
                layer.attn.o.weight.mul_(scale)
                layer.ffn.fc2.weight.mul_(scale)
                layer.ffn.fc2.bias.mul_(scale)

    def forward(self, tokens: Tensor, doc_start: Tensor, targets: Tensor, state: RecurrentState) -> tuple[Scores, RecurrentState]:
        """Per-token scores of `targets` for one segment of every lane, and the state to carry on.

        tokens [B, M] token ids; doc_start [B, M] True at the first token of each document. Padding
        tokens are never visible as keys; a document never sees rows of another document.
        """
        final, state = self.body(tokens, doc_start, state)
        return self.head(final, targets), state

    def logprobs(self, tokens: Tensor, doc_start: Tensor, state: RecurrentState) -> tuple[Tensor, RecurrentState]:
        """Log-probabilities [B, M, V] over the whole vocabulary (single-device models)."""
        final, state = self.body(tokens, doc_start, state)
        return self.head.logprobs(final), state

    def body(self, tokens: Tensor, doc_start: Tensor, state: RecurrentState) -> tuple[Tensor, RecurrentState]:
        """The top-layer output of each token's final pass [B, M, d], and the state to carry on."""
        pos, doc, key_doc = segment_layout(tokens, doc_start, state, self.pad_id)
        final, carried = run(self.core, self.schedule.steps(self.embed(tokens), pos, key_doc, state.rows))
        return final, RecurrentState(state.position + tokens.shape[1], doc[:, -1], carried)

    def core_parameter_count(self) -> int:
        return sum(p.numel() for p in self.core.parameters())


def segment_layout(tokens: Tensor, doc_start: Tensor, state: RecurrentState, pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Stream positions [M], document ids [B, M], and key document ids (padding hidden) [B, M]."""
    pos = state.position + torch.arange(tokens.shape[1], device=tokens.device)
    doc = state.doc[:, None] + doc_start.long().cumsum(dim=1)
    return pos, doc, doc.masked_fill(tokens == pad_id, HIDDEN)
