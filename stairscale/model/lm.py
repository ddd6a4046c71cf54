"""The language model: embedding, one core driven by a schedule, and the output head."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from stairscale.config import ModelConfig
from stairscale.model.core import Core, LinearProvider
from stairscale.model.schedules import make_schedule
from stairscale.model.state import HIDDEN, RecurrentState


class StaircaseLM(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, pad_id: int, linears: LinearProvider | None = None):
        super().__init__()
        self.cfg = cfg
        self.pad_id = pad_id
        self.embed = nn.Embedding(vocab_size, cfg.d_model)
        self.core = Core(cfg, linears or LinearProvider())
        self.head_norm = nn.LayerNorm(cfg.d_model, eps=1e-5)
        self.head = nn.Linear(cfg.d_model, vocab_size, bias=True)
        self.schedule = make_schedule(cfg)
        self._init_weights()

    def _init_weights(self) -> None:
        """The authors' init: N(0, 1) embedding; wo and fc2 (and fc2's bias) scaled by 1/sqrt(2L)."""
        nn.init.normal_(self.embed.weight, 0.0, 1.0)
        scale = 1.0 / math.sqrt(2 * self.cfg.n_layers)
        with torch.no_grad():
            for layer in self.core.layers:
                layer.attn.o.weight.mul_(scale)
                layer.ffn.fc2.weight.mul_(scale)
                layer.ffn.fc2.bias.mul_(scale)

    def initial_state(self, lanes: int, device: torch.device | str = "cpu") -> RecurrentState:
        return RecurrentState.initial(lanes, device)

    def forward(self, tokens: Tensor, doc_start: Tensor, state: RecurrentState) -> tuple[Tensor, RecurrentState]:
        """Log-probabilities [B, M, V] for one segment of every lane, and the state to carry on.

        tokens [B, M] token ids; doc_start [B, M] True at the first token of each document. Padding
        tokens are never visible as keys; a document never sees rows of another document.
        """
        lanes, length = tokens.shape
        pos = state.position + torch.arange(length, device=tokens.device)
        doc = state.doc[:, None] + doc_start.long().cumsum(dim=1)
        key_doc = doc.masked_fill(tokens == self.pad_id, HIDDEN)
        final, carried = self.schedule(self.core, self.embed(tokens), pos, key_doc, state.rows)
        logprobs = torch.log_softmax(self.head(self.head_norm(final)).float(), dim=-1)
        return logprobs, RecurrentState(state.position + length, doc[:, -1], carried)

    def core_parameter_count(self) -> int:
        return sum(p.numel() for p in self.core.parameters())
