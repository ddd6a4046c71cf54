"""Single-process training: AdamW, warm-up + cosine/constant LR, clipping, accumulation, evaluation."""

from __future__ import annotations

import bisect
import contextlib
import json
import math
import time
from pathlib import Path

import torch
import yaml
from torch.utils.tensorboard import SummaryWriter

from stairscale.config import RunConfig
from stairscale.data.lanes import Batch
from stairscale.data.loader import LaneLoader, LoaderSpec
from stairscale.data.prepare import dataset_dir, train_split
from stairscale.data.shards import Dataset
from stairscale.model.lm import StaircaseLM
from stairscale.train.checkpoint import save_checkpoint
from stairscale.train.metrics import Tally, headline, supervised_nll


def resolve_device(cfg: RunConfig) -> torch.device:
    if cfg.train.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.train.device)


def autocast(cfg: RunConfig, device: torch.device):
    bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda")
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def build_model(cfg: RunConfig, dataset: Dataset) -> StaircaseLM:
    return StaircaseLM(cfg.model, len(dataset.vocab), dataset.vocab.pad_id)


def make_loader(cfg: RunConfig, root, split: str, training: bool) -> LaneLoader:
    spec = LoaderSpec(str(root), split, cfg.train.lanes, cfg.train.segment_len, cfg.model.chunk, cfg.train.seed,
                      shuffle=training, on_bad_sample=cfg.data.on_bad_sample)
    return LaneLoader(spec, workers=cfg.data.workers, prefetch=cfg.data.prefetch)


def learning_rate(cfg: RunConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to lr * min_lr_ratio (or constant). With
    train.lr_restarts the schedule starts again at every curriculum stage."""
    t = cfg.train
    start, end, peak = 0, t.steps, t.lr
    if t.lr_restarts:
        bounds = cfg.task.train_length_steps[: cfg.task.stages] + [t.steps]
        stage = bisect.bisect_right(bounds, step) - 1
        start, end = bounds[stage], bounds[stage + 1]
        peak = t.stage_lr[stage] if t.stage_lr else t.lr
    local = step - start
    if local < t.warmup_steps:
        return peak * (local + 1) / t.warmup_steps
    if t.lr_schedule == "constant":
        return peak
    progress = (local - t.warmup_steps) / max(1, end - start - t.warmup_steps)
    floor = peak * t.min_lr_ratio
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * min(progress, 1.0)))


@torch.no_grad()
def evaluate(model: StaircaseLM, cfg: RunConfig, loader: LaneLoader, device: torch.device) -> Tally:
    """Score a whole split once, every lane read with carried state from a fresh start."""
    was_training = model.training
    model.eval()
    tally = Tally.for_dataset(loader.dataset)
    state = model.initial_state(len(loader.local_lanes), device)
    for batch in loader:
        batch = batch.to(device)
        with autocast(cfg, device):
            logprobs, state = model(batch.tokens, batch.doc_start, state)
        tally.add(logprobs, batch.targets, batch.doc_pos)
    model.train(was_training)
    return tally


class Progress:
    """Counters for the console and TensorBoard: a window of recent steps, and the whole run."""

    def __init__(self, dataset: Dataset, steps: int):
        self.dataset, self.steps = dataset, steps
        self.started = time.perf_counter()
        self.restart_window()

    def restart_window(self) -> None:
        self.window = Tally.for_dataset(self.dataset)
        self.window_start = time.perf_counter()
        self.tokens = 0


class Trainer:
    def __init__(self, cfg: RunConfig, quiet: bool = False):
        self.cfg = cfg
        self.quiet = quiet
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        torch.manual_seed(cfg.train.seed)
        self.device = resolve_device(cfg)
        self.data_root = dataset_dir(cfg, self.log)
        self.dataset = Dataset(self.data_root)
        self.labelled = self.dataset.labelled
        self.model = build_model(cfg, self.dataset).to(self.device)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.train.lr, betas=(cfg.train.beta1, cfg.train.beta2), weight_decay=cfg.train.weight_decay
        )
        self.run_dir = Path(cfg.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        self.curve: list[dict] = []

    def log(self, message: str) -> None:
        if not self.quiet:
            print(message, flush=True)

    def train(self) -> dict:
        t = self.cfg.train
        self.model.train()
        self.log(self._describe())
        progress = Progress(self.dataset, t.steps)
        for step, batch, states in self._batches():
            lr = learning_rate(self.cfg, step)
            grad_norm = self._train_step(batch, states, lr, progress.window)
            done = step + 1
            progress.tokens += batch.tokens.numel()
            if done % t.log_every == 0 or done == t.steps:
                self._log_progress(progress, done, lr, grad_norm)
            if t.eval_every and done % t.eval_every == 0 and done < t.steps:
                self._evaluate("valid", done)
                progress.restart_window()  # evaluation time is not training speed
        return self._finish(time.perf_counter() - progress.started)

    def _batches(self):
        """(step, global batch, recurrent state per micro-batch); a curriculum stage starts new lanes."""
        cfg, t = self.cfg, self.cfg.train
        stage = -1
        for step in range(t.steps):
            if stage + 1 < cfg.task.stages and step >= cfg.task.train_length_steps[stage + 1]:
                stage += 1
                batches = iter(make_loader(cfg, self.data_root, train_split(cfg.task, stage), training=True))
                states = [self.model.initial_state(t.lanes // t.grad_accum, self.device) for _ in range(t.grad_accum)]
            yield step, next(batches).to(self.device), states

    def _train_step(self, batch: Batch, states: list, lr: float, tally: Tally) -> float:
        """One optimizer step over the global batch, its lanes split into grad_accum micro-batches,
        each carrying its own state; the loss is normalised over the whole batch's targets."""
        t = self.cfg.train
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        targets = max(1, int((batch.targets >= 0).sum()))
        size = t.lanes // t.grad_accum
        for g in range(t.grad_accum):
            micro = batch.lanes(slice(g * size, (g + 1) * size))
            with autocast(self.cfg, self.device):
                logprobs, states[g] = self.model(micro.tokens, micro.doc_start, states[g])
            (supervised_nll(logprobs, micro.targets) / targets).backward()
            tally.add(logprobs.detach(), micro.targets, micro.doc_pos)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip or float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    def _log_progress(self, progress: Progress, done: int, lr: float, grad_norm: float) -> None:
        now = time.perf_counter()
        speed = progress.tokens / (now - progress.window_start)
        summary = progress.window.summary()
        eta = (now - progress.started) / done * (progress.steps - done)
        self.log(
            f"step {done}/{progress.steps} | loss {summary['loss']:.4f} | {headline(summary)} | lr {lr:.2e} "
            f"| grad {grad_norm:.3f} | {speed / 1e3:.1f}k tok/s | ETA {_duration(eta)}"
        )
        self._scalars("train", summary, done)
        self.writer.add_scalar("train/lr", lr, done)
        self.writer.add_scalar("train/grad_norm", grad_norm, done)
        self.writer.add_scalar("train/tokens_per_s", speed, done)
        progress.restart_window()

    def _finish(self, train_seconds: float) -> dict:
        """Final validation and test, checkpoint and results.json."""
        steps = self.cfg.train.steps
        results = {"train_seconds": train_seconds, "valid": self._evaluate("valid", steps)}
        test = self._test_tally()
        results["test"] = test.summary()
        self._scalars("test", results["test"], steps)
        if self.labelled:
            results["test_error_by_position"] = test.error_by_position(bucket=32)
        results.update(self._facts())
        results["curve"] = self.curve
        self.log(f"test: {headline(results['test'])} (loss {results['test']['loss']:.4f})")
        save_checkpoint(self.run_dir, {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": steps})
        (self.run_dir / "results.json").write_text(json.dumps(results, indent=2))
        self.writer.close()
        return results

    def _test_tally(self) -> Tally:
        return evaluate(self.model, self.cfg, make_loader(self.cfg, self.data_root, "test", training=False), self.device)

    def _evaluate(self, split: str, step: int) -> dict:
        loader = make_loader(self.cfg, self.data_root, split, training=False)
        summary = evaluate(self.model, self.cfg, loader, self.device).summary()
        self._scalars(split, summary, step)
        self.curve.append({"step": step, **{f"{split}_{k}": v for k, v in summary.items()}})
        self.log(f"  {split} at step {step}: {headline(summary)} (loss {summary['loss']:.4f})")
        return summary

    def _scalars(self, split: str, summary: dict, step: int) -> None:
        for key, value in summary.items():
            if key != "targets":
                self.writer.add_scalar(f"{split}/{key}", value, step)

    def _facts(self) -> dict:
        m = self.cfg.model
        return {
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "core_parameters": self.model.core_parameter_count(),
            "passes_per_token": m.passes,
            "reach": reach(self.cfg),
        }

    def _describe(self) -> str:
        m, t = self.cfg.model, self.cfg.train
        facts = self._facts()
        extra = f", global cache limit {m.cache_len} tokens" if m.schedule == "global_cached" else ""
        return (
            f"{m.schedule}: {facts['parameters']:,} parameters ({facts['core_parameters']:,} in the core), "
            f"{facts['passes_per_token']} pass(es)/token{extra}; task {self.cfg.task.name}; "
            f"{t.lanes} lanes x {t.segment_len} tokens x {t.steps} steps on {self.device}; run dir {self.run_dir}"
        )


def reach(cfg: RunConfig) -> int | None:
    """How far back a model can see without carried state, or None for the staircase family,
    whose carried state has no bound. With memory: attention span plus memory (the paper's
    measure), or the stacked span of all layer passes if that is longer."""
    m = cfg.model
    if m.schedule in ("staircase", "cached", "global_cached"):
        return None
    stacked = m.n_layers * m.repeats * (m.attn_lim - 1) + 1
    if m.mem_len == 0:
        return min(cfg.train.segment_len, stacked)
    return max(m.attn_lim + m.mem_len, stacked)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s"
