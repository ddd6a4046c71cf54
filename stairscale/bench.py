"""`stairscale bench data`: is the loader ever the bottleneck? Loader tokens/s beside the train
step's tokens/s for the same config, measured in the same run."""

from __future__ import annotations

import time

import torch

from stairscale.config import RunConfig
from stairscale.data.prepare import dataset_dir, train_split
from stairscale.data.shards import Dataset
from stairscale.model.lm import StaircaseLM
from stairscale.train.trainer import autocast, make_loader, resolve_device


def _rate(batches, seconds: float, work=lambda batch: None) -> float:
    """Tokens per second over `seconds`, after a first batch that pays for start-up."""
    work(next(batches))
    tokens, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        batch = next(batches)
        work(batch)
        tokens += batch.tokens.numel()
    return tokens / (time.perf_counter() - started)


def train_rate(cfg: RunConfig, seconds: float, root=None) -> float:
    """Tokens/s of the config's train step (forward, backward, AdamW), fed by the real loader."""
    root = root or dataset_dir(cfg)
    device = resolve_device(cfg)
    vocab = Dataset(root).vocab
    model = StaircaseLM(cfg.model, len(vocab), vocab.pad_id).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    state = model.initial_state(cfg.train.lanes, device)

    def train_step(batch):
        nonlocal state
        batch = batch.to(device)
        with autocast(cfg, device):
            scores, state = model(batch.tokens, batch.doc_start, batch.targets, state)
        scores.nll.sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return _rate(iter(make_loader(cfg, root, train_split(cfg.task, 0), training=True)), seconds, train_step)


def bench_data(cfg: RunConfig, seconds: float) -> dict:
    root = dataset_dir(cfg)
    split = train_split(cfg.task, 0)
    loader_rate = _rate(iter(make_loader(cfg, root, split, training=True)), seconds)
    train = train_rate(cfg, seconds, root)
    result = {
        "dataset": str(root),
        "split": split,
        "lanes": cfg.train.lanes,
        "segment_len": cfg.train.segment_len,
        "workers": cfg.data.workers,
        "loader_tokens_per_s": loader_rate,
        "train_tokens_per_s": train,
        "loader_over_train": loader_rate / train,
    }
    print(
        f"loader: {loader_rate / 1e6:.2f} M tokens/s per process ({cfg.data.workers} workers, "
        f"{cfg.train.lanes} lanes x {cfg.train.segment_len}) | train step ({cfg.model.schedule}, {resolve_device(cfg)}): "
        f"{train / 1e3:.1f} k tokens/s | loader / train = {loader_rate / train:.1f}x"
    )
    return result


def bench_pipeline(cfg: RunConfig, micro_batches: list[int], steps: int) -> list[dict] | None:
    """Seconds per train step of the config's layout with each number of pipeline micro-batches
    (same global batch, so the same work), beside the speed-up the wavefront's unit-time model
    predicts over one micro-batch. Run it under a launcher with the config's world size."""
    import dataclasses
    import tempfile

    from stairscale.parallel.wavefront import schedule
    from stairscale.train.trainer import Trainer

    rows = []
    for count in [micro_batches[0], *micro_batches]:  # the first run pays for start-up and is dropped
        run = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_accum=count, steps=steps, eval_every=0,
                                                                  log_every=steps), run_dir=tempfile.mkdtemp())
        trainer = Trainer(run, quiet=True)
        seconds = trainer.train()["train_seconds"] / steps
        calls = trainer.model.runner.schedule.count(cfg.train.segment_len) if cfg.parallel.pipeline > 1 else 1
        slots = len(schedule(cfg.parallel.pipeline, count, calls).slots) / count  # in units of one micro-batch's action
        rows.append({"micro_batches": count, "seconds_per_step": seconds, "model_slots": slots, "layout": trainer.layout})
    rows = rows[1:]
    base = rows[0]
    if not base["layout"].reports:
        return None
    print(f"{base['layout'].describe()}; {cfg.model.schedule}, {cfg.train.lanes} lanes x {cfg.train.segment_len}, {steps} steps each")
    for row in rows:
        measured = base["seconds_per_step"] / row["seconds_per_step"]
        predicted = base["model_slots"] / row["model_slots"]
        print(f"micro-batches {row['micro_batches']}: {row['seconds_per_step'] * 1e3:.1f} ms/step | "
              f"speed-up over {base['micro_batches']}: measured {measured:.2f}x, unit-time model {predicted:.2f}x")
    return rows
