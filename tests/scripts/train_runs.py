"""Train several tiny runs one after the other in one launch (one set of process groups).

Usage: torchrun --nproc_per_node=N train_runs.py RUNS.json, where RUNS.json is a list of
[config file, run_dir, [key=value, ...]]. Each run is `stairscale train` in-process.
"""

import json
import sys

from stairscale.config import load_config
from stairscale.parallel.groups import shutdown
from stairscale.train.trainer import Trainer

if __name__ == "__main__":
    for config, run_dir, overrides in json.load(open(sys.argv[1])):
        Trainer(load_config(config, [*overrides, f"run_dir={run_dir}"]), quiet=True).train()
    shutdown()
