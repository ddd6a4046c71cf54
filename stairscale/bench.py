"""Benchmarks, each printing a ratio against a baseline measured in the same run:
`bench data` (loader vs train step), `bench step` (compile modes vs eager, and what an eager step
dispatches), `bench pipeline` (pipeline micro-batches)."""

from __future__ import annotations

import dataclasses
import gc
import tempfile
import time

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from stairscale.config import RunConfig
from stairscale.data.prepare import dataset_dir, train_split
from stairscale.errors import ConfigError
from stairscale.parallel.launchers import launch_environment
from stairscale.parallel.wavefront import schedule
from stairscale.train.device import resolve_device
from stairscale.train.metrics import Tally
from stairscale.train.splits import make_loader
from stairscale.train.trainer import Trainer, learning_rate


def _rate(batches, seconds: float) -> float:
    """Loader tokens per second over `seconds`, after a first batch that pays for start-up."""
    next(batches)
    tokens, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        tokens += next(batches).tokens.numel()
    return tokens / (time.perf_counter() - started)


class StepTimer:
    """The trainer's own train step for a config (its loader, optimizer, tallies, compile mode),
    run outside a training loop to be timed. A context manager: the trainer's run directory is
    temporary and removed on exit."""

    def __init__(self, cfg: RunConfig, compile: str | None = None):
        train = dataclasses.replace(cfg.train, steps=1 << 30, compile=compile or cfg.train.compile)
        self.run_dir = tempfile.TemporaryDirectory(prefix="stairscale-bench-")
        self.cfg = dataclasses.replace(cfg, train=train, run_dir=self.run_dir.name)
        self.trainer = Trainer(self.cfg, quiet=True)
        self.device = self.trainer.device
        self.tally = Tally.for_dataset(self.trainer.dataset)
        self.batches = self.trainer.batches()

    def __enter__(self) -> StepTimer:
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self.trainer.writer is not None:
                self.trainer.writer.close()
            self.run_dir.cleanup()
        finally:
            # Free this config's model, optimizer, compiled code and CUDA graphs before the next
            # one is measured (the trainer and its batch generator hold each other).
            del self.trainer, self.batches
            gc.collect()
            torch._dynamo.reset()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def step(self) -> None:
        index, batch, states = next(self.batches)
        self.trainer.train_step(batch, states, learning_rate(self.cfg, index), self.tally)

    def seconds_per_step(self, steps: int, warmup: int) -> float:
        """After `warmup` steps, which pay for start-up and compilation."""
        for _ in range(warmup):
            self.step()
        self._wait_for_all()
        started = time.perf_counter()
        for _ in range(steps):
            self.step()
        self._wait_for_all()
        return (time.perf_counter() - started) / steps

    def seconds_per_validation(self) -> float:
        """One validation as training runs it (the split read afresh, train.eval_batches kept),
        after one that pays for compiling the evaluation's graphs."""
        self.trainer.score_split("valid")
        self._wait_for_all()
        started = time.perf_counter()
        self.trainer.score_split("valid")
        self._wait_for_all()
        return time.perf_counter() - started

    def _wait_for_all(self) -> None:
        """Until this device's queued work and every rank are done, so the time covers them."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        if dist.is_initialized():
            dist.barrier()


def measure_step(cfg: RunConfig, steps: int, warmup: int, compile: str | None = None) -> float:
    """Seconds per train step of the config, in a StepTimer of its own."""
    with StepTimer(cfg, compile) as timer:
        return timer.seconds_per_step(steps, warmup)


def bench_data(cfg: RunConfig, seconds: float, steps: int = 20, warmup: int = 10) -> dict:
    root = dataset_dir(cfg)
    split = train_split(cfg.task, 0)
    loader_rate = _rate(iter(make_loader(cfg, root, split, training=True)), seconds)
    train = cfg.train.lanes * cfg.train.segment_len / measure_step(cfg, steps, warmup)
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


def bench_pipeline(cfg: RunConfig, micro_batches: list[int], steps: int, warmup: int = 2) -> list[dict] | None:
    """Seconds per train step of the config's layout with each number of pipeline micro-batches
    (same global batch, so the same work), beside the speed-up the wavefront's unit-time model
    predicts over one micro-batch. Run it under a launcher with the config's world size. (A
    pipeline cannot be compiled, so its warm-up steps pay only for start-up.)"""
    if cfg.parallel.pipeline < 2:
        raise ConfigError(f"parallel.pipeline: {cfg.parallel.pipeline} stage; bench pipeline compares micro-batch counts "
                          "of a pipeline (--set parallel.pipeline=2 under a launcher of 2 processes, say)")
    rows = []
    _, _, world = launch_environment()
    dp = max(1, world // (cfg.parallel.tensor * cfg.parallel.pipeline))
    for count in micro_batches:  # before any measurement (the trainer would name train.grad_accum)
        if cfg.train.lanes % dp == 0 and (cfg.train.lanes // dp) % count:  # (else the trainer names train.lanes)
            raise ConfigError(f"--micro-batches: {count} micro-batches do not divide the {cfg.train.lanes // dp} lanes of each data-parallel rank")
    for count in micro_batches:
        with StepTimer(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_accum=count))) as timer:
            seconds = timer.seconds_per_step(steps, warmup)
            runner = getattr(timer.trainer.model, "runner", None)
            layout, timed = timer.trainer.layout, timer.trainer.cfg.train.grad_accum  # what was timed, read back
        calls = runner.schedule.count(cfg.train.segment_len) if runner else 1
        slots = len(schedule(cfg.parallel.pipeline, timed, calls).slots) / timed  # in units of one micro-batch's action
        rows.append({"micro_batches": timed, "seconds_per_step": seconds, "model_slots": slots, "layout": layout})
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


class _OpCounter(TorchDispatchMode):
    """Counts the aten operations dispatched (on a GPU, about one kernel launch each)."""

    ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def bench_step(cfg: RunConfig, modes: list[str], steps: int, warmup: int) -> list[dict]:
    """Milliseconds per train step of the config with each train.compile mode, beside eager
    ("none") measured in the same run. For eager it also counts the operations one step dispatches
    and, on a GPU, the times the host waits for the device. Each row is printed when measured, so
    a mode that crashes the process leaves the rows before it."""
    m, t = cfg.model, cfg.train
    print(f"{m.schedule}, {t.lanes} lanes x {t.segment_len} tokens, {resolve_device(cfg)}; {steps} steps after {warmup} warm-up steps", flush=True)
    with StepTimer(cfg, compile="none") as timer:
        eager = {"compile": "none", "ms_per_step": timer.seconds_per_step(steps, warmup) * 1e3}
        with _OpCounter() as counter, _SyncCounter(timer.device) as syncs:
            timer.step()
    eager.update(ops_per_step=counter.ops, host_waits_per_step=syncs.count)
    waits = "" if syncs.count is None else f", host waits for the device {syncs.count}x"
    print(f"compile none: {eager['ms_per_step']:.1f} ms/step | speed-up over eager 1.00x | {counter.ops} ops dispatched{waits}", flush=True)
    rows = [eager]
    for mode in [mode for mode in modes if mode != "none"]:
        try:
            row = {"compile": mode, "ms_per_step": measure_step(cfg, steps, warmup, compile=mode) * 1e3}
            print(f"compile {mode}: {row['ms_per_step']:.1f} ms/step | speed-up over eager {eager['ms_per_step'] / row['ms_per_step']:.2f}x", flush=True)
        except Exception as err:  # a mode that fails is reported, and the other modes still measured
            row = {"compile": mode, "error": f"{type(err).__name__}: {err}"}
            print(f"compile {mode}: failed: {row['error'].splitlines()[0]}", flush=True)
        rows.append(row)
    measured = [row for row in rows if "error" not in row]
    print(f"fastest: {min(measured, key=lambda row: row['ms_per_step'])['compile']}")
    return rows


class _SyncCounter:
    """Counts the host's waits for a CUDA device in a block (CUDA's sync debug mode); None elsewhere."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.count = None

    def __enter__(self):
        if self.cuda:
            import warnings

            self.catcher = warnings.catch_warnings(record=True)
            self.caught = self.catcher.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.set_sync_debug_mode("default")
            self.catcher.__exit__(*exc)
            self.count = sum("synchroniz" in str(w.message) for w in self.caught)
