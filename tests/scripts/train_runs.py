"""Train several tiny runs one after the other in one launch (one set of process groups).

Usage: torchrun --nproc_per_node=N train_runs.py RUNS.json, where RUNS.json is a list of
[config file, run_dir, [key=value, ...]] ("{rank}" in a value becomes the process's rank). Each run is `stairscale train` in-process. Each rank
also writes what it held and read to run_dir/rank<N>.json (its layout, the lanes of every batch
it trained on, the shapes of its parameters, how many parameter and master-weight elements it
stored), so that the tests can check that
the layout was applied and not only that the numbers agree.
"""

import dataclasses
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from stairscale.config import load_config
from stairscale.errors import TrainingDiverged
from stairscale.model.core import CoreLayer
from stairscale.model.lm import StaircaseLM
from stairscale.parallel.groups import shutdown
from stairscale.train.checkpoint import weights_digest
from stairscale.train.trainer import Trainer


def train_and_record(trainer: Trainer, run_dir: Path) -> None:
    lanes = set()
    train_step = trainer.train_step

    def observed_step(batch, *args):
        lanes.add(batch.tokens.shape[0])
        return train_step(batch, *args)

    trainer.train_step = observed_step
    with LayerCallsInBackward(trainer.model) as recomputed:
        trainer.train()
    engine = getattr(trainer.engine, "deepspeed", None)
    params = list(trainer.model.parameters())
    with torch.device("meta"):
        full = StaircaseLM(trainer.cfg.model, *trainer.vocab)
    record = {
        "layout": dataclasses.asdict(trainer.layout),
        "lanes_per_batch": sorted(lanes),
        # ZeRO-3 partitions a parameter; ds_shape is its shape before that (after tensor sharding)
        "shapes": {name: list(getattr(p, "ds_shape", p.shape)) for name, p in trainer.model.named_parameters()},
        "full_shapes": {name: list(p.shape) for name, p in full.named_parameters()},  # the single-device model's
        "zero_stage": engine.zero_optimization_stage() if engine else None,
        "dropout_seed": torch.initial_seed(),  # what this rank's dropout masks are drawn from
        "layer_calls_in_backward": recomputed.calls,  # activation checkpointing's recomputation
        "model_numel": sum(getattr(p, "ds_numel", p.numel()) for p in params),
        # What this rank stores: its partition of the parameters (ZeRO-3) and of the fp32 master
        # weights, whose partition is the partition of the optimizer state (ZeRO 1-3).
        "held_param_numel": sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params),
        "held_master_numel": sum(t.numel() for t in master_weight_partitions(engine)) if engine else None,
        # Parameters every tensor-parallel rank holds whole (layer norms, row-parallel biases): equal on every rank
        "replicated_sha256": weights_digest({name: p.detach().cpu() for name, p in trainer.model.named_parameters()
                                             if not getattr(p, "tensor_model_parallel", False) and not hasattr(p, "ds_id")}),
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / f"rank{trainer.layout.rank}.json").write_text(json.dumps(record))


class LayerCallsInBackward:
    """Counts the core layers' forward calls made while autograd runs backward (every backward,
    the pipeline's and DeepSpeed's included, goes through torch.autograd.backward)."""

    def __init__(self, model: torch.nn.Module):
        self.layers = [module for module in model.modules() if isinstance(module, CoreLayer)]
        self.calls, self.in_backward = 0, False

    def _count(self, *_):
        self.calls += self.in_backward

    def _backward(self, *args, **kwargs):
        self.in_backward = True
        try:
            return self.autograd_backward(*args, **kwargs)
        finally:
            self.in_backward = False

    def __enter__(self):
        # A pre-hook: checkpoint's recomputation stops as soon as it has what backward needs,
        # before the last layer's forward returns.
        self.hooks = [layer.register_forward_pre_hook(self._count) for layer in self.layers]
        self.autograd_backward, torch.autograd.backward = torch.autograd.backward, self._backward
        return self

    def __exit__(self, *_):
        torch.autograd.backward = self.autograd_backward
        for hook in self.hooks:
            hook.remove()


def master_weight_partitions(engine) -> list:
    optimizer = engine.optimizer
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):  # ZeRO 1-2, ZeRO-3
        if hasattr(optimizer, name):
            return getattr(optimizer, name)
    return [p for group in optimizer.param_groups for p in group["params"]]  # not partitioned


def one_handle_per_batch() -> None:
    """Make gloo's batch_isend_irecv return what NCCL's does, one handle for the whole batch, so
    that the pipeline's handling of it runs here (NCCL needs GPUs)."""
    batch_isend_irecv = dist.batch_isend_irecv

    class WholeBatch:
        def __init__(self, handles):
            self.handles = handles

        def wait(self):
            for handle in self.handles:
                handle.wait()
            return True

    dist.batch_isend_irecv = lambda ops: [WholeBatch(batch_isend_irecv(ops))]


def overflow_on_the_first_stage_before_saving(trainer: Trainer) -> None:
    """An update after the last loss read back overflowed a weight, on the first pipeline stage
    only: the save must stop every rank, not only the one that writes the checkpoint."""
    save = trainer._save

    def overflowed_save(name, step):
        if trainer.layout.first_stage:
            with torch.no_grad():
                next(trainer.model.parameters()).view(-1)[0] = float("inf")
        return save(name, step)

    trainer._save = overflowed_save


if __name__ == "__main__":
    if os.environ.get("ONE_HANDLE_PER_BATCH"):
        one_handle_per_batch()
    for config, run_dir, overrides in json.load(open(sys.argv[1])):
        overrides = [o.replace("{rank}", os.environ.get("RANK", "0")) for o in overrides]  # per-rank values
        trainer = Trainer(load_config(config, [*overrides, f"run_dir={run_dir}"]), quiet=True)
        if os.environ.get("OVERFLOW_BEFORE_SAVING"):
            overflow_on_the_first_stage_before_saving(trainer)
        try:
            train_and_record(trainer, Path(run_dir))
        except TrainingDiverged as err:  # each rank says how it stopped
            (Path(run_dir) / f"rank{trainer.layout.rank}.diverged").write_text(str(err))
            raise
    shutdown()
