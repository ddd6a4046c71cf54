"""The errors stairscale reports to its users. Each message names what is wrong and where: the
config key, the dataset, shard and sample, or the checkpoint file. The command line prints them
without a traceback."""


class ConfigError(ValueError):
    """A config value is unknown, of the wrong type, or impossible; the message names the key."""


class DataError(RuntimeError):
    """A dataset, shard or sample is missing, corrupt or empty; the message names it."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or does not fit the model; the message names the file."""


class LaunchError(RuntimeError):
    """The processes of a launch could not join; the message names the rank and the address."""


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm stopped being a finite number; the message names the step."""


class RunFailed(RuntimeError):
    """A training run that an experiment started exited with an error."""
