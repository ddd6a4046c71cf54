"""The `stairscale` command line: train, eval, prepare-data, bench, reproduce."""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

from stairscale.config import COMPILE_MODES, check_writable_dir, load_config
from stairscale.errors import CheckpointError, ConfigError, DataError, LaunchError, RunFailed, TrainingDiverged
from stairscale.parallel.launchers import abort_mpi_launch


def positive(kind):
    """An argparse type: a number of `kind` above 0."""

    def parse(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def seed(text: str) -> int:
    """An argparse type: a train.seed (checked as the config checks it, before any work)."""
    try:
        return load_config(None, [f"train.seed={text}"]).train.seed
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def positive_ints(text: str) -> list[int]:
    """An argparse type: comma-separated integers above 0, such as 1,2,4."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,2,4, got {text!r}") from None
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"every count must be > 0, got {text!r}")
    return values


def compile_modes(text: str) -> list[str]:
    modes = text.split(",")
    for mode in modes:
        if mode not in COMPILE_MODES:
            raise argparse.ArgumentTypeError(f"{mode!r} is not one of {', '.join(COMPILE_MODES)}")
    return modes


class Once(argparse.Action):
    """An option that may be given once (a second --config would silently replace the first)."""

    def __call__(self, parser, namespace, value, option_string=None):
        if getattr(namespace, self.dest) is not None:
            parser.error(f"{option_string} given twice: one config file per command (change keys with --set)")
        setattr(namespace, self.dest, value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stairscale", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a model (no --config: a small Staircase on the random walk)")
    train.add_argument("--config", action=Once, help="YAML run config")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. train.steps=100")

    evaluate = commands.add_parser("eval", help="score a finished run's checkpoint on a split")
    evaluate.add_argument("--run", required=True, help="run directory (holds config.yaml and checkpoint.pt)")
    evaluate.add_argument("--split", default="test", choices=["valid", "test"])
    evaluate.add_argument("--weights", default="final", choices=["final", "best"],
                          help="final: checkpoint.pt; best: best.pt, the best validation's (train.keep_best)")
    evaluate.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a task, data or train key for scoring, e.g. task.eval_length=512")

    prepare = commands.add_parser("prepare-data", help="write the task's splits as webdataset shards with a manifest")
    prepare.add_argument("--config", action=Once, help="YAML run config (its task section, and train.lanes and data.shard_docs for the shards)")
    prepare.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    prepare.add_argument("--out", required=True, help="dataset directory to write (new or empty)")
    prepare.add_argument("--replace", action="store_true", help="replace the dataset --out holds (a run reading it would fail)")

    measured = argparse.ArgumentParser(add_help=False)
    measured.add_argument("--config", action=Once, help="YAML run config (default: the built-in one)")
    measured.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    measured.add_argument("--steps", type=positive(int), default=20, help="train steps per measurement (default %(default)s)")
    measured.add_argument("--warmup", type=positive(int), default=10, help="train steps before each measurement, which pay for start-up and compilation (default %(default)s)")
    bench = commands.add_parser("bench", help="measure a part of the system").add_subparsers(
        dest="what", required=True, metavar="{data,step,pipeline}")
    data = bench.add_parser("data", parents=[measured],
                            help="loader tokens/s beside the train step's")
    data.add_argument("--seconds", type=positive(float), default=10.0, help="seconds the loader is measured for (default %(default)s)")
    step = bench.add_parser("step", parents=[measured],
                            help="ms per train step: torch.compile'd core calls against eager")
    step.add_argument("--compile", type=compile_modes, default="default", help="compile modes to compare with eager, comma-separated (default %(default)s)")
    pipeline = bench.add_parser("pipeline", parents=[measured],
                                help="seconds per step by pipeline micro-batches (under a launcher, parallel.pipeline > 1)")
    pipeline.add_argument("--micro-batches", type=positive_ints, default=[1, 2, 4], help="micro-batch counts to compare, the first the baseline (default 1,2,4)")

    reproduce = commands.add_parser("reproduce", help="rerun an experiment of the paper")
    reproduce.add_argument("experiment", choices=["tracking"])
    reproduce.add_argument("--quick", action="store_true", help="the 2-CPU-core variant (under 30 minutes)")
    reproduce.add_argument("--out", default="runs/tracking", help="directory for the runs and the table")
    scaling = reproduce.add_mutually_exclusive_group()
    scaling.add_argument("--steps-scale", type=positive(float), default=1.0, help="multiply every run's steps, stage boundaries and warm-up (slower/faster machines)")
    scaling.add_argument("--fit-minutes", type=positive(float), help="measure the models' steps here and scale the runs (never beyond the recipe) to end within this many minutes, the measuring included")
    reproduce.add_argument("--compile", default="none", choices=COMPILE_MODES, help="train.compile of every run")
    reproduce.add_argument("--seed", type=seed, default=0, help="train.seed of every run (the results depend on it: docs/reproducing.md)")

    args = parser.parse_args(argv)
    try:
        exit_code = run_command(args)
    except KeyboardInterrupt:
        print(f"stairscale: {args.command} interrupted", file=sys.stderr)
        exit_code = 130
    except Exception:
        abort_mpi_launch(1, traceback.format_exc())
        raise
    if exit_code:
        abort_mpi_launch(exit_code)
    return exit_code


def run_command(args: argparse.Namespace) -> int:
    """Run one subcommand; the errors stairscale names are printed without a traceback."""
    try:
        COMMANDS[args.command](args)
    except ConfigError as err:
        print(f"stairscale: config error: {err}", file=sys.stderr)
        return 2
    except (DataError, CheckpointError, LaunchError, TrainingDiverged, RunFailed, OSError) as err:  # OSError: a full disk, say
        print(f"stairscale: error: {err}", file=sys.stderr)
        return 1
    return 0


def train_command(args: argparse.Namespace) -> None:
    from stairscale.train.trainer import Trainer

    Trainer(load_config(args.config, args.set)).train()


def eval_command(args: argparse.Namespace) -> None:
    from stairscale.train.metrics import headline
    from stairscale.train.scoring import evaluate_run

    result = evaluate_run(args.run, args.split, args.set, args.weights)
    print(f"{args.split}: {headline(result)} (loss {result['loss']:.4f})", file=sys.stderr)  # the JSON goes to stdout
    print(json.dumps(result, indent=2))


def prepare_data_command(args: argparse.Namespace) -> None:
    from stairscale.data.prepare import prepare_dataset

    cfg = load_config(args.config, args.set)
    check_writable_dir(args.out, "--out")
    manifest = prepare_dataset(cfg, args.out, args.replace)
    for split, info in manifest["splits"].items():
        print(f"{split}: {info['documents']:,} documents, {info['tokens']:,} tokens, {len(info['shards'])} shards")


def bench_command(args: argparse.Namespace) -> None:
    from stairscale.bench import bench_data, bench_pipeline, bench_step

    cfg = load_config(args.config, args.set)
    if args.what == "data":
        bench_data(cfg, args.seconds, args.steps, args.warmup)
    elif args.what == "step":
        bench_step(cfg, args.compile, args.steps, args.warmup)
    else:
        bench_pipeline(cfg, args.micro_batches, args.steps, args.warmup)


def reproduce_command(args: argparse.Namespace) -> None:
    from stairscale.reproduce import FULL, QUICK, fit_steps_scale, reproduce_tracking

    started = time.time()
    check_writable_dir(args.out, "--out")
    scale = args.steps_scale
    if args.fit_minutes:
        scale = fit_steps_scale(QUICK if args.quick else FULL, Path(args.out), args.fit_minutes, args.compile, started)
    elif not args.quick and scale == 1.0:
        print("reproduce tracking: the full recipe is planned for a fast GPU (docs/reproducing.md); --fit-minutes 9 "
              "measures this machine first and scales the runs to end within 9 minutes", flush=True)
    reproduce_tracking(quick=args.quick, out=Path(args.out), steps_scale=scale, compile=args.compile, seed=args.seed,
                       started=started)


COMMANDS = {"train": train_command, "eval": eval_command, "prepare-data": prepare_data_command,
            "bench": bench_command, "reproduce": reproduce_command}


if __name__ == "__main__":
    sys.exit(main())
