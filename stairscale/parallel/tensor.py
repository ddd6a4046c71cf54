"""Tensor parallelism: megatron-core's sharded layers behind the model's LayerProvider.

Attention heads are split by ColumnParallelLinear q/k/v and a RowParallelLinear output; the
feed-forward by a column fc1 and a row fc2; the vocabulary by VocabParallelEmbedding and a column
projection scored with vocab_parallel_cross_entropy. The vocabulary is padded to a multiple of the
tensor-parallel size; padded entries get logit -inf, so the model is the single-device one.

Weights are never initialised here: every rank builds the single-device model from the run's seed
and keeps its shard of each tensor (`load_shards`), which is what makes a tensor-parallel run start
from exactly the single-process weights.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    copy_to_tensor_model_parallel_region,
    vocab_parallel_cross_entropy,
)
from torch import Tensor, nn

from stairscale.data.tasks import IGNORE
from stairscale.model.provider import LayerProvider, Scores


def _skip_init(weight: Tensor) -> None:
    """Weights come from the single-device model (load_shards). megatron-core still runs its CPU
    init path with this no-op, because that path is what marks a weight as sharded."""


class ColumnLinear(ColumnParallelLinear):
    """Output features split over the tensor-parallel ranks; returns only the output."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x)[0]


class RowLinear(RowParallelLinear):
    """Input features split; the partial products are summed over the ranks, then the bias added."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x)[0]


class VocabParallelHead(nn.Module):
    """OutputHead with the vocabulary split over the tensor-parallel ranks."""

    def __init__(self, d_model: int, vocab_size: int, config: ModelParallelConfig):
        super().__init__()
        tp = config.tensor_model_parallel_size
        self.norm = nn.LayerNorm(d_model, eps=1e-5)
        self.proj = ColumnLinear(d_model, padded_vocab(vocab_size, tp), config=config, init_method=_skip_init, bias=True)
        local = self.proj.output_size_per_partition
        first = parallel_state.get_tensor_model_parallel_rank() * local
        self.register_buffer("padding", torch.arange(first, first + local) >= vocab_size, persistent=False)
        self.first = first

    def forward(self, h: Tensor, targets: Tensor) -> Scores:
        with torch.autocast(h.device.type, enabled=False):  # in float32, as OutputHead.logprobs
            logits = self.proj(self.norm(h.to(torch.promote_types(h.dtype, torch.float32)))).masked_fill(self.padding, float("-inf"))
        predicted = self._global_argmax(logits.detach())
        supervised = targets != IGNORE
        nll = vocab_parallel_cross_entropy(logits, targets.clamp(min=0))
        return Scores(nll.masked_fill(~supervised, 0.0), predicted)

    def _global_argmax(self, logits: Tensor) -> Tensor:
        value, index = logits.max(dim=-1)
        group = parallel_state.get_tensor_model_parallel_group()
        values = [torch.empty_like(value) for _ in range(dist.get_world_size(group))]
        indices = [torch.empty_like(index) for _ in values]
        dist.all_gather(values, value, group=group)
        dist.all_gather(indices, index + self.first, group=group)
        best = torch.stack(values).argmax(dim=0, keepdim=True)  # first rank wins ties: the lowest id
        return torch.stack(indices).gather(0, best)[0]


class TensorParallelLayers(LayerProvider):
    def __init__(self, tp: int):
        self.config = ModelParallelConfig(
            tensor_model_parallel_size=tp, use_cpu_initialization=True, perform_initialization=True, params_dtype=torch.float32
        )

    def linear(self, in_features: int, out_features: int, bias: bool, split: str) -> nn.Module:
        if split == "column":
            return ColumnLinear(in_features, out_features, config=self.config, init_method=_skip_init, bias=bias)
        return RowLinear(in_features, out_features, config=self.config, init_method=_skip_init, bias=bias,
                         input_is_parallel=True, skip_bias_add=False)

    def embedding(self, vocab_size: int, d_model: int) -> nn.Module:
        tp = self.config.tensor_model_parallel_size
        return VocabParallelEmbedding(padded_vocab(vocab_size, tp), d_model, init_method=_skip_init, config=self.config)

    def output(self, d_model: int, vocab_size: int) -> nn.Module:
        return VocabParallelHead(d_model, vocab_size, self.config)

    def read_by_every_head(self, tensor: Tensor) -> Tensor:
        return copy_to_tensor_model_parallel_region(tensor)  # identity forward, all-reduce of its gradient


def padded_vocab(vocab_size: int, tp: int) -> int:
    return -(-vocab_size // tp) * tp


def is_sharded(param: Tensor) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


@torch.no_grad()
def load_shards(model: nn.Module, full_state: dict[str, Tensor]) -> None:
    """Copy this rank's shard of every single-device tensor into the model (whole tensors where
    a parameter is not sharded, as in a pipeline stage without tensor parallelism)."""
    tp, rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    for name, param in model.named_parameters():
        full = full_state[name]
        if is_sharded(param):
            dim, size = param.partition_dim, param.shape[param.partition_dim]
            padding = size * tp - full.shape[dim]
            if padding:  # the padded vocabulary rows are zero
                full = torch.cat([full, full.new_zeros(*full.shape[:dim], padding, *full.shape[dim + 1:])], dim=dim)
            full = full.narrow(dim, rank * size, size)
        param.copy_(full)


@torch.no_grad()
def gather_shard(param: Tensor, full_shape: torch.Size) -> Tensor:
    """The single-device tensor of a (possibly) sharded parameter, on every tensor-parallel rank."""
    if not is_sharded(param):
        return param.detach().clone()
    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(param) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, param.detach().contiguous(), group=group)
    return torch.cat(parts, dim=param.partition_dim).narrow(param.partition_dim, 0, full_shape[param.partition_dim])
