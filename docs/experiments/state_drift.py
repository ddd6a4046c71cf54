"""Experiment (not part of the package): does a random-walk Staircase's carried state drift as the
walk gets longer than the training walks?

usage: python docs/experiments/state_drift.py RUN_DIR [RUN_DIR ...] [--length L] [--docs N]
The carried row of a chunk is the first-pass top output of its last token (window n = 2). On the
test walks (those of slip_analysis.py), for each stretch of 128 tokens: the mean norm of the
carried rows, and how far the mean carried row of each position has moved from its mean at the
training depths (chunks 4-15, tokens 32-127), as a fraction of the mean distance between two
positions' means there. Only walks with no wrong prediction yet at a chunk's last token count.
See docs/recipe_trials.md, "The bad seeds' carried state drifts with depth".
"""

from pathlib import Path

import numpy as np
import slip_analysis
import torch
from first_pass_loss import steps_keeping_first_pass

from stairscale.config import load_config
from stairscale.model.schedules import StaircaseSchedule

TRAINING_DEPTHS = slice(4, 16)
STRETCH_CHUNKS = 16


def carried_rows(run_dir: str, length: int, docs: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Carried rows [docs, chunks, d], true and predicted positions at each chunk's last token."""
    StaircaseSchedule.steps = steps_keeping_first_pass
    rows = []
    predicted, labels = slip_analysis.predictions(run_dir, length, docs, lambda model: rows.append(torch.cat(model.schedule.first_pass, dim=1)))
    chunk = load_config(Path(run_dir) / "config.yaml", []).model.chunk
    last = slice(chunk - 1, None, chunk)
    return torch.cat(rows, dim=1)[:, last].numpy(), labels[:, last], predicted[:, last]


def report(run_dir: str, length: int, docs: int) -> str:
    rows, labels, predicted = carried_rows(run_dir, length, docs)
    right_so_far = np.cumprod(predicted == labels, axis=1).astype(bool)
    positions = np.unique(labels)

    def position_means(chunks: slice) -> dict[int, np.ndarray]:
        means = {}
        for p in positions:
            members = (labels[:, chunks] == p) & right_so_far[:, chunks]
            if members.sum() >= 20:
                means[p] = rows[:, chunks][members].mean(0)
        return means

    reference = position_means(TRAINING_DEPTHS)
    spacing = np.mean([np.linalg.norm(reference[a] - reference[b]) for a in reference for b in reference if a < b])
    stretches = []
    for first in range(0, rows.shape[1], STRETCH_CHUNKS):
        chunks = slice(first, first + STRETCH_CHUNKS)
        means = position_means(chunks)
        shared = [p for p in means if p in reference]
        drift = np.mean([np.linalg.norm(means[p] - reference[p]) for p in shared]) / spacing if shared else float("nan")
        norm = np.linalg.norm(rows[:, chunks], axis=-1).mean()
        stretches.append(f"{first * length // rows.shape[1]}: norm {norm:.1f}, drift {drift:.2f}")
    return f"{run_dir}: " + " | ".join(stretches)


if __name__ == "__main__":
    slip_analysis.main(report, __doc__)
