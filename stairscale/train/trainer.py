"""Single-process training: AdamW, warm-up + cosine/constant LR, clipping, accumulation, evaluation."""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import torch
import yaml
from torch.utils.tensorboard import SummaryWriter

from stairscale.config import RunConfig
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
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.lr_schedule == "constant":
        return t.lr
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    floor = t.lr * t.min_lr_ratio
    return floor + 0.5 * (t.lr - floor) * (1 + math.cos(math.pi * min(progress, 1.0)))


@torch.no_grad()
def evaluate(model: StaircaseLM, cfg: RunConfig, loader: LaneLoader, device: torch.device) -> Tally:
    """Score a whole split once, every lane read with carried state from a fresh start."""
    was_training = model.training
    model.eval()
    tally = Tally(loader.dataset.labelled)
    state = model.initial_state(len(loader.local_lanes), device)
    for batch in loader:
        batch = batch.to(device)
        with autocast(cfg, device):
            logprobs, state = model(batch.tokens, batch.doc_start, state)
        tally.add(logprobs, batch.targets, batch.doc_pos)
    model.train(was_training)
    return tally


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
        cfg, t = self.cfg, self.cfg.train
        model = self.model
        model.train()
        self.log(self._describe())
        groups = [slice(g * t.lanes // t.grad_accum, (g + 1) * t.lanes // t.grad_accum) for g in range(t.grad_accum)]
        stage = -1
        window = Tally(self.labelled)
        started = time.perf_counter()
        window_start, window_tokens = started, 0
        for step in range(t.steps):
            if stage + 1 < cfg.task.stages and step >= cfg.task.train_length_steps[stage + 1]:
                stage += 1  # a new curriculum stage: new lanes from a fresh start
                batches = iter(make_loader(cfg, self.data_root, train_split(cfg.task, stage), training=True))
                states = [model.initial_state(t.lanes // t.grad_accum, self.device) for _ in groups]
            lr = learning_rate(cfg, step)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            batch = next(batches).to(self.device)
            targets = max(1, int((batch.targets >= 0).sum()))
            for g, lanes in enumerate(groups):
                micro = batch.lanes(lanes)
                with autocast(cfg, self.device):
                    logprobs, states[g] = model(micro.tokens, micro.doc_start, states[g])
                (supervised_nll(logprobs, micro.targets) / targets).backward()
                window.add(logprobs.detach(), micro.targets, micro.doc_pos)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip if t.grad_clip else float("inf"))
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            window_tokens += batch.tokens.numel()
            done = step + 1
            if done % t.log_every == 0 or done == t.steps:
                now = time.perf_counter()
                speed = window_tokens / (now - window_start)
                summary = window.summary()
                eta = (now - started) / done * (t.steps - done)
                self.log(
                    f"step {done}/{t.steps} | loss {summary['loss']:.4f} | {headline(summary)} | lr {lr:.2e} "
                    f"| grad {float(grad_norm):.3f} | {speed / 1e3:.1f}k tok/s | ETA {_duration(eta)}"
                )
                self._scalars("train", summary, done)
                self.writer.add_scalar("train/lr", lr, done)
                self.writer.add_scalar("train/grad_norm", float(grad_norm), done)
                self.writer.add_scalar("train/tokens_per_s", speed, done)
                window, window_start, window_tokens = Tally(self.labelled), now, 0
            if t.eval_every and done % t.eval_every == 0 and done < t.steps:
                self._evaluate("valid", done)
                window_start = time.perf_counter()
        results = {"train_seconds": time.perf_counter() - started}
        results["valid"] = self._evaluate("valid", t.steps)
        test = self._test_tally()
        results["test"] = test.summary()
        self._scalars("test", results["test"], t.steps)
        if self.labelled:
            results["test_error_by_position"] = test.error_by_position(bucket=32)
        results.update(self._facts())
        results["curve"] = self.curve
        self.log(f"test: {headline(results['test'])} (loss {results['test']['loss']:.4f})")
        save_checkpoint(self.run_dir, {"model": model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": t.steps})
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
