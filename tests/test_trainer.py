"""End to end: real runs of the trainer and the command line on tiny configs."""

import argparse
import hashlib
import json
import math
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from stairscale.bench import bench_data, bench_step
from stairscale.config import load_config, reach
from stairscale.data.prepare import train_split
from stairscale.data.tasks import IGNORE
from stairscale.errors import CheckpointError, ConfigError, DataError, TrainingDiverged
from stairscale.model.core import call_shapes_bound
from stairscale.train.checkpoint import BEST, CHECKPOINT, load_checkpoint, save_checkpoint
from stairscale.train.scoring import evaluate, evaluate_run
from stairscale.train.splits import make_loader
from stairscale.train.trainer import Trainer, learning_rate

TINY = ["model.d_model=16", "model.d_ff=32", "model.n_heads=2", "train.lanes=4", "train.segment_len=16",
        "model.chunk=4", "model.attn_lim=16", "train.log_every=2", "train.eval_every=3", "task.eval_docs=8",
        "task.train_docs=200", "train.warmup_steps=1"]


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """Prepared datasets shared by the tests of this module."""
    return tmp_path_factory.mktemp("datasets")


@pytest.fixture
def tiny(tmp_path, cache):
    def make(path, *overrides):
        return load_config(None, TINY + [f"data.cache={cache}", f"run_dir={path / 'run'}", *overrides])

    return make


@pytest.mark.parametrize(
    "task",
    [
        ["task.name=random_walk", "task.train_lengths=[20]", "task.train_length_steps=[0]", "task.eval_length=40"],
        ["task.name=algorithmic"],
    ],
)
def test_training_writes_results_tensorboard_and_checkpoint(tmp_path, tiny, task):
    cfg = tiny(tmp_path, "train.steps=6", *task)
    results = Trainer(cfg, quiet=True).train()
    run = tmp_path / "run"
    assert 0 <= results["test"]["error"] <= 100
    assert json.loads((run / "results.json").read_text())["test"] == results["test"]
    assert (run / "checkpoint.pt").is_file() and (run / "config.yaml").is_file()
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/error", "train/lr", "train/grad_norm", "train/tokens_per_s", "valid/error", "test/loss"} <= tags
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6]


def test_keep_best_keeps_the_weights_of_the_best_validation(tmp_path, tiny):
    """best.pt holds the weights of the step whose validation was best (the weights a shorter run
    ends with, bit for bit), and results.json scores them on the test split as `eval` does."""
    walk = ["task.name=random_walk", "task.train_lengths=[20]", "task.train_length_steps=[0]", "task.eval_length=40",
            "train.lr_schedule=constant", "train.warmup_steps=0", "train.lr=0.03", "train.eval_every=2"]
    results = Trainer(tiny(tmp_path, "train.steps=8", "train.keep_best=true", *walk), quiet=True).train()
    run = tmp_path / "run"
    validations = [(point["valid_error"], point["step"]) for point in results["curve"]]
    assert [step for _, step in validations] == [2, 4, 6, 8]
    best = results["best"]
    assert best["step"] == min(validations)[1] < 8  # the first of equal errors; not the last step, so not the final weights
    assert best["valid"]["error"] == min(validations)[0]
    assert json.loads((run / "results.json").read_text())["best"] == json.loads(json.dumps(best))

    shorter = tmp_path / "shorter"
    Trainer(tiny(shorter, f"train.steps={best['step']}", *walk), quiet=True).train()
    kept, ended = load_checkpoint(run, "best.pt"), load_checkpoint(shorter / "run")
    assert kept["step"] == best["step"]
    assert kept["model"].keys() == ended["model"].keys()
    assert all(torch.equal(kept["model"][name], ended["model"][name]) for name in kept["model"])

    scored = evaluate_run(str(run), "test", weights="best")
    assert scored["loss"] == pytest.approx(best["test"]["loss"], rel=1e-9)
    assert scored["error"] == pytest.approx(best["test"]["error"], abs=1e-9)


def test_text_task_reports_bits_per_byte(tmp_path, tiny):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"f{i}.txt").write_text(f"file {i}: " + "the quick brown fox jumps over the lazy dog. " * (i % 5 + 1))
    cfg = tiny(tmp_path, "train.steps=4", "task.name=text", f"task.path={corpus}")
    results = Trainer(cfg, quiet=True).train()
    test = results["test"]
    assert 0 < test["bpb"] < 10 and "error" not in test
    assert test["bpb"] == pytest.approx(test["loss"] / math.log(2)) and test["perplexity"] == pytest.approx(math.exp(test["loss"]))


def test_a_text_file_is_cut_into_splits_and_an_empty_split_fails_before_training(tmp_path, tiny):
    corpus = tmp_path / "book.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    results = Trainer(tiny(tmp_path, "train.steps=2", "task.name=text", f"task.path={corpus}"), quiet=True).train()
    assert results["test"]["bpb"] > 0
    # As one document ("files"), it fills one split and leaves the others empty.
    cfg = tiny(tmp_path / "files", "train.steps=2", "task.name=text", f"task.path={corpus}", "task.format=files")
    with pytest.raises(DataError, match="has no documents"):
        Trainer(cfg, quiet=True)
    assert not (tmp_path / "files" / "run").exists()


def test_a_split_with_nothing_to_predict_fails_before_training(tmp_path, tiny):
    corpus = tmp_path / "tiny.txt"
    corpus.write_bytes(b"0123456789")  # cut 90/5/5 by bytes: the valid split gets no byte, only its start token
    with pytest.raises(DataError, match="split valid has nothing to predict"):
        Trainer(tiny(tmp_path, "task.name=text", f"task.path={corpus}"), quiet=True)


def test_loss_decreases_on_the_random_walk(tmp_path, tiny):
    cfg = tiny(tmp_path, "train.steps=60", "train.lr=0.01", "train.warmup_steps=5", "task.train_lengths=[16]",
               "task.train_length_steps=[0]", "task.eval_length=16", "train.eval_every=0")
    trainer = Trainer(cfg, quiet=True)
    loader = make_loader(cfg, trainer.data_root, "test", training=False)
    before = evaluate(trainer.model, cfg, loader, trainer.device).summary()["loss"]
    after = trainer.train()["test"]["loss"]
    assert after < before - 0.3, (before, after)


@pytest.mark.parametrize("schedule", [
    ["model.schedule=staircase"],
    ["model.schedule=cached", "model.cache_len=8", "model.attn_lim=16"],
    ["model.schedule=transformer_xl", "model.mem_len=15"],
])
def test_evaluation_carries_state_across_segments(tmp_path, tiny, schedule):
    """Scoring 40-token documents in segments of 8, 12 or 16 tokens gives what scoring each in one
    unbroken segment of 40 gives: every lane's state is carried from one batch to the next."""
    walk = ["task.train_lengths=[20]", "task.train_length_steps=[0]", "task.eval_length=40", *schedule]
    trainer = Trainer(tiny(tmp_path, "train.segment_len=8", *walk), quiet=True)
    tallies = {}
    for segment in (40, 8, 12, 16):
        cfg = tiny(tmp_path / str(segment), f"train.segment_len={segment}", *walk)
        loader = make_loader(cfg, trainer.data_root, "test", training=False)
        tallies[segment] = evaluate(trainer.model, cfg, loader, trainer.device)
    whole = tallies.pop(40)
    assert whole.count == 8 * 39  # eval_docs walks of 39 moves
    for segment, tally in tallies.items():
        assert tally.count == whole.count and tally.count_at.tolist() == whole.count_at.tolist()
        assert tally.nll == pytest.approx(whole.nll, rel=1e-5), segment
        assert tally.errors_at.tolist() == whole.errors_at.tolist(), segment


def test_gradient_accumulation_matches_one_big_batch(tmp_path, tiny):
    """The same loss and gradient norm at every step (AdamW and clipping would hide a wrong gradient
    scale in the weights alone), and the same weights after."""
    params, steps = [], []
    for accum in (1, 2):
        cfg = tiny(tmp_path / str(accum), "train.steps=2", f"train.grad_accum={accum}", "train.eval_every=0",
                   "task.train_lengths=[10]", "task.train_length_steps=[0]", "task.eval_docs=2")
        trainer = Trainer(cfg, quiet=True)
        steps.append(trainer.train()["steps"])
        params.append(torch.cat([p.detach().flatten() for p in trainer.model.parameters()]))
    # Micro-batches with unequal target counts: scaling each by its own count would then differ.
    batches = iter(make_loader(cfg, trainer.data_root, train_split(cfg.task, 0), training=True))
    counts = [[int((micro.targets != IGNORE).sum()) for micro in next(batches).split(2)] for _ in steps[1]]
    assert any(first != second for first, second in counts), counts
    assert_same_steps(steps[1], steps[0])
    assert (params[0] - params[1]).abs().max() < 1e-5


def assert_same_steps(got: list[dict], want: list[dict], rel: float = 1e-6) -> None:
    assert len(got) == len(want) > 0
    for a, b in zip(got, want):
        assert a["loss"] == pytest.approx(b["loss"], rel=rel) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=rel)


def test_compiled_training_matches_eager(tmp_path, tiny):
    """train.compile through the real inductor backend: the same losses and gradient norms as eager,
    step by step, and the same weights after."""
    runs, weights, graphs = {}, {}, {}
    for mode in ("none", "default"):
        cfg = tiny(tmp_path / mode, "train.steps=3", f"train.compile={mode}", "train.eval_every=0", "model.n_layers=1",
                   "model.schedule=transformer", "task.train_lengths=[16]", "task.train_length_steps=[0]", "task.eval_docs=4")
        trainer = Trainer(cfg, quiet=True)
        torch._dynamo.utils.counters.clear()
        runs[mode] = trainer.train()
        graphs[mode] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        weights[mode] = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    # The compiled run did compile its core calls (training and evaluation: two graphs at least), the eager one nothing.
    assert graphs == {"none": 0, "default": graphs["default"]} and graphs["default"] >= 2, graphs
    assert_same_steps(runs["default"]["steps"], runs["none"]["steps"], rel=1e-5)
    assert (weights["default"] - weights["none"]).abs().max() < 1e-5
    assert runs["default"]["test"]["loss"] == pytest.approx(runs["none"]["test"]["loss"], rel=1e-5)


def test_compiled_calls_may_take_every_shape_a_filling_cache_makes(tmp_path, tiny):
    """train.compile fails rather than fall back to eager when a core call has more shapes than
    the recompile limit it sets: a cache of 64 rows filled a chunk of 1 at a time, in training and
    in evaluation, must fit under it (counted in an eager run, as dynamo tells shapes apart)."""
    cfg = tiny(tmp_path, "train.steps=6", "train.eval_every=0", "model.schedule=global_cached", "model.chunk=1",
               "model.window=1", "model.cache_len=64", "model.attn_lim=65", "task.eval_length=128")
    trainer = Trainer(cfg, quiet=True)
    core, shapes = trainer.model.core, set()
    run_layers = core.run_layers

    def recorded(x, pos, doc, context):
        shapes.add((x.shape, pos.shape, doc.shape, None if context is None else context.h.shape, torch.is_grad_enabled()))
        return run_layers(x, pos, doc, context)

    core.run_layers = recorded
    trainer.train()
    assert 64 * 2 < len(shapes) <= call_shapes_bound(cfg.model)  # (64 + 64 were too few)
    core.compile_calls(backend="eager")  # both of dynamo's limits are raised to the bound
    limits = torch._dynamo.config
    assert min(limits.recompile_limit, limits.accumulated_recompile_limit) >= call_shapes_bound(cfg.model)


def test_compile_is_refused_where_it_is_untested(tmp_path, tiny):
    with pytest.raises(ConfigError, match="train.compile"):
        Trainer(tiny(tmp_path, "train.compile=default", "parallel.zero_stage=1"), quiet=True)


def test_step_benchmark_counts_what_an_eager_step_dispatches(tmp_path, tiny, capsys):
    cfg = tiny(tmp_path, "task.train_lengths=[16]", "task.train_length_steps=[0]")
    def run_dirs():
        return set(Path(tempfile.gettempdir()).glob("*/layout.json"))

    before = run_dirs()
    rows = bench_step(cfg, ["none", "no-such-mode"], steps=2, warmup=1)
    assert run_dirs() == before  # the timers' temporary run directories are removed
    assert [row["compile"] for row in rows] == ["none", "no-such-mode"]
    assert rows[0]["ms_per_step"] > 0 and rows[0]["ops_per_step"] > 100
    assert rows[0]["host_waits_per_step"] is None  # counted on a GPU only
    # A mode that fails is reported with its error; the others are still measured and compared.
    assert "ms_per_step" not in rows[1] and "no-such-mode" in rows[1]["error"]
    printed = capsys.readouterr().out
    assert "compile no-such-mode: failed: " in printed and "fastest: none" in printed


def test_step_benchmark_ratios_read_the_right_way_round(tmp_path, tiny, capsys, monkeypatch):
    """Timings are noisy, so the arithmetic is checked with set ones: eager at 4 ms, a mode at 2 ms."""
    import stairscale.bench

    monkeypatch.setattr(stairscale.bench.StepTimer, "seconds_per_step", lambda self, steps, warmup: 0.004)
    monkeypatch.setattr(stairscale.bench, "measure_step", lambda cfg, steps, warmup, compile=None: 0.002)
    cfg = tiny(tmp_path, "task.train_lengths=[16]", "task.train_length_steps=[0]")
    rows = bench_step(cfg, ["none", "twice-as-fast"], steps=2, warmup=1)
    assert [row["ms_per_step"] for row in rows] == [4.0, 2.0]
    printed = capsys.readouterr().out
    assert "compile twice-as-fast: 2.0 ms/step | speed-up over eager 2.00x" in printed and "fastest: twice-as-fast" in printed


def test_data_benchmark_sets_the_loader_beside_the_train_step(tmp_path, tiny, capsys):
    cfg = tiny(tmp_path, "task.train_lengths=[16]", "task.train_length_steps=[0]")
    result = bench_data(cfg, seconds=0.2, steps=2, warmup=1)
    assert result["loader_tokens_per_s"] > 0 and result["train_tokens_per_s"] > 0
    assert result["loader_over_train"] == result["loader_tokens_per_s"] / result["train_tokens_per_s"]
    assert f"loader / train = {result['loader_over_train']:.1f}x" in capsys.readouterr().out


def test_cli_train_then_eval_agree(tmp_path, cache):
    run = tmp_path / "cli"
    overrides = TINY + ["train.steps=3", f"run_dir={run}", f"data.cache={cache}", "task.train_lengths=[20]", "task.train_length_steps=[0]"]
    cmd = [sys.executable, "-m", "stairscale.cli"]
    trained = subprocess.run(cmd + ["train"] + [a for o in overrides for a in ("--set", o)], capture_output=True, text=True)
    assert trained.returncode == 0, trained.stderr
    assert "test: error" in trained.stdout and "ETA" in trained.stdout
    assert "  valid at step 3: error" in trained.stdout and " targets in " in trained.stdout
    assert f"in {run}: results.json, checkpoint.pt, config.yaml, tensorboard/" in trained.stdout
    scored = subprocess.run(cmd + ["eval", "--run", str(run)], capture_output=True, text=True)
    assert scored.returncode == 0, scored.stderr
    result = json.loads(scored.stdout)
    expected = json.loads((run / "results.json").read_text())["test"]
    assert f"test: error {expected['error']:.2f}%" in scored.stderr  # a summary beside the JSON
    assert result["error"] == pytest.approx(expected["error"], abs=1e-9)
    assert result["loss"] == pytest.approx(expected["loss"], rel=1e-9)  # the error alone barely moves after 3 steps
    # Bad input: a clear message naming the key or the file, no traceback.
    changed = subprocess.run(cmd + ["eval", "--run", str(run), "--set", "model.d_model=32"], capture_output=True, text=True)
    assert changed.returncode == 2 and "model.d_model" in changed.stderr and "Traceback" not in changed.stderr
    if not torch.cuda.is_available():  # a GPU asked for where there is none: the key, before any work
        gpu = subprocess.run(cmd + ["eval", "--run", str(run), "--set", "train.device=cuda"], capture_output=True, text=True)
        assert gpu.returncode == 2 and "train.device" in gpu.stderr and "Traceback" not in gpu.stderr
    # Weights of another model with the same shapes (another window) are not scored as this one.
    config = run / "config.yaml"
    original = config.read_text()
    config.write_text(original.replace("window: 2", "window: 1"))
    other = subprocess.run(cmd + ["eval", "--run", str(run)], capture_output=True, text=True)
    assert other.returncode == 1 and "Traceback" not in other.stderr
    assert f"checkpoint {run / 'checkpoint.pt'} was trained as another model than its run's config.yaml describes (model.window 2 -> 1)" in other.stderr
    config.write_text(original)
    # A run trained on GPUs over nccl is scored in one process on the CPU all the same.
    config.write_text(config.read_text().replace("backend: auto", "backend: nccl"))
    on_cpu = subprocess.run(cmd + ["eval", "--run", str(run), "--set", "train.device=cpu"], capture_output=True, text=True)
    assert on_cpu.returncode == 0 and json.loads(on_cpu.stdout)["loss"] == pytest.approx(expected["loss"], rel=1e-9), on_cpu.stderr
    checkpoint = run / "checkpoint.pt"

    def change_a_weight():  # as a flipped bit on disk would, with the file still readable
        payload = torch.load(checkpoint, weights_only=True)
        next(iter(payload["model"].values())).view(-1)[0] += 1e-3
        torch.save(payload, checkpoint)

    damages = (
        (change_a_weight, "is corrupt: its weights do not match the digest"),
        (lambda: checkpoint.write_bytes(checkpoint.read_bytes()[:1000]), "cannot be read"),
        (lambda: torch.save({"state_dict": {}}, checkpoint), "no 'model' entry"),
        (lambda: torch.save({"model": [torch.ones(2)]}, checkpoint), "no 'model' entry of named tensors"),
        (lambda: torch.save({"model": {}, "code": argparse.Namespace()}, checkpoint), "cannot be read"),  # no pickled objects
        (checkpoint.unlink, "no checkpoint"),
    )
    for damage, problem in damages:
        damage()
        failed = subprocess.run(cmd + ["eval", "--run", str(run)], capture_output=True, text=True)
        assert failed.returncode == 1 and problem in failed.stderr and str(checkpoint) in failed.stderr
        assert "Traceback" not in failed.stderr


def test_a_run_directory_holds_one_run(tmp_path, cache):
    """The same config may run again in its directory; another one is refused before it changes
    anything there, so config.yaml, checkpoint and results keep describing one run."""
    run = tmp_path / "run"
    overrides = TINY + ["train.steps=2", f"run_dir={run}", f"data.cache={cache}", "task.train_lengths=[20]", "task.train_length_steps=[0]"]
    cmd = [sys.executable, "-m", "stairscale.cli", "train"] + [a for o in overrides for a in ("--set", o)]
    for again in ([], ["--set", "train.threads=1", "--set", "data.workers=1"]):  # how it runs is not what it computes
        done = subprocess.run(cmd + again, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    # The rerun replaced the run; the first run's weights, results and curves are kept aside, not mixed with the rerun's.
    for folder in (run, run / "replaced-1"):
        events = EventAccumulator(str(folder / "tensorboard"))
        events.Reload()
        assert [e.step for e in events.Scalars("test/loss")] == [2], folder
        assert json.loads((folder / "results.json").read_text())["test"]["loss"] > 0 and (folder / "checkpoint.pt").is_file()
    assert load_config(run / "replaced-1" / "config.yaml").train.threads != load_config(run / "config.yaml").train.threads
    files = {path: path.stat().st_mtime_ns for path in run.rglob("*")}
    other = subprocess.run(cmd + ["--set", "model.schedule=transformer"], capture_output=True, text=True)
    assert other.returncode == 2 and "Traceback" not in other.stderr
    assert f"run_dir: {run} holds another run (model.schedule 'staircase' -> 'transformer')" in other.stderr
    assert {path: path.stat().st_mtime_ns for path in run.rglob("*")} == files
    (run / "config.yaml").write_text("model: [")
    unreadable = subprocess.run(cmd, capture_output=True, text=True)
    assert unreadable.returncode == 2 and "config.yaml cannot be read" in unreadable.stderr and "Traceback" not in unreadable.stderr


def test_cli_config_error_names_the_key(tmp_path):
    out = subprocess.run([sys.executable, "-m", "stairscale.cli", "train", "--set", "model.window=0"], capture_output=True, text=True)
    assert out.returncode == 2 and "model.window" in out.stderr
    if not torch.cuda.is_available():
        args = ["--set", "train.device=cuda", "--set", f"data.cache={tmp_path / 'data'}", "--set", f"run_dir={tmp_path / 'run'}"]
        out = subprocess.run([sys.executable, "-m", "stairscale.cli", "train", *args], capture_output=True, text=True)
        assert out.returncode == 2 and "train.device" in out.stderr and "Traceback" not in out.stderr
        assert not (tmp_path / "data").exists()  # refused before any data was prepared
        args[1] = "parallel.backend=nccl"
        out = subprocess.run([sys.executable, "-m", "stairscale.cli", "train", *args], capture_output=True, text=True)
        assert out.returncode == 2 and "parallel.backend" in out.stderr and "Traceback" not in out.stderr
        assert not (tmp_path / "data").exists()


def test_bad_paths_and_arguments_are_refused_before_any_work(tmp_path):
    """Each names what is wrong, exits 2 without a traceback, and prepares no data."""
    afile = tmp_path / "afile"
    afile.write_text("")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"train:\n  steps: \xff\xfe\n")
    data = ["--set", f"data.cache={tmp_path / 'data'}"]
    cases = {
        ("train", "--set", f"run_dir={afile}", *data): f"run_dir: {afile} exists and is not a directory",
        ("train", "--set", f"run_dir={afile}/run", *data): f"run_dir: {afile}/run cannot be made: {afile} is not a directory",
        ("train", "--set", "run_dir=''", *data): "run_dir: must name a directory",
        ("train", "--set", f"run_dir={tmp_path}/dangling/run", *data): f"{tmp_path}/dangling is a broken link",
        ("train", "--set", f"data.cache={afile}"): f"data.cache: {afile} exists and is not a directory",
        ("prepare-data", "--out", f"{afile}/x"): f"--out: {afile}/x cannot be made",
        ("reproduce", "tracking", "--quick", "--out", str(afile)): f"--out: {afile} exists and is not a directory",
        ("train", "--config", str(afile), "--config", str(afile)): "--config given twice",
        ("bench", "step", "--steps", "0"): "argument --steps: must be > 0, got 0",
        ("bench", "data", "--seconds", "-1"): "argument --seconds: must be > 0, got -1",
        ("bench", "step", "--compile", "default,bogus"): "'bogus' is not one of none, default",
        ("bench", "pipeline", "--micro-batches", "1,x"): "argument --micro-batches: expected comma-separated integers",
        ("bench", "pipeline", "--micro-batches", "2,0"): "argument --micro-batches: every count must be > 0",
        ("bench", "pipeline", "--micro-batches", "1,3", "--set", "parallel.pipeline=2", *data):
            "--micro-batches: 3 micro-batches do not divide the 32 lanes of each data-parallel rank",
        ("bench", "pipeline", *data): "parallel.pipeline: 1 stage; bench pipeline compares micro-batch counts of a pipeline",
        ("bench", "data", "--compile", "default"): "unrecognized arguments: --compile default",  # a step option
        ("train", "--config", str(binary), *data): f"config file {binary}: not UTF-8 text",
        ("reproduce", "tracking", "--steps-scale", "-1"): "argument --steps-scale: must be > 0",
        ("reproduce", "tracking", "--fit-minutes", "0"): "argument --fit-minutes: must be > 0",
    }
    for args, message in cases.items():
        out = subprocess.run([sys.executable, "-m", "stairscale.cli", *args], capture_output=True, text=True, cwd=tmp_path)
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, (args, out.stderr[-2000:])
    assert not (tmp_path / "data").exists() and not (tmp_path / "runs").exists()


def test_data_dir_must_hold_the_run_task(tmp_path):
    """A dataset prepared with one task section does not serve a run that says another."""
    cli = [sys.executable, "-m", "stairscale.cli"]
    walk = ["--set", "task.eval_docs=8", "--set", "task.train_docs=64", "--set", "train.lanes=4"]
    prepared = subprocess.run(cli + ["prepare-data", "--out", str(tmp_path / "walk"), *walk], capture_output=True, text=True)
    assert prepared.returncode == 0, prepared.stderr
    run = cli + ["train", *walk, "--set", f"data.dir={tmp_path / 'walk'}", "--set", f"run_dir={tmp_path / 'run'}",
                 "--set", "task.positions=16", "--set", "task.eval_length=512"]
    out = subprocess.run(run, capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert f"data.dir: {tmp_path / 'walk'} was prepared with task.positions 8 (the run: 16), task.eval_length 128 (the run: 512)" in out.stderr
    assert "set the run's task keys as they were prepared (--set task.positions=8 --set task.eval_length=128)" in out.stderr
    # A corpus too small to give every split a file is refused when it is prepared.
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "only.txt").write_text("one file holds every byte of this corpus")
    out = subprocess.run(cli + ["prepare-data", "--set", "task.name=text", "--set", f"task.path={corpus}", "--out", str(tmp_path / "text")],
                         capture_output=True, text=True)
    assert out.returncode == 1 and "has no documents" in out.stderr and not (tmp_path / "text").exists(), out.stderr[-2000:]


def test_an_interrupted_run_says_so(tmp_path, cache):
    overrides = TINY + ["train.steps=100000", "train.log_every=1", f"run_dir={tmp_path / 'run'}", f"data.cache={cache}"]
    run = subprocess.Popen([sys.executable, "-m", "stairscale.cli", "train"] + [a for o in overrides for a in ("--set", o)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in run.stdout:
        if line.startswith("step "):
            break
    run.send_signal(signal.SIGINT)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 130 and stderr.strip().endswith("stairscale: train interrupted") and "Traceback" not in stderr, stderr


def test_a_diverged_run_stops_at_once_and_keeps_no_weights(tmp_path, cache):
    """A learning rate of 1e30 makes the weights NaN by the second step: the run stops at the next
    log line, names the step and keeps no checkpoint; the curves it logged are in TensorBoard."""
    run_dir = tmp_path / "run"
    overrides = TINY + ["train.steps=40", "train.lr=1e30", "train.warmup_steps=1", "train.log_every=1", "train.eval_every=0",
                        f"run_dir={run_dir}", f"data.cache={cache}"]
    out = subprocess.run([sys.executable, "-m", "stairscale.cli", "train"] + [a for o in overrides for a in ("--set", o)],
                         capture_output=True, text=True)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "stairscale: error: training diverged at step 2 (loss nan" in out.stderr and "Lower train.lr" in out.stderr
    assert not (run_dir / CHECKPOINT).exists()
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1]


def test_a_diverged_run_stops_before_it_validates_and_never_saves_nan_weights(tmp_path, tiny):
    # A validation comes before the next log line: the run stops before scoring or keeping NaN weights.
    trainer = Trainer(tiny(tmp_path, "train.steps=40", "train.lr=1e30", "train.warmup_steps=1", "train.log_every=4",
                           "train.eval_every=2", "train.keep_best=true"), quiet=True)
    with pytest.raises(TrainingDiverged, match="training diverged at step 2"):
        trainer.train()
    assert trainer.curve == [] and not (tmp_path / "run" / BEST).exists()
    # An update after the last loss read back can still overflow the weights: they are checked when saved.
    with torch.no_grad():
        next(trainer.model.parameters())[0] = float("inf")
    with pytest.raises(TrainingDiverged, match="training diverged by step 40"):
        trainer._save(CHECKPOINT, 40)
    assert not (tmp_path / "run" / CHECKPOINT).exists()


def test_keep_best_never_keeps_weights_whose_loss_is_not_a_number(tmp_path, tiny):
    trainer = Trainer(tiny(tmp_path, "train.keep_best=true"), quiet=True)
    assert trainer._improves({"loss": 2.0, "error": 50.0})
    assert not trainer._improves({"loss": float("nan"), "error": 50.0})


def test_every_training_step_is_in_one_logged_window(tmp_path, tiny):
    """An evaluation between two log lines restarts the speed clock, not the scores' window."""
    trainer = Trainer(tiny(tmp_path, "train.steps=14", "train.log_every=7", "train.eval_every=10"), quiet=True)
    added_to, logged = [], []
    train_step, log_progress = trainer.train_step, trainer._log_progress

    def observed_step(batch, states, lr, tally):
        added_to.append(tally)
        return train_step(batch, states, lr, tally)

    def observed_log(progress, *args):
        logged.append(progress.window)
        return log_progress(progress, *args)

    trainer.train_step, trainer._log_progress = observed_step, observed_log
    trainer.train()
    assert [sum(tally is window for tally in added_to) for window in logged] == [7, 7]


def test_learning_rate_warms_up_decays_and_restarts_per_stage():
    cfg = load_config(None, ["train.steps=3000", "train.warmup_steps=200", "train.lr=0.002", "train.min_lr_ratio=0.05",
                             "task.train_lengths=[64,128,256]", "task.train_length_steps=[0,1000,2000]"])
    lr = [learning_rate(cfg, s) for s in range(3000)]
    assert lr[199] == pytest.approx(0.002) and lr[0] == pytest.approx(0.002 / 200)
    assert all(a >= b for a, b in zip(lr[200:], lr[201:]))  # one decay over the whole run
    assert lr[-1] == pytest.approx(0.0001, rel=0.01)
    cfg.train.lr_restarts = True
    lr = [learning_rate(cfg, s) for s in range(3000)]
    for start in (0, 1000, 2000):  # every stage warms up again and decays to the floor
        assert lr[start] == pytest.approx(0.002 / 200) and lr[start + 199] == pytest.approx(0.002)
        assert lr[start + 999] == pytest.approx(0.0001, rel=0.01)


def test_each_stage_peaks_at_its_own_learning_rate():
    """train.stage_lr: every stage warms up to its own peak and decays to its own floor."""
    stage_lr = [0.004, 0.001, 0.0005]  # none of them train.lr
    cfg = load_config(None, ["train.steps=3000", "train.warmup_steps=200", "train.lr=0.002", "train.min_lr_ratio=0.05",
                             "task.train_lengths=[64,128,256]", "task.train_length_steps=[0,1000,2000]",
                             "train.lr_restarts=true", f"train.stage_lr={stage_lr}"])
    lr = [learning_rate(cfg, s) for s in range(3000)]
    for start, peak in zip((0, 1000, 2000), stage_lr):
        stage = lr[start : start + 1000]
        assert max(stage) == pytest.approx(peak) and stage[199] == pytest.approx(peak)
        assert stage[0] == pytest.approx(peak / 200)
        assert stage[-1] == pytest.approx(peak * 0.05, rel=0.01)
        assert all(a >= b for a, b in zip(stage[199:], stage[200:]))


@pytest.mark.parametrize("overrides, expected", [
    # The staircase family carries state without bound.
    (["model.schedule=staircase", "model.chunk=8", "model.attn_lim=32"], None),
    (["model.schedule=cached", "model.chunk=8", "model.cache_len=16", "model.attn_lim=32"], None),
    (["model.schedule=global_cached", "model.chunk=8", "model.cache_len=64", "model.attn_lim=80"], None),
    # Without memory, the segment or the stacked span of the layers (2 layers x 7 back + itself = 15), the shorter.
    (["model.schedule=transformer", "model.attn_lim=8", "train.segment_len=64"], 15),
    (["model.schedule=transformer", "model.attn_lim=64", "train.segment_len=16"], 16),
    # Ladder without memory: 3 repeats x 2 layers x 7 back + 1 = 43, shorter than the segment.
    (["model.schedule=ladder", "model.repeats=3", "model.attn_lim=8", "train.segment_len=64"], 43),
    # With memory: span + memory (32 + 32 = 64) beats the stack (2 x 31 + 1 = 63)...
    (["model.schedule=transformer_xl", "model.attn_lim=32", "model.mem_len=32"], 64),
    # ... or the stack wins: 4 layers x 31 + 1 = 125 > 32 + 32; the ladder's 3 x 2 x 31 + 1 = 187.
    (["model.schedule=transformer_xl", "model.n_layers=4", "model.attn_lim=32", "model.mem_len=32"], 125),
    (["model.schedule=ladder", "model.repeats=3", "model.attn_lim=32", "model.mem_len=32"], 187),
])
def test_reach_is_how_far_back_a_model_sees_without_carried_state(overrides, expected):
    assert reach(load_config(None, ["model.n_layers=2", "train.segment_len=64", *overrides])) == expected


def test_text_with_a_trained_bpe_tokenizer(tmp_path, tiny):
    from tokenizers import Tokenizer

    from stairscale.data.prepare import build_task
    from stairscale.data.shards import Dataset

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    texts = {f"f{i}.txt": f"def function_{i}(x):\n    return x * {i} + len('the quick brown fox')\n" * (i % 4 + 2) for i in range(60)}
    texts["f0.txt"] += "<pad> and <bos> here are text, not special tokens\n"
    for name, text in texts.items():
        (corpus / name).write_text(text)
    cfg = tiny(tmp_path, "train.steps=4", "task.name=text", f"task.path={corpus}", "task.tokenizer=bpe", "task.bpe_vocab=400")
    trainer = Trainer(cfg, quiet=True)
    results = trainer.train()
    assert results["test"]["perplexity"] > 1 and "bpb" not in results["test"]
    dataset = Dataset(trainer.data_root)
    assert 258 < len(dataset.vocab) <= 400 and dataset.vocab.tokens[:2] == ("<pad>", "<bos>")  # merges may run out
    tokenizer = Tokenizer.from_file(str(trainer.data_root / "tokenizer.json"))
    task = build_task(cfg.task)
    for split in ("train", "valid", "test"):  # lossless: each split's text comes back exactly (a split of
        pieces = [doc.tokens[1:] for doc in dataset.documents(split)]  # fewer files than lanes is cut into pieces)
        assert all((piece != dataset.vocab.pad_id).all() and (piece != dataset.vocab.bos_id).all() for piece in pieces)
        files = [doc.tokens[1:].astype(np.uint8).tobytes().decode() for doc in task.documents(split)]
        assert tokenizer.decode(np.concatenate(pieces).tolist()) == "".join(files)
    assert sorted(doc.tokens[1:].astype(np.uint8).tobytes().decode() for split in ("train", "valid", "test")
                  for doc in task.documents(split)) == sorted(texts.values())


def test_tally_counts_errors_by_position_across_batches_of_growing_positions():
    from stairscale.data.tasks import IGNORE
    from stairscale.model.provider import Scores
    from stairscale.train.metrics import Tally

    gen = torch.Generator().manual_seed(0)
    tally, expected_errors, expected_count = Tally(labelled=True, byte_level=False), torch.zeros(40, dtype=torch.long), torch.zeros(40, dtype=torch.long)
    for longest in (10, 40, 25):  # the second batch reaches further along its documents
        doc_pos = torch.randint(0, longest, (3, 8), generator=gen)
        targets = torch.randint(0, 4, (3, 8), generator=gen).masked_fill(torch.rand(3, 8, generator=gen) < 0.3, IGNORE)
        predicted = torch.randint(0, 4, (3, 8), generator=gen)
        tally.add(Scores(torch.rand(3, 8, generator=gen), predicted), targets, doc_pos)
        supervised = targets != IGNORE
        expected_count.index_add_(0, doc_pos[supervised], torch.ones_like(doc_pos[supervised]))
        expected_errors.index_add_(0, doc_pos[supervised], (predicted != targets)[supervised].long())
    size = int(expected_count.nonzero().max()) + 1
    assert tally.count_at.tolist() == expected_count[:size].tolist()
    assert tally.errors_at.tolist() == expected_errors[:size].tolist()
    assert tally.summary()["error"] == pytest.approx(100 * expected_errors.sum().item() / expected_count.sum().item())


def test_a_failed_checkpoint_write_names_the_file_and_keeps_the_last_checkpoint(tmp_path):
    save_checkpoint(tmp_path, {"model": {"w": torch.ones(4)}})
    (tmp_path / "checkpoint.pt.tmp").symlink_to("/dev/full")  # every write fails: a full disk
    with pytest.raises(CheckpointError, match=f"checkpoint {tmp_path / 'checkpoint.pt'} could not be written"):
        save_checkpoint(tmp_path, {"model": {"w": torch.zeros(100_000)}})
    assert not (tmp_path / "checkpoint.pt.tmp").is_symlink()
    assert torch.equal(load_checkpoint(tmp_path)["model"]["w"], torch.ones(4))


def test_an_interrupted_checkpoint_write_leaves_no_partial_file(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, {"model": {"w": torch.ones(4)}})

    def interrupted_save(payload, path):  # Ctrl-C halfway through writing
        Path(path).write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, {"model": {"w": torch.zeros(4)}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    assert torch.equal(load_checkpoint(tmp_path)["model"]["w"], torch.ones(4))


def test_scoring_refuses_data_other_than_the_runs(tmp_path, tiny):
    """A run is scored on the data it was trained and scored on: a corpus changed since (its
    cached dataset is prepared anew) or another vocabulary is refused, naming the dataset or the
    checkpoint; data chosen with --set keys is scored as asked."""
    corpus = tmp_path / "book.txt"
    corpus.write_text("".join(f"line {i}: the quick brown fox\n" for i in range(300)))
    cfg = tiny(tmp_path, "train.steps=2", "task.name=text", f"task.path={corpus}")
    trainer = Trainer(cfg, quiet=True)
    trained = trainer.train()["test"]
    run = str(tmp_path / "run")
    assert evaluate_run(run, "test")["loss"] == pytest.approx(trained["loss"], rel=1e-9)
    more_lanes = evaluate_run(run, "test", ["train.lanes=8"])  # the same documents in another dataset: not refused
    assert more_lanes["loss"] == pytest.approx(trained["loss"], rel=1e-6)
    corpus.write_text(corpus.read_text().replace("fox", "cat"))  # the same size: only the content changed
    for keys in ([], ["data.workers=0"]):  # keys that choose no data
        with pytest.raises(DataError, match="its test split holds other documents than the run of .*checkpoint.pt was scored on"):
            evaluate_run(run, "test", keys)
    changed = load_config(Path(run) / "config.yaml")
    from stairscale.data.prepare import dataset_dir

    assert evaluate_run(run, "test", [f"data.dir={dataset_dir(changed)}"])["loss"] != trained["loss"]  # asked for
    other_vocab = tmp_path / "other_vocab"
    shutil.copytree(trainer.data_root, other_vocab)
    manifest = json.loads((other_vocab / "manifest.json").read_text())
    manifest["vocab"]["tokens"][:2] = manifest["vocab"]["tokens"][1::-1]  # two token ids swapped
    (other_vocab / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"has another vocabulary than checkpoint .*checkpoint.pt was trained with"):
        evaluate_run(run, "test", [f"data.dir={other_vocab}"])


def test_skip_reaches_the_evaluation_splits_at_start_and_in_scoring(tmp_path, tiny):
    """`data.on_bad_sample: skip` holds for every reader of a run: the check of the evaluation
    splits at start-up and `stairscale eval` skip the bad sample the training run skipped."""
    prepared = Trainer(tiny(tmp_path / "first", "train.steps=2"), quiet=True).data_root
    root = tmp_path / "broken"
    shutil.copytree(prepared, root)
    manifest = json.loads((root / "manifest.json").read_text())
    shard = manifest["splits"]["valid"]["shards"][0]
    data = bytearray((root / shard["file"]).read_bytes())
    bad = np.array(200, dtype=manifest["token_dtype"]).tobytes()  # the first token of the split's first walk
    data[shard["tokens_at"][0] : shard["tokens_at"][0] + len(bad)] = bad
    (root / shard["file"]).write_bytes(bytes(data))
    shard["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=f"{shard['file']}, sample 000000000: token id 200 outside the vocabulary"):
        Trainer(tiny(tmp_path / "strict", "train.steps=2", f"data.dir={root}"), quiet=True)
    cfg = tiny(tmp_path, "train.steps=2", f"data.dir={root}", "data.on_bad_sample=skip")
    valid = Trainer(cfg, quiet=True).train()["valid"]
    assert evaluate_run(str(tmp_path / "run"), "valid")["loss"] == pytest.approx(valid["loss"], rel=1e-9)


def test_a_run_file_that_cannot_be_written_is_named(tmp_path, cache):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml.tmp").symlink_to("/dev/full")  # every write there fails: a full disk
    overrides = TINY + ["train.steps=2", f"run_dir={run}", f"data.cache={cache}"]
    done = subprocess.run([sys.executable, "-m", "stairscale.cli", "train"] + [a for o in overrides for a in ("--set", o)],
                          capture_output=True, text=True)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert f"stairscale: error: [Errno 28] cannot write {run / 'config.yaml'}: No space left on device" in done.stderr
    assert not (run / "config.yaml.tmp").is_symlink() and not (run / "config.yaml").exists()


def test_eval_batches_caps_the_validations_and_never_the_test(tmp_path, tiny):
    whole = Trainer(tiny(tmp_path / "whole", "train.steps=6"), quiet=True).train()
    capped = Trainer(tiny(tmp_path / "capped", "train.steps=6", "train.eval_batches=1"), quiet=True).train()
    lanes, segment = 4, 16  # TINY's
    assert 0 < capped["valid"]["targets"] <= lanes * segment < whole["valid"]["targets"]
    assert capped["test"] == whole["test"]
    assert [point["valid_targets"] for point in capped["curve"]] == [capped["valid"]["targets"]] * 2  # steps 3 and 6


def test_a_training_split_that_deals_badly_to_the_lanes_trains_with_a_warning(tmp_path, tiny, capsys):
    Trainer(tiny(tmp_path / "default"), quiet=True)
    assert "warning" not in capsys.readouterr().err
    Trainer(tiny(tmp_path / "one_shard_a_lane", "data.shard_docs=50"), quiet=True)  # 200 walks: 4 shards for 4 lanes
    err = capsys.readouterr().err
    assert err.startswith("stairscale: warning: dataset ") and "4 shards for 4 lanes, so epochs repeat batches" in err, err
