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


def full_state_dict(model: nn.Module, cfg: RunConfig, vocab_size: int, pad_id: int, layout: Layout) -> dict[str, torch.Tensor] | None:
    """The single-device parameters on the reporting rank (None on the others), gathered from
    ZeRO-3 partitions and tensor shards one parameter at a time, then from the pipeline stages.
    Every rank takes part."""
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in StaircaseLM(cfg.model, vocab_size, pad_id).named_parameters()}
    if layout.tp > 1:
        from stairscale.parallel.tensor import gather_shard
    else:
        def gather_shard(param, shape):
            return param.detach().clone()
    keeps = not (layout.tp_rank or layout.dp_rank)  # the others' stage weights are the same as on tensor and data rank 0
    state = {}
    for name, param in model.named_parameters():
        with _zero3_gathered(param):
            full = gather_shard(param, shapes[name])  # a collective: every rank takes part
            if keeps:
                state[name] = full.cpu()
    if not keeps:
        return None
    if layout.pp > 1:  # the stages of tensor and data rank 0 send theirs to the last stage, the reporting rank
        from megatron.core import parallel_state

        group = parallel_state.get_pipeline_model_parallel_group()
        stages = [None] * layout.pp if layout.last_stage else None
        dist.gather_object(state, stages, dst=dist.get_global_rank(group, layout.pp - 1), group=group)
        if not layout.last_stage:
            return None
        state = {name: tensor for stage in stages for name, tensor in stage.items()}
    missing = set(shapes) - set(state)
    assert not missing, f"no rank holds {sorted(missing)}"
    return {name: state[name] for name in shapes}


def _zero3_gathered(param: torch.Tensor):
    if not hasattr(param, "ds_id"):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([param])
