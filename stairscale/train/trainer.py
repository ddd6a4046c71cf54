"""Training one run, in one process or as one rank of a parallel launch: AdamW, warm-up +
cosine/constant LR, clipping, accumulation, evaluation, checkpoint, TensorBoard."""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import json
import math
import socket
import sys
import time
from pathlib import Path
from typing import NoReturn

import torch
import yaml
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter

from stairscale import files
from stairscale.config import RunConfig, check_writable_dir, reach
from stairscale.data.lanes import Batch
from stairscale.data.prepare import build_task, dataset_dir, train_split
from stairscale.data.shards import Dataset
from stairscale.data.tasks import IGNORE
from stairscale.errors import TrainingDiverged
from stairscale.model.lm import StaircaseLM
from stairscale.model.provider import Scores
from stairscale.model.state import RecurrentState
from stairscale.parallel import collectives
from stairscale.parallel.groups import check_layout, init_distributed
from stairscale.parallel.model import build_model, full_state_dict
from stairscale.train.carried_offset import CarriedOffset
from stairscale.train.checkpoint import BEST, CHECKPOINT, RESULTS, RUN_OUTPUTS, refuse_another_run, save_checkpoint
from stairscale.train.device import autocast, check_backend, resolve_device, uses_bf16
from stairscale.train.engine import build_engine
from stairscale.train.metrics import Tally, headline
from stairscale.train.scoring import evaluate
from stairscale.train.splits import check_splits, make_loader, warn_of_uneven_deals


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


class Progress:
    """Counters for the console and TensorBoard: a window of recent steps, and the whole run."""

    def __init__(self, dataset: Dataset, steps: int):
        self.dataset, self.steps = dataset, steps
        self.started = time.perf_counter()
        self.restart_window()

    def restart_window(self) -> None:
        self.window = Tally.for_dataset(self.dataset)
        self.restart_clock()

    def restart_clock(self) -> None:
        """Speed counts training only: restarted after an evaluation, keeping the steps' scores."""
        self.window_start = time.perf_counter()
        self.tokens = 0


class Trainer:
    """Trains one run in this process, which may be one rank of a parallel launch: the layout comes
    from the launcher and cfg.parallel; only the reporting rank prints and writes files."""

    def __init__(self, cfg: RunConfig, quiet: bool = False):
        self.cfg = cfg
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.device = resolve_device(cfg)
        check_backend(cfg, self.device)
        refuse_another_run(cfg)
        self.layout = init_distributed(cfg.parallel, self.device)
        check_layout(cfg, self.layout)
        if self.layout.reports:
            check_writable_dir(cfg.run_dir, "run_dir")
        self.quiet = quiet or not self.layout.reports
        self.data_root = dataset_dir(cfg, self.log)
        self.dataset = Dataset(self.data_root, cfg.data.on_bad_sample)
        collectives.check_same_data(self.dataset.fingerprint, str(self.data_root), self.layout)
        # What the weights are trained and scored with, kept in checkpoints: scoring them later checks it.
        self.scored_data = {"vocab": self.dataset.vocab.digest, **check_splits(self.dataset, cfg)}
        if self.layout.reports:
            warn_of_uneven_deals(self.dataset, cfg)
        self.vocab = (len(self.dataset.vocab), self.dataset.vocab.pad_id)
        model = build_model(cfg, *self.vocab, self.layout).to(self.device)
        if cfg.train.compile != "none":
            model.core.compile_calls(cfg.train.compile)
        if self.layout.distributed:
            torch.manual_seed(cfg.train.seed + self.layout.rank)  # distinct dropout masks per rank
        self.engine = build_engine(model, cfg, self.layout, uses_bf16(cfg, self.device))
        self.model = self.engine.module
        self.run_dir = Path(cfg.run_dir)
        self.writer = self._open_run_dir() if self.layout.reports else None
        self.curve: list[dict] = []
        self.history: list[dict] = []  # loss and gradient norm of every step
        self.unread: list[tuple] = []  # the same, for the steps since the last log line, still on the device
        self.label_shifts: list[CarriedOffset] | None = None  # train.carried_offset_stages
        self.best: dict | None = None  # train.keep_best: step, validation and test of the best weights so far
        self.best_test: Tally | None = None

    def _open_run_dir(self) -> SummaryWriter:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._move_earlier_run_aside()
        files.write_text(self.run_dir / "config.yaml", yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
        files.write_text(self.run_dir / "layout.json", json.dumps(dataclasses.asdict(self.layout), indent=2))
        return SummaryWriter(str(self.run_dir / "tensorboard"))

    def _move_earlier_run_aside(self) -> None:
        """The same config run again in its directory replaces the run there: the earlier run's
        weights, results and curves move to replaced-N/, so the two never mix, even if this one
        stops early (TensorBoard shows the earlier curves as a run of their own)."""
        outputs = [self.run_dir / name for name in RUN_OUTPUTS if (self.run_dir / name).exists()]
        curves = sorted(self.run_dir.glob("tensorboard/events.out.tfevents.*")) + sorted(self.run_dir.glob("tensorboard/replaced-*"))
        earlier = outputs + curves
        if not earlier:
            return
        aside = next(self.run_dir / f"replaced-{n}" for n in itertools.count(1) if not (self.run_dir / f"replaced-{n}").exists())
        (aside / "tensorboard").mkdir(parents=True)
        for path in earlier + [path for path in (self.run_dir / "config.yaml", self.run_dir / "layout.json") if path.exists()]:
            path.rename(aside / path.relative_to(self.run_dir))
        self.log(f"the earlier run in {self.run_dir} moved to {aside}")

    def log(self, message: str) -> None:
        if not self.quiet:
            print(message, flush=True)

    def train(self) -> dict:
        t = self.cfg.train
        self.model.train()
        self.log(self._describe())
        progress = Progress(self.dataset, t.steps)
        try:
            for step, batch, states in self.batches():
                lr = learning_rate(self.cfg, step)
                loss, grad_norm = self.train_step(batch, states, lr, progress.window)
                self.unread.append((loss, grad_norm))
                done = step + 1
                progress.tokens += batch.tokens.numel() * self.layout.dp
                if done % t.log_every == 0 or done == t.steps:
                    self._read_back_history()
                    self._log_progress(progress, done, lr, self.history[-1]["grad_norm"])
                if t.eval_every and done % t.eval_every == 0 and done < t.steps:
                    self._read_back_history()  # a diverged run stops before it scores or keeps its weights
                    self._validate(done)
                    progress.restart_clock()
            return self._finish(time.perf_counter() - progress.started)
        finally:  # the curves so far reach the event file, unless Ctrl-C may have cut a write short
            if self.writer is not None and not isinstance(sys.exc_info()[1], KeyboardInterrupt):
                self.writer.close()  # (an interrupted write can leave the writer's lock held: close would wait forever)

    def batches(self):
        """(step, this rank's batch, recurrent state per micro-batch). A curriculum stage starts new
        lanes, and sets the stage's label shifts (train.carried_offset_stages) that train_step applies."""
        cfg, t = self.cfg, self.cfg.train
        stage = -1
        for step in range(t.steps):
            if stage + 1 < cfg.task.stages and step >= cfg.task.train_length_steps[stage + 1]:
                stage += 1
                loader = make_loader(cfg, self.data_root, train_split(cfg.task, stage), training=True, layout=self.layout)
                stage_batches = iter(loader)
                size = len(loader.local_lanes) // t.grad_accum
                states = [RecurrentState.initial(size, self.device) for _ in range(t.grad_accum)]
                self.label_shifts = self._label_shifts(stage, size)
            yield step, next(stage_batches), states

    def _label_shifts(self, stage: int, lanes: int) -> list[CarriedOffset] | None:
        """One carried offset per micro-batch where this stage trains on shifted labels (on the
        ranks that hold the output head: the others never read the targets)."""
        if stage not in self.cfg.train.carried_offset_stages or not self.layout.last_stage:
            return None
        walk = build_task(self.cfg.task)
        return [CarriedOffset(walk.positions, walk.first_position_id, lanes, self.device) for _ in range(self.cfg.train.grad_accum)]

    def train_step(self, batch: Batch, states: list, lr: float, tally: Tally) -> tuple[Tensor | float, Tensor | float]:
        """One optimizer step; `batch` is this rank's share of the global batch (on the host; moved
        to the device here). Its lanes are split into grad_accum micro-batches, each carrying its
        own state; the loss is normalised over the targets of the whole global batch (times dp,
        because the data-parallel reduction averages). Returns the global batch's mean loss and the gradient
        norm before clipping; in one process without ZeRO both stay on the device, so the step never
        waits for them."""
        t = self.cfg.train
        targets = collectives.sum_over_data_parallel(int((batch.targets != IGNORE).sum()), self.layout)
        scale = self.layout.dp / max(1, targets)
        micros = batch.split(t.grad_accum)
        on_device = [m.to(self.device) for m in micros]
        inputs = on_device if self.label_shifts is None else [shift.shift(m) for shift, m in zip(self.label_shifts, on_device)]
        nll = torch.zeros((), dtype=torch.float64, device=self.device)
        for g, (micro, scores) in enumerate(zip(micros, self._forward_backward(inputs, states, scale))):
            if scores is not None:  # None on pipeline stages without the head
                tally.add(scores, micro.targets, micro.doc_pos)  # errors against the true labels, the loss as trained
                nll += scores.nll.sum(dtype=torch.float64)
                if self.label_shifts is not None:
                    self.label_shifts[g].update(on_device[g], scores.predicted)
        grad_norm = self.engine.step(lr)
        return collectives.sum_over_data_parallel(nll, self.layout) / max(1, targets), grad_norm

    def _forward_backward(self, micros: list[Batch], states: list, scale: float) -> list[Scores | None]:
        """Gradients of every micro-batch, one after the other, or as the pipeline's wavefront."""
        if self.layout.pp > 1:
            with autocast(self.cfg, self.device):
                return self.model.runner.train([(m.tokens, m.doc_start, m.targets) for m in micros], states, scale)
        scores = []
        for g, micro in enumerate(micros):
            with autocast(self.cfg, self.device):
                out, states[g] = self.engine.forward(micro.tokens, micro.doc_start, micro.targets, states[g])
            self.engine.backward(out.nll.sum() * scale)
            scores.append(Scores(out.nll.detach(), out.predicted))
        return scores

    def _read_back_history(self) -> None:
        """Read the steps' loss and gradient norm back from the device (at log lines and before
        validations) and stop at a value that is not a finite number: the weights are then lost,
        and every later step would be wasted."""
        if not self.unread:  # every rank has read back the same steps
            return
        first = len(self.history)
        self.history += [{"loss": float(loss), "grad_norm": float(norm)} for loss, norm in self.unread]
        self.unread = []
        bad = next((step for step, s in enumerate(self.history[first:], first + 1) if not (math.isfinite(s["loss"]) and math.isfinite(s["grad_norm"]))), None)
        if collectives.any_rank(bad is not None, self.layout, self.device):  # the loss is on the last stage only
            # (a stage without the loss saw only a finite gradient norm)
            where = f"by step {len(self.history)}" if bad is None else (
                f"at step {bad} (loss {self.history[bad - 1]['loss']}, gradient norm {self.history[bad - 1]['grad_norm']})")
            self._diverged(where)

    def _diverged(self, where: str) -> NoReturn:
        kept = f"; {BEST} keeps the weights of step {self.best['step']}" if self.best else ""
        clip = " or set train.grad_clip" if not self.cfg.train.grad_clip else ""
        raise TrainingDiverged(f"training diverged {where}: the run stops without a checkpoint{kept}. Lower train.lr, "
                               f"lengthen train.warmup_steps{clip}")

    def _log_progress(self, progress: Progress, done: int, lr: float, grad_norm: float) -> None:
        now = time.perf_counter()
        speed = progress.tokens / (now - progress.window_start)
        summary = collectives.sum_tallies(progress.window, self.layout).summary()
        eta = (now - progress.started) / done * (progress.steps - done)
        shifted = self._shifted_labels()
        self.log(
            f"step {done}/{progress.steps} | loss {summary['loss']:.4f} | {headline(summary)} | lr {lr:.2e} "
            f"| grad {grad_norm:.3f} | {speed / 1e3:.1f}k tok/s | ETA {_duration(eta)}"
            + ("" if shifted is None else f" | shifted labels {shifted:.1f}%")
        )
        if shifted is not None:
            self._scalars("train", {"shifted_labels": shifted}, done)
        self._scalars("train", summary, done)
        self._scalars("train", {"lr": lr, "grad_norm": grad_norm, "tokens_per_s": speed}, done)
        progress.restart_window()

    def _shifted_labels(self) -> float | None:
        """Percent of this rank's training labels shifted by the carried offset since the last log
        line (percent, as the error is)."""
        if self.label_shifts is None:
            return None
        counts = [shift.take_counts() for shift in self.label_shifts]
        return 100 * sum(shifted for shifted, _ in counts) / max(1, sum(supervised for _, supervised in counts))

    def _finish(self, train_seconds: float) -> dict:
        """Checkpoint (single-device weights), then final validation and test, and results.json."""
        steps = self.cfg.train.steps
        self._save(CHECKPOINT, steps)
        results = {"train_seconds": train_seconds, "valid": self._validate(steps)}
        test = self.best_test if self.best and self.best["step"] == steps else self.score_split("test")
        results.update(self._test_results(test))
        self._scalars("test", results["test"], steps)
        if self.best:
            results["best"] = self.best
            self.log(f"best validation at step {self.best['step']}: test {headline(self.best['test'])} ({BEST})")
        results.update(self._facts())
        results["curve"] = self.curve
        results["steps"] = self.history
        self.log(f"test: {headline(results['test'])} (loss {results['test']['loss']:.4f})")
        if self.layout.reports:
            files.write_text(self.run_dir / RESULTS, json.dumps(results, indent=2))
        self.log(f"in {self.run_dir}: {RESULTS}, {CHECKPOINT}{f', {BEST}' if self.best else ''}, config.yaml, tensorboard/")
        return results

    def _save(self, name: str, step: int) -> None:
        """Write the single-device weights; weights that are not all finite numbers (an update after
        the last loss read back overflowed them) stop the run instead."""
        weights = full_state_dict(self.model, self.cfg, *self.vocab, self.layout)  # a collective; on the reporting rank
        finite = weights is None or all(bool(w.isfinite().all()) for w in weights.values() if w.is_floating_point())
        if collectives.any_rank(not finite, self.layout, self.device):
            self._diverged(f"by step {step}")
        if self.layout.reports:
            save_checkpoint(self.run_dir, {"model": weights, "model_config": dataclasses.asdict(self.cfg.model),
                                           "step": step, "layout": dataclasses.asdict(self.layout),
                                           "data": self.scored_data}, name)

    def _test_results(self, test: Tally) -> dict:
        results = {"test": test.summary()}
        if self.dataset.labelled:
            results["test_error_by_position"] = test.error_by_position(bucket=32)
        return results

    def _validate(self, step: int) -> dict:
        """Score the validation split; with train.keep_best, weights better than any before are
        written to best.pt and scored on the test split."""
        valid = self._evaluate("valid", step)
        if self.cfg.train.keep_best and self._improves(valid):
            self._save(BEST, step)
            self.best_test = self.score_split("test")
            self.best = {"step": step, "valid": valid, **self._test_results(self.best_test)}
            self.log(f"  the best validation so far: weights kept as {BEST}")
        return valid

    def _improves(self, valid: dict) -> bool:
        """Whether these weights beat the best so far; every rank follows the last pipeline stage,
        which holds the scores."""
        finite = math.isfinite(valid["loss"])  # weights that are no longer numbers are never the best
        better = self.layout.last_stage and finite and (self.best is None or selection_score(valid) < selection_score(self.best["valid"]))
        return collectives.any_rank(better, self.layout, self.device)

    def score_split(self, split: str) -> Tally:
        """The model's tally on a split now: validations capped at train.eval_batches, the test whole."""
        loader = make_loader(self.cfg, self.data_root, split, training=False, layout=self.layout)
        batches = self.cfg.train.eval_batches if split == "valid" else 0
        return evaluate(self.model, self.cfg, loader, self.device, self.layout, batches)

    def _evaluate(self, split: str, step: int) -> dict:
        started = time.perf_counter()
        summary = self.score_split(split).summary()
        self._scalars(split, summary, step)
        self.curve.append({"step": step, **{f"{split}_{k}": v for k, v in summary.items()}})
        self.log(f"  {split} at step {step}: {headline(summary)} (loss {summary['loss']:.4f}; "
                 f"{summary['targets']:,} targets in {time.perf_counter() - started:.1f} s)")
        return summary

    def _scalars(self, split: str, summary: dict, step: int) -> None:
        if self.writer is None:
            return
        for key, value in summary.items():
            if key != "targets":
                self.writer.add_scalar(f"{split}/{key}", value, step)

    def _facts(self) -> dict:
        m = self.cfg.model
        with torch.device("meta"):
            full = StaircaseLM(m, *self.vocab)
        return {
            "parameters": sum(p.numel() for p in full.parameters()),
            "core_parameters": full.core_parameter_count(),
            "passes_per_token": m.passes,
            "reach": reach(self.cfg),
            "layout": self.layout.describe(),
        }

    def _describe(self) -> str:
        m, t = self.cfg.model, self.cfg.train
        facts = self._facts()
        extra = f", global cache limit {m.cache_len} tokens" if m.schedule == "global_cached" else ""
        return (
            f"{m.schedule}: {facts['parameters']:,} parameters ({facts['core_parameters']:,} in the core), "
            f"{facts['passes_per_token']} pass(es)/token{extra}; task {self.cfg.task.name}; "
            f"{t.lanes} lanes x {t.segment_len} tokens x {t.steps} steps on {self.device}, {facts['layout']}; "
            f"run dir {self.run_dir}" + (f" on {socket.gethostname()}" if self.layout.distributed else "")
        )


def selection_score(summary: dict) -> float:
    """What train.keep_best minimises: the error where the task has one, else the loss."""
    return summary.get("error", summary["loss"])


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s"
