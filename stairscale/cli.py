"""The `stairscale` command line: train, eval, reproduce."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from stairscale.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stairscale", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a model (no --config: a small Staircase on the random walk)")
    train.add_argument("--config", help="YAML run config")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. train.steps=100")

    evaluate = commands.add_parser("eval", help="score a finished run's checkpoint on a split")
    evaluate.add_argument("--run", required=True, help="run directory (holds config.yaml and checkpoint.pt)")
    evaluate.add_argument("--split", default="test", choices=["valid", "test"])
    evaluate.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override an evaluation key, e.g. task.eval_length=512")

    reproduce = commands.add_parser("reproduce", help="rerun an experiment of the paper")
    reproduce.add_argument("experiment", choices=["tracking"])
    reproduce.add_argument("--quick", action="store_true", help="the 2-CPU-core variant (under 30 minutes)")
    reproduce.add_argument("--out", default="runs/tracking", help="directory for the runs and the table")

    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            from stairscale.train.trainer import Trainer

            Trainer(load_config(args.config, args.set)).train()
        elif args.command == "eval":
            print(json.dumps(evaluate_run(args.run, args.split, args.set), indent=2))
        else:
            from stairscale.reproduce import reproduce_tracking

            reproduce_tracking(quick=args.quick, out=Path(args.out))
    except ConfigError as err:
        print(f"stairscale: config error: {err}", file=sys.stderr)
        return 2
    return 0


def evaluate_run(run_dir: str, split: str, overrides: list[str] = ()) -> dict:
    """Load a run's config and checkpoint and score `split` with carried state from a fresh start."""
    from stairscale.data.streams import build_task, eval_documents
    from stairscale.data.tasks import TextTask
    from stairscale.train.checkpoint import load_checkpoint
    from stairscale.train.trainer import build_model, evaluate, resolve_device

    cfg = load_config(Path(run_dir) / "config.yaml", overrides)
    task = build_task(cfg.task)
    model = build_model(cfg, task)
    model.load_state_dict(load_checkpoint(run_dir)["model"])
    device = resolve_device(cfg)
    documents = eval_documents(task, cfg.task, split, cfg.train.lanes)
    tally = evaluate(model.to(device), cfg, documents, device, labelled=not isinstance(task, TextTask))
    result = {"run": str(run_dir), "split": split, **tally.summary()}
    if tally.labelled:
        result["error_by_position"] = tally.error_by_position(bucket=32)
    return result


if __name__ == "__main__":
    sys.exit(main())
