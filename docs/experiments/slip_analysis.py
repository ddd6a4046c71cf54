"""Experiment (not part of the package): where a random-walk run first loses track, and whether it
finds the true position again afterwards.

usage: python docs/experiments/slip_analysis.py RUN_DIR [RUN_DIR ...] [--length L] [--docs N]
For each run: the error on N test walks of L tokens (the walks `stairscale eval --run RUN_DIR --set
task.eval_length=L --set task.eval_docs=N` scores), the quartiles of the position of each walk's
first wrong prediction, and the share of right predictions after it. See docs/recipe_trials.md,
"Good and bad seeds slip equally early; the good one finds its way back".
"""

import argparse
from pathlib import Path

import numpy as np
import torch

from stairscale.config import load_config
from stairscale.data.prepare import build_task
from stairscale.model.lm import StaircaseLM
from stairscale.model.state import RecurrentState
from stairscale.train.checkpoint import load_checkpoint


def predictions(run_dir: str, length: int, docs: int, after_segment=None) -> tuple[np.ndarray, np.ndarray]:
    """The run's predicted and true labels [docs, length] on its test walks, state carried
    across segments from a fresh start. `after_segment(model)` is called after each segment."""
    cfg = load_config(Path(run_dir) / "config.yaml", [])
    task = build_task(cfg.task)
    walks = task.documents("test", docs, length)
    tokens = torch.tensor(np.stack([walk.tokens for walk in walks]).astype(np.int64))
    labels = np.stack([walk.labels for walk in walks]).astype(np.int64)
    doc_start = torch.zeros_like(tokens, dtype=torch.bool)
    doc_start[:, 0] = True
    model = StaircaseLM(cfg.model, len(task.vocab), task.vocab.pad_id)
    model.load_state_dict(load_checkpoint(run_dir)["model"])
    model.eval()
    state, predicted = RecurrentState.initial(docs), []
    with torch.no_grad():
        for start in range(0, length, cfg.train.segment_len):
            piece = slice(start, start + cfg.train.segment_len)
            logprobs, state = model.logprobs(tokens[:, piece], doc_start[:, piece], state)
            predicted.append(logprobs.argmax(-1))
            if after_segment:
                after_segment(model)
    return torch.cat(predicted, dim=1).numpy(), labels


def report(run_dir: str, length: int, docs: int) -> str:
    predicted, labels = predictions(run_dir, length, docs)
    wrong = (predicted != labels)[:, 1:]  # the BOS has no label
    slipped = wrong.any(axis=1)
    first = wrong.argmax(axis=1) + 1
    right_after = [1 - wrong[i, first[i] :].mean() for i in np.flatnonzero(slipped) if first[i] < wrong.shape[1]]
    quartiles = np.percentile(first[slipped], [25, 50, 75]).round().astype(int) if slipped.any() else []
    return (f"{run_dir}: error {100 * wrong.mean():.1f}% | walks with an error {slipped.sum()} of {docs} | "
            f"first error at positions {' / '.join(map(str, quartiles))} (quartiles) | "
            f"right after it {100 * np.mean(right_after):.0f}%")


def main(report=report, description: str = __doc__) -> None:
    """Print `report(run, length, docs)` for each run named on the command line."""
    parser = argparse.ArgumentParser(description=description.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--docs", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for run in args.runs:
        print(report(run, args.length, args.docs), flush=True)


if __name__ == "__main__":
    main()
