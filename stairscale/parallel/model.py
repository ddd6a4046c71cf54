"""Applying parallelism from outside: build the single-device model, then shard it for the layout.

Every rank builds the single-device StaircaseLM from the run's seed, so every layout starts from
the same weights; a tensor-parallel rank keeps its shards, a pipeline stage its layers. The same
names (`core.layers.3.attn.q.weight`) are used in every layout, so `full_state_dict` can gather a
single-device state from any of them.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn

from stairscale.config import RunConfig
from stairscale.model.lm import StaircaseLM
from stairscale.parallel.groups import Layout


def build_model(cfg: RunConfig, vocab_size: int, pad_id: int, layout: Layout) -> nn.Module:
    torch.manual_seed(cfg.train.seed)
    full = StaircaseLM(cfg.model, vocab_size, pad_id)
    if layout.tp == 1 and layout.pp == 1:
        return full
    from stairscale.parallel.tensor import TensorParallelLayers, load_shards

    layers = TensorParallelLayers(layout.tp) if layout.tp > 1 else None
    if layout.pp > 1:
        from stairscale.parallel.pipeline import PipelineStage

        model = PipelineStage(cfg.model, vocab_size, pad_id, layout, layers)
    else:
        model = StaircaseLM(cfg.model, vocab_size, pad_id, layers)
    load_shards(model, full.state_dict())  # a plain copy of every tensor that is not sharded
    return model


def full_state_dict(model: nn.Module, cfg: RunConfig, vocab_size: int, pad_id: int, layout: Layout) -> dict[str, torch.Tensor]:
    """The single-device parameters, gathered from ZeRO-3 partitions, tensor shards and pipeline
    stages; every rank takes part and every rank gets the whole dict (tiny models and tests)."""
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in StaircaseLM(cfg.model, vocab_size, pad_id).named_parameters()}
    params = dict(model.named_parameters())
    if layout.tp > 1:
        from stairscale.parallel.tensor import gather_shard
    else:
        def gather_shard(param, shape):
            return param.detach().clone()
    with _zero3_gathered(list(params.values())):
        state = {name: gather_shard(param, shapes[name]).cpu() for name, param in params.items()}
    if layout.pp > 1:
        from megatron.core import parallel_state

        stages = [None] * layout.pp
        dist.all_gather_object(stages, state, group=parallel_state.get_pipeline_model_parallel_group())
        state = {name: tensor for stage in stages for name, tensor in stage.items()}
    missing = set(shapes) - set(state)
    assert not missing, f"no rank holds {sorted(missing)}"
    return {name: state[name] for name in shapes}


def _zero3_gathered(params: list[torch.Tensor]):
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params)
