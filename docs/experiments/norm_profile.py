"""Experiment (not part of the package): how much a random-walk Staircase's carried rows grow along
the walk, chunk by chunk.

usage: python docs/experiments/norm_profile.py RUN_DIR [RUN_DIR ...] --length 512 --docs 128
The mean norm of the carried rows (state_drift.py) at chunks 4, 16, 32 and the last, and the
growth from chunk 4 to the last. After the first curriculum stage a growth near 1 marked the
plain runs that went on to track long walks best. See docs/recipe_trials.md, "The first stage
already tells a good seed from a bad one" and the section after it.
"""

import numpy as np
import slip_analysis
from state_drift import carried_rows


def report(run_dir: str, length: int, docs: int) -> str:
    rows, _, _ = carried_rows(run_dir, length, docs)
    norm = np.linalg.norm(rows, axis=-1).mean(0)
    chunks = [4, 16, 32, len(norm) - 1]
    profile = " / ".join(f"{norm[c]:.1f}" for c in chunks)
    return f"{run_dir}: norm at chunk {' / '.join(map(str, chunks))} = {profile} | growth {norm[-1] / norm[4]:.2f}"


if __name__ == "__main__":
    slip_analysis.main(report, __doc__)
