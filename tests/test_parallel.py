"""Every parallel layout trains the same model: real launches on gloo, compared with one process.

Each layout runs 5 training steps of a tiny fp32 model with clipping active. Its per-step loss and
final gathered weights must equal the single-process run's to 1e-5 (relative), its gradient norms to
1e-6, and every rank must have read its share of the lanes and held its share of the model under the
ZeRO stage asked for (tests/scripts/train_runs.py records them). Runs that share
a layout share one launch (tests/scripts/train_runs.py); the command line and the launchers of
launch/ are tested with one run each.
"""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from stairscale.config import load_config
from stairscale.errors import ConfigError, LaunchError
from stairscale.parallel.groups import cuda_device_index
from stairscale.parallel.launchers import launch_environment, started_by_mpi
from stairscale.parallel.pipeline import _backward, stage_layers
from stairscale.train.scoring import evaluate_run
from stairscale.train.trainer import Trainer

ROOT = Path(__file__).parents[1]
RUNS = ROOT / "tests" / "scripts" / "train_runs.py"
TOL = 1e-5
NORM_TOL = 1e-6
TINY = {
    "model": {"d_model": 16, "d_ff": 32, "n_heads": 2, "chunk": 4, "attn_lim": 16},
    "train": {"lanes": 4, "segment_len": 16, "steps": 5, "log_every": 1, "eval_every": 0, "warmup_steps": 2,
              "lr": 0.002, "grad_clip": 0.05},
    "task": {"train_lengths": [24], "train_length_steps": [0], "eval_length": 24, "eval_docs": 4, "train_docs": 64},
}
VARIANTS = {  # every schedule, and the training options that change what a rank computes per lane
    "staircase": [],
    "cached": ["model.schedule=cached", "model.cache_len=8"],
    "global_cached": ["model.schedule=global_cached", "model.cache_len=8"],
    "ladder": ["model.schedule=ladder", "model.repeats=2", "model.mem_len=8"],
    "transformer": ["model.schedule=transformer"],
    "transformer_xl": ["model.schedule=transformer_xl", "model.mem_len=8"],
    "cached_relative": ["model.schedule=cached", "model.cache_len=8", "model.positions=relative"],
    # segments shorter than the carried window (M 4 < (n - 1) F = 8): older incoming rows carried on
    "short_segments": ["model.window=3", "train.segment_len=4"],
    # long walks and a high learning rate, so that labels are shifted from step 3 on
    "carried_offset": ["train.carried_offset_stages=[0]", "task.train_lengths=[64]", "train.lr=0.05"],
}


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    folder = tmp_path_factory.mktemp("parallel")
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump({**TINY, "data": {"cache": str(folder / "datasets")}}))
    return path


@pytest.fixture(scope="module")
def single(config, tmp_path_factory):
    """The single-process run of every variant: {name: (step losses, weights)}."""
    out, runs = {}, tmp_path_factory.mktemp("single")
    for name, overrides in VARIANTS.items():
        Trainer(load_config(config, [*overrides, f"run_dir={runs / name}"]), quiet=True).train()
        out[name] = read_run(runs / name)
    events = EventAccumulator(str(runs / "carried_offset" / "tensorboard"))
    events.Reload()
    assert max(e.value for e in events.Scalars("train/shifted_labels")) > 0  # else that variant tests nothing
    return out


def read_run(run_dir: Path):
    """(loss and gradient norm of each step, final weights, test loss)"""
    results = json.loads((run_dir / "results.json").read_text())
    return results["steps"], torch.load(run_dir / "checkpoint.pt")["model"], results["test"]["loss"]


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}


def run(cmd: list[str], variables: dict | None = None) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, env={**env(), **(variables or {})}, timeout=900, cwd=ROOT)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-6000:])


def torchrun(ranks: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", *args]


def launch_runs(ranks: int, config: Path, tmp_path: Path, runs: dict[str, list[str]], variables: dict | None = None) -> dict:
    """Train each named run (overrides) in one launch of `ranks` processes (ranks 0: one process
    started by plain python, no launcher)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    plan = [[str(config), str(tmp_path / name), overrides] for name, overrides in runs.items()]
    (tmp_path / "runs.json").write_text(json.dumps(plan))
    script = [str(RUNS), str(tmp_path / "runs.json")]
    run(torchrun(ranks, *script) if ranks else [sys.executable, *script], variables)
    ranks = max(ranks, 1)
    for name, overrides in runs.items():
        assert_layout_applied(tmp_path / name, ranks, load_config(config, overrides))
    return {name: read_run(tmp_path / name) for name in runs}


def assert_layout_applied(run_dir: Path, ranks: int, cfg) -> None:
    """Equal numbers alone do not show a layout was used (one rank training the whole model on
    the whole batch gives them too): each rank must have read its share of the lanes and held its
    share of the model, under the ZeRO stage asked for."""
    p = cfg.parallel
    dp = ranks // (p.tensor * p.pipeline)
    records = [json.loads((run_dir / f"rank{rank}.json").read_text()) for rank in range(ranks)]
    for record in records:
        assert record["layout"]["dp"] == dp and record["lanes_per_batch"] == [cfg.train.lanes // dp], record["lanes_per_batch"]
        model, params, master = record["model_numel"], record["held_param_numel"], record["held_master_numel"]
        assert_holds_share(params, model, dp if p.zero_stage == 3 else 1, "parameters")
        under_deepspeed = ranks > 1 or p.zero_stage > 0  # as train/engine.py's build_engine decides
        assert (master is not None) == under_deepspeed, master
        if under_deepspeed:  # ZeRO 1-3 partition the fp32 master weights and optimizer state
            assert record["zero_stage"] == p.zero_stage, record["zero_stage"]
            assert_holds_share(master, model, dp if p.zero_stage >= 1 else 1, "master weights")
        assert_tensor_shards(record["shapes"], record["full_shapes"], p.tensor)
        # Activation checkpointing recomputes the layers in backward, and nothing else does.
        assert (record["layer_calls_in_backward"] > 0) == cfg.model.activation_checkpointing, record["layer_calls_in_backward"]
    if p.pipeline > 1:
        layers = [{name.split(".")[2] for name in r["shapes"] if name.startswith("core.layers.")} for r in records]
        assert all(len(held) == cfg.model.n_layers // p.pipeline for held in layers), layers
        for record in records:  # the embedding on the first stage, the head on the last
            stage = record["layout"]["pp_rank"]
            assert ("embed.weight" in record["shapes"]) == (stage == 0)
            assert ("head.proj.weight" in record["shapes"]) == (stage == p.pipeline - 1)


# Under tensor parallelism, the dimension each sharded parameter is split along (column-parallel
# linears and the vocabulary split their outputs, row-parallel linears their inputs).
SPLIT_DIM = {"attn.q.weight": 0, "attn.k.weight": 0, "attn.v.weight": 0, "ffn.fc1.weight": 0, "ffn.fc1.bias": 0,
             "attn.o.weight": 1, "ffn.fc2.weight": 1, "embed.weight": 0, "head.proj.weight": 0, "head.proj.bias": 0}


def assert_tensor_shards(shapes: dict, full_shapes: dict, tp: int) -> None:
    """Every parameter a rank holds has the single-device shape, but 1/tp of it along its split
    dimension (the vocabulary padded to a multiple of tp) for the ones tensor parallelism splits."""
    assert shapes and set(shapes) <= set(full_shapes)
    for name, shape in shapes.items():
        expected = list(full_shapes[name])
        dim = next((d for suffix, d in SPLIT_DIM.items() if name.endswith(suffix)), None)
        if tp > 1 and dim is not None:
            expected[dim] = -(-expected[dim] // tp)
        assert shape == expected, f"{name}: holds {shape}, expected {expected} under tensor={tp}"


def assert_holds_share(held: int, model: int, parts: int, what: str) -> None:
    """A rank holds 1/parts of the model's elements (DeepSpeed pads each partition a little)."""
    assert model / parts <= held <= model / parts + 1024, f"holds {held} of {model} elements of the {what}, expected 1/{parts}"


def assert_same_training(got, want, label: str) -> None:
    (steps, weights, test_loss), (want_steps, want_weights, want_test_loss) = got, want
    assert len(steps) == len(want_steps) == 5
    for step, (a, b) in enumerate(zip(steps, want_steps)):
        assert abs(a["loss"] - b["loss"]) <= TOL * b["loss"], f"{label}: step {step + 1} loss {a['loss']} vs {b['loss']}"
        # The norm before clipping (active at every step) is held to 1e-6: measured differences are
        # below 1e-7, and counting the relative table once per pipeline stage would shift it by 4e-6.
        norm, want_norm = a["grad_norm"], b["grad_norm"]
        assert abs(norm - want_norm) <= NORM_TOL * want_norm, f"{label}: step {step + 1} grad norm {norm} vs {want_norm}"
        assert want_norm > TINY["train"]["grad_clip"]
    assert weights.keys() == want_weights.keys() and want_weights
    for name, want_tensor in want_weights.items():
        error = float((weights[name] - want_tensor).norm() / want_tensor.norm())
        assert error <= TOL, f"{label}: {name} differs by {error:.2e} (relative)"
    assert abs(test_loss - want_test_loss) <= TOL * want_test_loss, f"{label}: test loss {test_loss} vs {want_test_loss}"


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_every_variant_under_tensor_and_pipeline_parallel(layout, config, single, tmp_path):
    extra = ["parallel.tensor=2"] if layout == "tp2" else ["parallel.pipeline=2", "train.grad_accum=2"]
    runs = {name: [*o, *extra] for name, o in VARIANTS.items()}
    if layout == "pp2":  # more micro-batches than stages: the wavefront's steady state, each stage busy
        runs["staircase_4_micro"] = ["parallel.pipeline=2", "train.grad_accum=4"]
    got = launch_runs(2, config, tmp_path, runs)
    for name in runs:
        assert_same_training(got[name], single[name.removesuffix("_4_micro")], f"{layout} {name}")


def test_dropout_under_tensor_parallel_keeps_the_replicated_weights_equal(config, single, tmp_path):
    """Each rank draws its own dropout masks (seed + rank), which is right only where activations
    are sharded (attention heads, the FFN's hidden units): a mask on a replicated activation would
    give the tensor ranks different gradients for the weights they all hold whole, and those would
    part. No single-process run draws the same masks, so the check is that they stay equal."""
    dropout = ["parallel.tensor=2", "model.dropout=0.2", "model.attn_dropout=0.2"]
    got = launch_runs(2, config, tmp_path, {"dropout": dropout})
    records = [json.loads((tmp_path / "dropout" / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert records[0]["dropout_seed"] != records[1]["dropout_seed"]
    assert abs(got["dropout"][0][0]["loss"] / single["staircase"][0][0]["loss"] - 1) > 1e-3  # the masks did act (not rounding)
    assert records[0]["replicated_sha256"] == records[1]["replicated_sha256"]


def test_zero_in_one_process_started_without_a_launcher(config, single, tmp_path):
    """ZeRO needs DeepSpeed even in one process, where no launcher set LOCAL_RANK; with bf16
    autocast, the engine is configured to keep it (on a GPU its forward would turn it off)."""
    runs = {"zero1": ["parallel.zero_stage=1"], "zero3": ["parallel.zero_stage=3"],
            "bf16": ["train.precision=bf16"], "zero1_bf16": ["parallel.zero_stage=1", "train.precision=bf16"]}
    got = launch_runs(0, config, tmp_path, runs)
    assert_same_training(got["zero1"], single["staircase"], "zero1 in one process")
    assert_same_training(got["zero3"], single["staircase"], "zero3 in one process")
    # bf16 against bf16 in the same process: its rounding depends on the number of threads
    assert_same_training(got["zero1_bf16"], got["bf16"], "zero1 bf16 in one process")
    assert got["bf16"][0][0]["loss"] != single["staircase"][0][0]["loss"]  # bf16 did round differently


def test_ranks_that_read_different_data_refuse_to_train(config, tmp_path):
    """Nodes without a shared filesystem prepare their own datasets: a difference is an error
    naming each rank's fingerprint, on every rank, before any training."""
    from stairscale.data.prepare import prepare_dataset

    for rank in (0, 1):  # the same task, sharded differently: other shards, another fingerprint
        prepare_dataset(load_config(config, [f"data.shard_docs={8 * (rank + 1)}"]), tmp_path / str(rank))
    plan = [[str(config), str(tmp_path / "run"), [f"data.dir={tmp_path}/{{rank}}"]]]
    (tmp_path / "runs.json").write_text(json.dumps(plan))
    done = subprocess.run(torchrun(2, str(RUNS), str(tmp_path / "runs.json")), capture_output=True, text=True, env=env(), timeout=300, cwd=ROOT)
    assert done.returncode != 0
    assert done.stderr.count("the ranks read different data (fingerprints rank 0: ") == 2, done.stderr[-3000:]
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_weights_that_overflow_on_one_stage_stop_every_rank(config, tmp_path):
    """Only the last stage writes the checkpoint and sees the gathered weights; the first stage,
    whose weight overflowed, must stop too rather than wait in the next collective."""
    run = tmp_path / "run"
    plan = [[str(config), str(run), ["parallel.pipeline=2", "train.grad_accum=2", "parallel.timeout_minutes=0.5"]]]
    (tmp_path / "runs.json").write_text(json.dumps(plan))
    done = subprocess.run(torchrun(2, str(RUNS), str(tmp_path / "runs.json")), capture_output=True, text=True, cwd=ROOT,
                          env={**env(), "OVERFLOW_BEFORE_SAVING": "1"}, timeout=300)
    assert done.returncode != 0
    for rank in (0, 1):
        assert (run / f"rank{rank}.diverged").read_text().startswith("training diverged by step 5"), done.stderr[-3000:]
    assert not (run / "checkpoint.pt").exists()


def test_data_parallel_with_every_zero_stage_and_gradient_accumulation(config, single, tmp_path):
    runs = {f"zero{z}_accum{a}": [f"parallel.zero_stage={z}", f"train.grad_accum={a}"] for z in range(4) for a in (1, 2)}
    runs["carried_offset_accum2"] = [*VARIANTS["carried_offset"], "train.grad_accum=2"]
    got = launch_runs(2, config, tmp_path, runs)
    for name in runs:
        want = "carried_offset" if name.startswith("carried") else "staircase"
        assert_same_training(got[name], single[want], f"dp2 {name}")


def test_data_and_tensor_parallel_with_every_zero_stage(config, single, tmp_path):
    runs = {f"zero{z}": ["parallel.tensor=2", f"parallel.zero_stage={z}"] for z in range(4)}
    runs["zero3_cached_relative"] = [*runs["zero3"], *VARIANTS["cached_relative"]]
    got = launch_runs(4, config, tmp_path, runs)
    for z in range(4):
        assert_same_training(got[f"zero{z}"], single["staircase"], f"dp2 x tp2 zero{z}")
    assert_same_training(got["zero3_cached_relative"], single["cached_relative"], "dp2 x tp2 zero3 cached relative")


def test_pipeline_with_data_or_tensor_parallel(config, single, tmp_path):
    pp2 = ["parallel.pipeline=2", "train.grad_accum=2"]
    got = launch_runs(4, config, tmp_path, {"dp2_pp2_zero0": pp2, "dp2_pp2_zero1": [*pp2, "parallel.zero_stage=1"],
                                            "cached_relative_zero1": [*pp2, "parallel.zero_stage=1", *VARIANTS["cached_relative"]]})
    assert_same_training(got["dp2_pp2_zero0"], single["staircase"], "dp2 x pp2 zero0")
    assert_same_training(got["dp2_pp2_zero1"], single["staircase"], "dp2 x pp2 zero1")
    assert_same_training(got["cached_relative_zero1"], single["cached_relative"], "dp2 x pp2 zero1 cached relative")
    # Validations do not change what is trained; train.keep_best gathers the weights it keeps.
    keep_best = ["train.keep_best=true", "train.eval_every=2"]
    tp_pp = launch_runs(4, config, tmp_path / "tp_pp", {"tp2_pp2": ["parallel.tensor=2", *pp2, "model.activation_checkpointing=true", *keep_best]})
    assert_same_training(tp_pp["tp2_pp2"], single["staircase"], "tp2 x pp2, activation checkpointing")
    Trainer(load_config(config, [*keep_best, f"run_dir={tmp_path / 'one_process'}"]), quiet=True).train()
    kept = {run: (json.loads((tmp_path / run / "results.json").read_text())["best"], torch.load(tmp_path / run / "best.pt")["model"])
            for run in ("tp_pp/tp2_pp2", "one_process")}
    (best, weights), (want_best, want_weights) = kept["tp_pp/tp2_pp2"], kept["one_process"]
    assert best["step"] == want_best["step"] and best["test"]["loss"] == pytest.approx(want_best["test"]["loss"], rel=TOL)
    assert weights.keys() == want_weights.keys()
    for name, want_tensor in want_weights.items():
        assert float((weights[name] - want_tensor).norm() / want_tensor.norm()) <= TOL, f"best.pt: {name}"


@pytest.mark.parametrize("handles", ["per_operation", "per_batch"])
def test_four_pipeline_stages(handles, config, tmp_path):
    """Four stages exchange with several peers at once: the last stage sends top rows to every
    stage (cached schedule), and with fewer micro-batches than stages the wavefront has gaps.
    batch_isend_irecv returns a handle per operation on gloo and one per batch on NCCL: both."""
    deep = ["model.n_layers=4", *VARIANTS["cached_relative"]]
    Trainer(load_config(config, [*deep, f"run_dir={tmp_path / 'single'}"]), quiet=True).train()
    variables = {"ONE_HANDLE_PER_BATCH": "1"} if handles == "per_batch" else {}
    got = launch_runs(4, config, tmp_path, {"pp4": [*deep, "parallel.pipeline=4", "train.grad_accum=2"]}, variables)
    assert_same_training(got["pp4"], read_run(tmp_path / "single"), f"pp4 cached relative, 2 micro-batches, handles {handles}")
    # Evaluation runs the same wavefront, forward only: the test score equals one process's.
    test_loss = [json.loads((tmp_path / name / "results.json").read_text())["test"]["loss"] for name in ("pp4", "single")]
    assert test_loss[0] == pytest.approx(test_loss[1], rel=TOL)


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


LAUNCHES = {  # launcher: (layout overrides, how the run is started)
    "torchrun": (["parallel.pipeline=2", "train.grad_accum=2", "parallel.zero_stage=1"], "launch/torchrun.sh"),
    "deepspeed": (["parallel.zero_stage=2"], "launch/deepspeed.sh"),
    "mpirun": (["parallel.tensor=2"], "launch/mpirun.sh"),
    "srun": (["parallel.pipeline=2", "train.grad_accum=2"], "SLURM_* variables, as srun sets them"),
}


@pytest.mark.parametrize("launcher", LAUNCHES)
def test_launchers_run_a_layout_from_the_config_and_record_it(launcher, config, single, tmp_path):
    overrides, script = LAUNCHES[launcher]
    args = ["--config", str(config), "--set", f"run_dir={tmp_path / 'run'}", *[f"--set={o}" for o in overrides]]
    variables = {**env(), "BIN": str(Path(sys.executable).parent)}
    if launcher != "torchrun":  # torchrun.sh without MASTER_PORT lets torchrun bind a free port itself (--standalone)
        variables["MASTER_PORT"] = free_port()
    if launcher == "mpirun":  # in a batch script: the allocation's SLURM variables, no srun step
        variables.update(SLURM_PROCID="0", SLURM_NTASKS="2", MASTER_ADDR="127.0.0.1")
    if launcher == "srun":  # no SLURM here: start the two tasks as srun would, with its variables
        tasks = [subprocess.Popen([sys.executable, "-m", "stairscale.cli", "train", *args], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                                  env={**variables, "SLURM_PROCID": str(i), "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2",
                                       "SLURM_LOCALID": str(i), "MASTER_ADDR": "127.0.0.1"}) for i in range(2)]
        errors = [task.communicate(timeout=600)[1] for task in tasks]
        assert all(task.returncode == 0 for task in tasks), errors[0][-4000:] + errors[1][-4000:]
    else:
        done = subprocess.run([str(ROOT / script), *args], capture_output=True, text=True, env=variables, timeout=900, cwd=ROOT)
        assert done.returncode == 0, done.stderr[-6000:]
    layout = json.loads((tmp_path / "run" / "layout.json").read_text())
    p = load_config(config, overrides).parallel
    assert layout["launcher"] == launcher and layout["world"] == 2
    assert (layout["tp"], layout["pp"], layout["dp"]) == (p.tensor, p.pipeline, 2 // (p.tensor * p.pipeline)), layout
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["parallel"] == load_config(config, overrides).to_dict()["parallel"]
    assert_same_training(read_run(tmp_path / "run"), single["staircase"], f"{launcher} {' '.join(overrides)}")
    # The parallel run's own test score equals one process scoring its gathered checkpoint.
    parallel_test = json.loads((tmp_path / "run" / "results.json").read_text())["test"]
    assert evaluate_run(str(tmp_path / "run"), "test")["loss"] == pytest.approx(parallel_test["loss"], rel=TOL)


def test_a_rank_that_fails_under_mpirun_ends_the_launch(config, tmp_path):
    """mpirun ends the others only when a rank dies, not when it exits with an error: a failing rank
    aborts the launch, instead of leaving the other ranks waiting for it (here in the rendezvous)."""
    train = [sys.executable, "-m", "stairscale.cli", "train", "--config", str(config), "--set", f"run_dir={tmp_path / 'run'}",
             "--set", "parallel.tensor=2"]
    mpirun = [str(Path(sys.executable).parent / "mpirun"), "-n", "1", *train, ":", "-n", "1", *train, "--set", "train.steps=-1"]
    launch = subprocess.Popen(mpirun, cwd=ROOT, env=env(), stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = launch.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(launch.pid, 9)
        raise AssertionError("rank 0 still waits two minutes after rank 1 failed") from None
    assert launch.returncode != 0 and "train.steps: must be >= 1, got -1" in stderr, stderr[-3000:]


def test_launches_that_cannot_work_are_refused_with_the_reason(config, tmp_path):
    train = [sys.executable, "-m", "stairscale.cli", "train", "--config", str(config), "--set", f"run_dir={tmp_path / 'run'}"]
    # Open MPI's mpirun started this process, but the venv's mpi4py (MPICH) sees one process of one.
    done = subprocess.run(train, capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**env(), "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1"})
    assert done.returncode == 2 and "mpi4py's MPI (MPICH, from the venv) sees one process" in done.stderr, done.stderr[-3000:]
    # torchrun on several nodes needs the first node's address.
    variables = {**env(), "BIN": str(Path(sys.executable).parent), "NNODES": "2", "NODE_RANK": "1"}
    variables.pop("MASTER_ADDR", None)
    done = subprocess.run([str(ROOT / "launch/torchrun.sh"), "--config", str(config)], capture_output=True, text=True,
                          cwd=ROOT, timeout=60, env=variables)
    assert done.returncode == 2 and "NNODES=2 needs MASTER_ADDR" in done.stderr, done.stderr
    variables.update(MASTER_ADDR="127.0.0.1", NODE_RANK="2")
    done = subprocess.run([str(ROOT / "launch/torchrun.sh")], capture_output=True, text=True, cwd=ROOT, timeout=60, env=variables)
    assert done.returncode == 2 and "NODE_RANK=2 must be one of 0 to 1 (NNODES=2)" in done.stderr, done.stderr
    # DeepSpeed's runner would take a missing hostfile for this host alone, and train on it.
    done = subprocess.run([str(ROOT / "launch/deepspeed.sh")], capture_output=True, text=True, cwd=ROOT, timeout=60,
                          env={**variables, "HOSTFILE": str(tmp_path / "hosts")})
    assert done.returncode == 2 and f"HOSTFILE={tmp_path / 'hosts'} cannot be read" in done.stderr, done.stderr
    variables["NNODES"] = "1:2"  # torchrun's static rendezvous cannot take an elastic range
    done = subprocess.run([str(ROOT / "launch/torchrun.sh")], capture_output=True, text=True, cwd=ROOT, timeout=60, env=variables)
    assert done.returncode == 2 and "NNODES=1:2 must be a node count" in done.stderr, done.stderr
    # RANK and WORLD_SIZE by hand need rank 0's address: 127.0.0.1 would be wrong on any other node.
    by_hand = {**env(), "RANK": "0", "WORLD_SIZE": "2"}
    by_hand.pop("MASTER_ADDR", None)
    done = subprocess.run(train, capture_output=True, text=True, cwd=ROOT, timeout=300, env=by_hand)
    assert done.returncode == 1 and "rank 0 of 2 (env): MASTER_ADDR is not set" in done.stderr, done.stderr[-3000:]
    # A rank whose peers never come gives up after parallel.timeout_minutes (3 s here), naming where it waited.
    port = free_port()
    done = subprocess.run([*train, "--set", "parallel.timeout_minutes=0.05"], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**by_hand, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
    assert done.returncode == 1 and f"rank 0 of 2 (env) could not join the others at 127.0.0.1:{port}" in done.stderr, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    # Under mpirun, rank 0 hosts the rendezvous: an inherited MASTER_ADDR of another host is refused at once.
    mpirun = [str(Path(sys.executable).parent / "mpirun"), "-n", "2", *train, "--set", "parallel.tensor=2"]
    done = subprocess.run(mpirun, capture_output=True, text=True, cwd=ROOT, timeout=300, env={**env(), "MASTER_ADDR": "192.0.2.1"})
    assert done.returncode != 0 and "MASTER_ADDR=192.0.2.1 is not an address of rank 0's host" in done.stderr, done.stderr[-3000:]


def test_a_process_another_launcher_gave_a_rank_never_starts_mpi_to_abort():
    """torchrun started by mpirun (one per node) gives its workers RANK and WORLD_SIZE, and they
    inherit MPI's variables: such a worker is not an MPI rank, and must not call MPI_Init to abort."""
    check = "from stairscale.parallel.launchers import abort_mpi_launch; import sys; abort_mpi_launch(1); print('mpi4py' in sys.modules)"
    variables = {**env(), "PMI_SIZE": "2", "PMI_RANK": "1", "RANK": "3", "WORLD_SIZE": "4", "TORCHELASTIC_RUN_ID": "job"}
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=ROOT, timeout=120, env=variables)
    assert done.returncode == 0 and done.stdout.strip() == "False", (done.stdout, done.stderr[-3000:])


def test_which_launcher_started_a_process_inside_a_slurm_allocation(monkeypatch):
    monkeypatch.setattr(os, "environ", os.environ.copy())  # launch_environment sets RANK and more: keep them here
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMI_RANK", "PMIX_SIZE", "PMIX_RANK",
                "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", "MASTER_ADDR"):
        monkeypatch.delenv(key, raising=False)
    # A batch script or salloc shell has SLURM_PROCID and SLURM_NTASKS, but no step: a process
    # started there without a launcher is a single process, not rank 0 of a world of 8.
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_PROCID", "1")
    assert launch_environment.__wrapped__() == ("single", 0, 1)
    # mpirun in the allocation: hydra's proxies are the step's 2 tasks, and they start 8 ranks.
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")
    monkeypatch.setenv("PMI_SIZE", "8")
    assert started_by_mpi()
    # srun with an MPI plugin sets MPI's variables for its own tasks: still an srun launch.
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setenv("PMI_RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert not started_by_mpi() and launch_environment.__wrapped__() == ("srun", 1, 2)


def test_the_pipeline_runs_backward_outside_the_forward_autocast():
    """The trainer wraps a whole wavefront in its bf16 autocast; backward must not run under it
    (it would recast the backward's own operations, which the single-device step never does)."""
    leaf = torch.ones(3, requires_grad=True)
    seen = []
    leaf.register_hook(lambda grad: seen.append(torch.is_autocast_enabled("cpu")))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _backward((leaf * 2).sum())
        assert torch.is_autocast_enabled("cpu")
    assert seen == [False] and leaf.grad.tolist() == [2.0, 2.0, 2.0]


def test_each_process_takes_its_own_gpu_or_is_refused(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    assert [cuda_device_index(local, 8) for local in range(8)] == list(range(8))  # --gpus-per-node
    assert [cuda_device_index(local, 1) for local in range(8)] == [0] * 8  # --gpus-per-task=1
    with pytest.raises(LaunchError, match=r"LOCAL_RANK 4 but this process sees 4 GPUs \(CUDA_VISIBLE_DEVICES=0,1,2,3\)"):
        cuda_device_index(4, 4)  # 8 processes on a node of 4 GPUs: not two on one GPU


def test_pipeline_benchmark_compares_micro_batch_counts(config, tmp_path):
    done = subprocess.run(torchrun(2, "-m", "stairscale.cli", "bench", "pipeline", "--config", str(config),
                                   "--set", "parallel.pipeline=2", "--steps", "2", "--warmup", "2", "--micro-batches", "1,2"),
                          capture_output=True, text=True, env=env(), timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("micro-batches")]
    # Each row names the micro-batches its trainer ran: S = 5 calls, 20 slots vs 22/2.
    assert [line.split(":")[0] for line in lines] == ["micro-batches 1", "micro-batches 2"], done.stdout
    assert "unit-time model 1.00x" in lines[0] and "unit-time model 1.82x" in lines[1], done.stdout
    assert all(0 < float(line.split(": ")[1].split(" ms/step")[0]) < math.inf for line in lines), done.stdout


def test_unsupported_layouts_are_refused_with_the_reason(config):
    for stage in (2, 3):
        with pytest.raises(ConfigError, match=f"parallel.zero_stage: ZeRO-{stage} .* pipeline"):
            load_config(config, ["parallel.pipeline=2", f"parallel.zero_stage={stage}"])
    with pytest.raises(ConfigError, match="parallel.tensor: 2 does not divide model.d_ff=33"):
        load_config(config, ["parallel.tensor=2", "model.d_ff=33"])
    with pytest.raises(ConfigError, match="parallel.tensor: 3 does not divide model.n_heads=2"):
        load_config(config, ["parallel.tensor=3"])
    with pytest.raises(ConfigError, match="parallel.pipeline: 3 stages for model.n_layers=2"):
        load_config(config, ["parallel.pipeline=3"])


def test_stage_layers_cover_the_core_once():
    for layers in range(1, 9):
        for stages in range(1, layers + 1):
            split = [list(stage_layers(layers, stages, p)) for p in range(stages)]
            assert sum(split, []) == list(range(layers)) and all(split)
