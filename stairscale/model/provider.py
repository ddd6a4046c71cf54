"""Where the model gets its layers that a parallel backend shards: linears, the token embedding,
and the output head. The model code asks a provider; tensor parallelism swaps the provider
(stairscale/parallel/tensor.py), the way megatron-core's layer specs swap a linear backend.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from stairscale.data.tasks import IGNORE


class Scores(NamedTuple):
    """What the trainer and the metrics need from the output layer, per token. (A named tuple,
    so that DeepSpeed ZeRO-3 can hook the tensors a module returns.)"""

    nll: Tensor  # [B, M] float32 negative log-likelihood of the target (0 where there is none)
    predicted: Tensor  # [B, M] most likely token


class OutputHead(nn.Module):
    """Final LayerNorm, projection to the vocabulary, and per-token scores."""

    def __init__(self, d_model: int, vocab_size: int):
        super().__init__()
        self.norm = nn.LayerNorm(d_model, eps=1e-5)
        self.proj = nn.Linear(d_model, vocab_size, bias=True)

    def logprobs(self, h: Tensor) -> Tensor:
        # Outside autocast, in float32 or better: logits rounded to bf16 would bias the loss and
        # tie the argmax (the vocabularies here are small; the cost is too).
        with torch.autocast(h.device.type, enabled=False):
            logits = self.proj(self.norm(h.to(torch.promote_types(h.dtype, torch.float32))))
        return torch.log_softmax(logits, dim=-1)

    def forward(self, h: Tensor, targets: Tensor) -> Scores:
        logprobs = self.logprobs(h)
        supervised = targets != IGNORE
        nll = -logprobs.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
        return Scores(nll.masked_fill(~supervised, 0.0), logprobs.argmax(-1))


class LayerProvider:
    """Single-device layers. `split` says how a tensor-parallel provider shards a linear:
    "column" (output features, e.g. heads) or "row" (input features)."""

    def linear(self, in_features: int, out_features: int, bias: bool, split: str) -> nn.Module:
        return nn.Linear(in_features, out_features, bias=bias)

    def embedding(self, vocab_size: int, d_model: int) -> nn.Module:
        return nn.Embedding(vocab_size, d_model)

    def output(self, d_model: int, vocab_size: int) -> nn.Module:
        return OutputHead(d_model, vocab_size)

    def read_by_every_head(self, tensor: Tensor) -> Tensor:
        """A replicated tensor used inside the head-split region (the relative position table).
        Under tensor parallelism its gradient must be summed over the ranks' heads."""
        return tensor
