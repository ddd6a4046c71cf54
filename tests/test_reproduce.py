"""The reproduction's run plans (the runs themselves are `stairscale reproduce tracking`)."""

from pathlib import Path

import pytest

from stairscale.config import RunConfig, from_dict
from stairscale.errors import ConfigError
from stairscale.reproduce import FULL, MODELS, QUICK, _fit, _makespan, fit_steps_scale, render, run_config


def test_makespan_runs_longest_first_on_free_slots():
    assert _makespan([10, 1, 1, 1], parallel=2) == 10
    assert _makespan([3, 3, 2, 2, 2], parallel=2) == 7
    assert _makespan([5, 4, 3], parallel=1) == 12


def test_every_planned_run_is_a_valid_fp32_config_with_its_compile_mode_and_seed(tmp_path):
    for budget in (QUICK, FULL):
        for task in ("random_walk", "algorithmic"):
            for model in MODELS:
                cfg = from_dict(RunConfig, run_config(task, model, budget, Path(tmp_path), compile="default", seed=3)).validate()
                assert cfg.train.compile == "default" and cfg.train.seed == 3 and cfg.task.seed == 0
                assert cfg.train.precision == "fp32"
                if task == "random_walk":  # one curriculum stage per length, starting at step 0
                    assert len(cfg.task.train_length_steps) == len(budget.walk_lengths)
                    assert cfg.task.train_length_steps[0] == 0
                    assert cfg.train.carried_offset_stages == budget.walk_carried_offset_stages
                assert cfg.train.keep_best == budget.keep_best


def test_the_full_staircase_run_is_the_recipe_shown_on_the_cpu(tmp_path):
    """The full variant's Staircase trains as configs/random_walk_long.yaml, the run that scored
    4.06% on 1,024-token walks (docs/reproducing.md); only where and on what it runs may differ."""
    from stairscale.config import load_config

    planned = from_dict(RunConfig, run_config("random_walk", "staircase", FULL, Path(tmp_path))).validate().to_dict()
    shown = load_config(Path(__file__).parent.parent / "configs" / "random_walk_long.yaml").to_dict()
    for cfg in (planned, shown):
        del cfg["run_dir"], cfg["train"]["threads"], cfg["train"]["device"]
    assert planned == shown


def test_steps_scale_scales_steps_stage_boundaries_and_warm_up(tmp_path):
    full, scaled = (run_config("random_walk", "transformer_xl", QUICK, Path(tmp_path), steps_scale=s) for s in (1.0, 0.1))
    assert scaled["train"]["steps"] == round(full["train"]["steps"] * 0.1)
    assert scaled["task"]["train_length_steps"][1] == round(full["task"]["train_length_steps"][1] * 0.1)
    assert (full["train"]["warmup_steps"], scaled["train"]["warmup_steps"]) == (200, 20)


def test_fitting_to_minutes_refuses_an_out_that_holds_runs_before_measuring(tmp_path):
    (tmp_path / "random_walk_staircase").mkdir()
    (tmp_path / "random_walk_staircase" / "results.json").write_text("{}")
    with pytest.raises(ConfigError, match="--out: .* already holds runs .*random_walk_staircase"):
        fit_steps_scale(QUICK, tmp_path, minutes=1)
    assert not (tmp_path / "calibration").exists()


def test_the_table_judges_the_targets_of_the_issue():
    def model(errors: dict[int, tuple[float, float]]) -> dict:
        walk = {n: {"error": e, "beyond_txl_reach": b, "error_by_position": [[0, e]]} for n, (e, b) in errors.items()}
        return {"parameters": 1, "passes_per_token": 1, "walk": walk, "walk_curve": [], "algo_error": 80.0, "algo_curve": [],
                "walk_scored_step": 900, "algo_scored_step": 100, "walk_final_weights_error": 20.0}

    report = {"txl_reach": 64, "weights": "best", "walk_lengths": [128, 1024], "models": {
        "transformer_xl": model({128: (51.0, 86.0), 1024: (85.0, 87.0)}),
        "ladder": model({128: (44.0, 83.0), 1024: (80.0, 86.0)}),
        "staircase": model({128: (0.5, 4.0), 1024: (12.0, 12.5)}),
    }}
    table = render({**report, "seed": 2})
    assert "Transformer-XL reach = 64 tokens; train.seed 2." in table
    assert ("Scored: the weights of each run's best validation (train.keep_best), of steps transformer_xl 900 (walk) "
            "and 100 (algorithmic), ladder 900 (walk)") in table
    assert "final weights' error on the same 256 test walks of 1024 tokens: transformer_xl 20.0%, ladder 20.0%" in table
    assert "Scored: the final weights of every run." in render({**report, "weights": "final"})
    targets = table.split("Targets (issue #2):\n")[1].split("\n\n")[0].splitlines()
    assert targets == [
        "- PASS: Transformer-XL from position 64 on 1024-token walks: 87.0%, within 10 points of chance (87.5%)",
        "- PASS: Staircase from position 64 on 1024-token walks: 12.5%, at most half the Transformer-XL's",
        "- PASS: Staircase on 128-token walks: 0.5%, under 5%",
        "- FAIL: Staircase on 1024-token walks: 12.0%, under 5%",
    ]


def test_sigterm_stops_the_reproduction_and_every_run_it_started(tmp_path):
    """The runs are child processes: a scheduler's stop of the reproduction must not orphan them."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "tracking"
    command = [sys.executable, "-m", "stairscale.cli", "reproduce", "tracking", "--quick", "--steps-scale", "0.01", "--out", str(out)]
    home = {**os.environ, "HOME": str(tmp_path)}  # the runs prepare their datasets in ~/.cache: not the user's
    parent = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=home)
    started = 0
    for line in parent.stdout:
        started += line.strip().startswith("start ")
        if started == 2:
            break
    time.sleep(3)

    def runs():
        return [pid for pid in Path("/proc").iterdir() if pid.name.isdigit() and pid.name != str(parent.pid)
                and str(out).encode() in _cmdline(pid)]

    assert len(runs()) >= 2, "the two runs (and any loader workers) should be running when it is stopped"
    parent.send_signal(signal.SIGTERM)
    _, stderr = parent.communicate(timeout=120)
    assert parent.returncode == 143 and "stairscale: reproduce stopped by SIGTERM" in stderr, stderr[-3000:]
    assert runs() == [], "runs left running after their reproduction stopped"


def _cmdline(pid: Path) -> bytes:
    try:
        return (pid / "cmdline").read_bytes()
    except OSError:  # the process ended meanwhile
        return b""


def test_a_failed_run_is_a_row_that_says_so_and_its_targets_fail():
    def model(walk: dict | None, algo: float | None) -> dict:
        entry = {"parameters": None if walk is None else 1, "passes_per_token": None if walk is None else 1,
                 "walk": walk, "algo_error": algo}
        if walk is not None:
            entry.update(walk_curve=[{"step": 10, "valid_error": 50.0}], walk_scored_step=10)
        if algo is not None:
            entry.update(algo_curve=[{"step": 10, "valid_error": 80.0}])
        return entry

    walk = {n: {"error": 1.0, "beyond_txl_reach": 1.0, "error_by_position": [[0, 1.0]]} for n in (128, 256)}
    report = {"txl_reach": 64, "weights": "final", "walk_lengths": [128, 256], "failed": ["out/random_walk_transformer_xl"],
              "models": {"transformer_xl": model(None, 80.0), "ladder": model(walk, 70.0), "staircase": model(walk, None)}}
    table = render(report)
    assert "| transformer_xl | failed | failed | failed | failed | failed | 80.0 | 84.1 | 48.7 |" in table
    assert "| staircase | 1 | 1 | 1.0 | 1.0 | 1.0 | failed | 0.1 | 0.2 |" in table
    assert "Failed runs (see their train.log): out/random_walk_transformer_xl." in table
    targets = table.split("Targets (issue #2):\n")[1].split("\n\n")[0].splitlines()
    assert targets[0] == "- FAIL: Transformer-XL from position 64 on 256-token walks: failed%, within 10 points of chance (87.5%)"
    assert targets[1].startswith("- FAIL: Staircase from position 64") and targets[2].startswith("- PASS: Staircase on 128-token")
    assert "- transformer_xl: random walk failed; algorithmic [10: 80.0]" in table


def test_fitting_scales_training_not_validations_and_never_beyond_the_recipe():
    runs = [(100.0, 10.0), (50.0, 5.0)]  # (training seconds of the recipe, evaluation seconds), two at a time
    assert _fit(runs, parallel=2, seconds=1000) == 1.0  # a fast machine finishes early
    assert _fit(runs, parallel=2, seconds=60) == pytest.approx(0.5)  # 0.5 * 100 + 10
    assert _fit(runs, parallel=1, seconds=90) == pytest.approx(0.5)  # 0.5 * 150 + 15
    assert _fit(runs, parallel=2, seconds=10) is None  # the validations alone take 10 s


def test_a_failed_run_leaves_the_others_to_finish(tmp_path):
    from stairscale.reproduce import run_all

    def config(name: str, steps: int, window: int = 2) -> dict:
        return {"model": {"schedule": "staircase", "d_model": 16, "d_ff": 32, "n_heads": 2, "chunk": 4, "attn_lim": 16, "window": window},
                "task": {"train_lengths": [16], "train_length_steps": [0], "eval_length": 16, "eval_docs": 4, "train_docs": 64},
                "train": {"steps": steps, "lanes": 4, "segment_len": 16, "warmup_steps": 1, "eval_every": 0, "threads": 1},
                "data": {"cache": str(tmp_path / "datasets")}, "run_dir": str(tmp_path / name)}

    failed = run_all([config("trains", 3), config("fails", 1000, window=0)], parallel=1)  # longest first: the failure
    assert failed == [str(tmp_path / "fails")]
    assert "model.window" in (tmp_path / "fails" / "train.log").read_text()
    assert (tmp_path / "trains" / "results.json").exists()


def test_steps_scale_and_fit_minutes_are_refused_together(tmp_path):
    import subprocess
    import sys

    command = [sys.executable, "-m", "stairscale.cli", "reproduce", "tracking", "--steps-scale", "0.5", "--fit-minutes", "9",
               "--out", str(tmp_path / "out")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "not allowed with argument" in done.stderr, done.stderr
    assert not (tmp_path / "out").exists()
