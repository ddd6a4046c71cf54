"""Experiment (not part of the package): fine-tune a trained random-walk run, with the labels of
every curriculum stage shifted by the carried offset (train.carried_offset_stages, see
stairscale/train/carried_offset.py). The package has no option to start from another run's
weights; this script adds that and nothing else.

usage: python docs/experiments/carried_offset_finetune.py INIT_RUN_DIR CONFIG [--plain] [--keep-evals] [key=value ...]
  INIT_RUN_DIR  a finished random-walk run whose weights to start from
  --plain       the same fine-tune with the true labels (the baseline)
  --keep-evals  also save the weights at every validation, as RUN_DIR/step<N>/checkpoint.pt
See docs/recipe_trials.md, "Fine-tuning on long walks with the carried offset".
"""

import sys

from stairscale.config import load_config
from stairscale.train.checkpoint import load_checkpoint, save_checkpoint
from stairscale.train.trainer import Trainer


def main(argv: list[str]) -> None:
    init_run, config, *rest = argv
    cfg = load_config(config, [key for key in rest if not key.startswith("--")])
    if "--plain" not in rest:
        cfg.train.carried_offset_stages = list(range(cfg.task.stages))
    trainer = Trainer(cfg.validate())  # the key is set after load_config validated the rest
    trainer.model.load_state_dict(load_checkpoint(init_run)["model"])
    if "--keep-evals" in rest:
        evaluate = trainer._evaluate

        def evaluate_and_keep(split: str, step: int) -> dict:
            kept = trainer.run_dir / f"step{step}"
            kept.mkdir(exist_ok=True)
            save_checkpoint(kept, {"model": trainer.model.state_dict(), "step": step})
            return evaluate(split, step)

        trainer._evaluate = evaluate_and_keep
    trainer.train()


if __name__ == "__main__":
    main(sys.argv[1:])
