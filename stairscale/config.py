"""Typed run configuration: dataclasses, YAML files, dotted `key=value` overrides, strict checks.

Every mistake is reported with the dotted name of the key at fault, before any training starts.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sysconfig
import types
import typing
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from stairscale.errors import ConfigError

# cached and global_cached run the same code: Global Cached is a cache meant to hold the whole
# current document, with cache_len as its hard limit (docs/model.md).
SCHEDULES = ("staircase", "cached", "global_cached", "ladder", "transformer", "transformer_xl")
TEXT_FORMATS = ("auto", "files", "bytes", "enwik8")  # data/tasks.py: TextTask
ALGORITHMIC_EVAL_PROGRAMS = 1000  # per validation and test split, as in the paper (data/tasks.py: AlgorithmicTask)


def _checker(section: str):
    """need(ok, key, why): raise ConfigError naming `section.key` unless ok."""

    def need(ok: bool, key: str, why: str) -> None:
        if not ok:
            raise ConfigError(f"{section}.{key}: {why}")

    return need


@dataclass
class ModelConfig:
    schedule: str = "staircase"  # one of SCHEDULES
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 256
    dropout: float = 0.0  # on the feed-forward hidden layer
    attn_dropout: float = 0.0  # on attention probabilities
    positions: str = "rope"  # "rope" (ours, fast) or "relative" (the paper's learned table)
    attn_lim: int = 32  # keys at distance >= attn_lim are masked
    chunk: int = 8  # F: new tokens per staircase step
    window: int = 2  # n: chunks per staircase step (passes per token)
    cache_len: int = 0  # cached / global_cached: tokens of final states kept
    mem_len: int = 0  # transformer_xl / ladder: layer-input memory per layer
    repeats: int = 1  # R: ladder repeats of the core
    activation_checkpointing: bool = False  # recompute each core call in backward instead of storing it

    @property
    def is_staircase(self) -> bool:
        """Staircase, Cached or Global Cached: chunked steps over a window, state carried without bound."""
        return self.schedule in ("staircase", "cached", "global_cached")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def passes(self) -> int:
        """Core passes per token."""
        return self.window if self.is_staircase else self.repeats

    def validate(self, segment_len: int) -> None:
        need = _checker("model")

        need(self.schedule in SCHEDULES, "schedule", f"{self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        need(self.positions in ("relative", "rope"), "positions", f"{self.positions!r} is not relative or rope")
        for key in ("d_model", "n_layers", "n_heads", "d_ff", "attn_lim", "chunk"):
            need(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        need(self.window >= 1, "window", f"n must be >= 1, got {self.window}")
        need(self.repeats >= 1, "repeats", f"R must be >= 1, got {self.repeats}")
        need(self.schedule == "ladder" or self.repeats == 1, "repeats", f"only the ladder repeats the core, got {self.repeats}")
        for key in ("cache_len", "mem_len"):
            need(getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")
        need(self.d_model % self.n_heads == 0, "n_heads", f"{self.n_heads} does not divide d_model={self.d_model}")
        need(self.positions != "rope" or self.head_dim % 2 == 0, "positions", f"rope needs an even head_dim, got {self.head_dim}")
        for key in ("dropout", "attn_dropout"):
            need(0.0 <= getattr(self, key) < 1.0, key, "must be in [0, 1)")
        if self.is_staircase:
            need(segment_len % self.chunk == 0, "chunk", f"segment length M={segment_len} is not a multiple of F={self.chunk}")
            window_rows = self.chunk * self.window
            need(self.attn_lim >= window_rows, "attn_lim", f"{self.attn_lim} is shorter than the window n*F={window_rows}")
            cached = self.schedule != "staircase"
            need(not cached or self.cache_len > 0, "cache_len", f"schedule {self.schedule} needs cache_len > 0")
            need(cached or self.cache_len == 0, "cache_len", "only the cached schedules use a cache")
            # (ours, for rope too) Keys at distance >= attn_lim are masked: every window row sees the whole cache.
            need(
                not cached or self.attn_lim >= window_rows + self.cache_len,
                "attn_lim",
                f"{self.attn_lim} is shorter than window + cache = {window_rows + self.cache_len}",
            )
            need(self.mem_len == 0, "mem_len", f"schedule {self.schedule} has no layer memory")
        else:
            need(self.cache_len == 0, "cache_len", f"schedule {self.schedule} has no cache")
            need(self.schedule != "transformer" or self.mem_len == 0, "mem_len", "the transformer has no memory (use transformer_xl)")
            need(self.schedule != "transformer_xl" or self.mem_len > 0, "mem_len", "transformer_xl needs mem_len > 0")


@dataclass
class TaskConfig:
    name: str = "random_walk"  # random_walk | algorithmic | text
    positions: int = 8  # random walk: ring size P
    variables: int = 3  # algorithmic: 3 or 5
    path: str = ""  # text: file or directory; "" = the Python standard library source
    format: str = "auto"  # text: auto | files | bytes | enwik8
    # Random walk document lengths: a curriculum of (lengths, from step). train_lengths[i] is used
    # from step train_length_steps[i] on.
    train_lengths: list[int] = field(default_factory=lambda: [64])
    train_length_steps: list[int] = field(default_factory=lambda: [0])
    eval_length: int = 128  # random walk validation/test document length
    eval_docs: int = 64  # random walk / algorithmic: documents per validation or test evaluation (0: 1,000 walks, or all programs)
    train_docs: int = 50000  # random walk: training documents per curriculum length
    train_length_spread: float = 0.5  # random walk: training lengths uniform in [L*(1-spread), L]
    piece_len: int = 1 << 20  # text: longer documents are cut into pieces of at most this many tokens, start token included
    tokenizer: str = "bytes"  # text: bytes | bpe (trained on the train split with `tokenizers`)
    bpe_vocab: int = 4096  # text with tokenizer bpe: vocabulary size, special tokens included
    seed: int = 0

    @property
    def stages(self) -> int:
        return len(self.train_lengths) if self.name == "random_walk" else 1

    def dataset_keys(self) -> list[str]:
        """The keys that decide this task's prepared dataset (the others do not apply to it, or,
        like train_length_steps, only schedule its use)."""
        if self.name == "random_walk":
            return ["name", "positions", "train_lengths", "eval_length", "eval_docs", "train_docs", "train_length_spread", "seed"]
        if self.name == "algorithmic":
            return ["name", "variables", "eval_docs", "seed"]
        return ["name", "path", "format", "piece_len", "tokenizer"] + (["bpe_vocab"] if self.tokenizer == "bpe" else [])

    def validate(self) -> None:
        need = _checker("task")

        need(self.name in ("random_walk", "algorithmic", "text"), "name", f"{self.name!r} is not random_walk, algorithmic or text")
        need(self.positions >= 2, "positions", f"the ring needs at least 2 positions, got {self.positions}")
        need(2 <= self.variables <= 5, "variables", f"programs have 2 to 5 variables (the paper: 3 or 5), got {self.variables}")
        need(self.format in TEXT_FORMATS, "format", f"{self.format!r} is not one of {', '.join(TEXT_FORMATS)}")
        need(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        steps = self.train_length_steps
        need(len(self.train_lengths) == len(steps) and self.train_lengths, "train_length_steps", "needs one start step per entry of task.train_lengths")
        need(steps[0] == 0 and all(a < b for a, b in zip(steps, steps[1:])), "train_length_steps", "must start at 0 and increase")
        need(min(self.train_lengths) >= 2, "train_lengths", "documents need at least 2 tokens (start token + one move)")
        need(self.eval_length >= 2, "eval_length", "documents need at least 2 tokens (start token + one move)")
        need(self.tokenizer in ("bytes", "bpe"), "tokenizer", f"{self.tokenizer!r} is not bytes or bpe")
        need(self.tokenizer != "bpe" or self.name == "text", "tokenizer", "bpe is for the text task only")
        need(self.bpe_vocab >= 300, "bpe_vocab", f"{self.bpe_vocab} is too small (the byte alphabet alone is 256)")
        need(self.bpe_vocab <= 1_048_576, "bpe_vocab", f"{self.bpe_vocab:,} is too large (at most 1,048,576)")
        need(0.0 <= self.train_length_spread < 1.0, "train_length_spread", "must be in [0, 1)")
        need(self.name != "algorithmic" or self.eval_docs <= ALGORITHMIC_EVAL_PROGRAMS, "eval_docs",
             f"the algorithmic task has {ALGORITHMIC_EVAL_PROGRAMS} validation and test programs, got {self.eval_docs}")
        need(self.eval_docs >= 0, "eval_docs", f"must be >= 0, got {self.eval_docs}")
        need(self.train_docs >= 1, "train_docs", f"must be positive, got {self.train_docs}")
        need(self.piece_len >= 2, "piece_len", f"must be >= 2 (the start token and a token of text), got {self.piece_len}")


@dataclass
class DataConfig:
    dir: str = ""  # a prepared dataset (stairscale prepare-data); "" = prepare one for the task in `cache`
    cache: str = "~/.cache/stairscale/datasets"  # where automatically prepared datasets live
    shard_docs: int = 0  # documents per shard when preparing; 0 = a multiple of train.lanes, >= 64 and >= 2 a lane
    workers: int = 0  # loader worker processes per rank (0 = read in the training process)
    prefetch: int = 4  # batches each worker prepares ahead
    on_bad_sample: str = "error"  # error | skip (padding in its place; each reader prints every sample it skips once)

    def validate(self) -> None:
        need = _checker("data")

        need(self.on_bad_sample in ("error", "skip"), "on_bad_sample", f"{self.on_bad_sample!r} is not error or skip")
        for key in ("shard_docs", "workers"):
            need(getattr(self, key) >= 0, key, "must be >= 0")
        need(self.prefetch >= 1, "prefetch", "must be >= 1")
        need(self.cache.strip() != "", "cache", "must name a directory (it would be the current one)")


COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune-no-cudagraphs")


@dataclass
class TrainConfig:
    lanes: int = 32  # B: lanes per step (global batch)
    segment_len: int = 64  # M: tokens per lane per step
    grad_accum: int = 1  # each rank's lanes are split into this many micro-batches (pipeline: the wavefront's micro-batches)
    steps: int = 2000
    lr: float = 2e-3
    min_lr_ratio: float = 0.05  # cosine decays to lr * min_lr_ratio
    lr_schedule: str = "cosine"  # cosine | constant
    lr_restarts: bool = False  # restart warm-up + schedule at every curriculum stage
    stage_lr: list[float] = field(default_factory=list)  # with lr_restarts: peak lr of each stage (empty: lr)
    carried_offset_stages: list[int] = field(default_factory=list)  # random walk: stages trained on labels shifted by the carried belief (train/carried_offset.py)
    warmup_steps: int = 200
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.98
    grad_clip: float = 0.25  # 0 = no clipping
    eval_every: int = 200  # 0 = only at the end
    eval_batches: int = 0  # validations score the first N segments of every lane; 0 = the whole split (test: always whole)
    keep_best: bool = False  # also keep the weights of the best validation as best.pt, and score them on test
    log_every: int = 20
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16
    threads: int = 0  # torch CPU threads, 0 = torch's default
    compile: str = "none"  # none | a torch.compile mode for every core call: default | reduce-overhead | max-autotune-no-cudagraphs

    def validate(self) -> None:
        need = _checker("train")

        for key in ("lanes", "segment_len", "grad_accum", "steps"):
            need(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        need(self.lanes % self.grad_accum == 0, "grad_accum", f"{self.grad_accum} does not divide lanes={self.lanes}")
        need(0 < self.lr < math.inf, "lr", f"must be a finite number > 0, got {self.lr}")
        need(self.lr_schedule in ("cosine", "constant"), "lr_schedule", f"{self.lr_schedule!r} is not cosine or constant")
        need(self.device in ("auto", "cpu", "cuda"), "device", f"{self.device!r} is not auto, cpu or cuda")
        need(self.precision in ("auto", "fp32", "bf16"), "precision", f"{self.precision!r} is not auto, fp32 or bf16")
        need(self.compile in COMPILE_MODES, "compile", f"{self.compile!r} is not one of {', '.join(COMPILE_MODES)}")
        for key in ("warmup_steps", "grad_clip", "weight_decay", "eval_every", "eval_batches", "seed", "threads"):
            need(getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")
        need(self.log_every >= 1, "log_every", f"must be >= 1, got {self.log_every}")
        for key in ("beta1", "beta2"):
            need(0.0 <= getattr(self, key) < 1.0, key, "must be in [0, 1)")
        need(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", "must be in [0, 1]")
        need(not self.stage_lr or self.lr_restarts, "stage_lr", "needs train.lr_restarts: true")
        need(all(lr > 0 for lr in self.stage_lr), "stage_lr", "every stage's lr must be > 0")
        need(not self.keep_best or 0 < self.eval_every < self.steps, "keep_best",
             f"needs validations during the run (0 < train.eval_every < train.steps, got {self.eval_every}); "
             "with one validation, at the end, the best weights are the final ones")


@dataclass
class ParallelConfig:
    """How the processes of a launch share the work. The data-parallel size is what is left:
    world size / (tensor * pipeline). Micro-batches are train.grad_accum lane groups per rank.
    The optimizer runs in a DeepSpeed engine when there is more than one process or zero_stage > 0,
    and in plain PyTorch otherwise."""

    tensor: int = 1  # TP: heads, feed-forward and vocabulary split over this many ranks
    pipeline: int = 1  # PP: core layers split over this many stages
    zero_stage: int = 0  # DeepSpeed ZeRO stage over the data-parallel group (0-3)
    backend: str = "auto"  # auto (nccl on GPU, gloo on CPU) | gloo | nccl
    timeout_minutes: float = 0.0  # how long a rank waits for the others to join or in a collective; 0: torch's default

    def validate(self, model: ModelConfig) -> None:
        need = _checker("parallel")

        for key in ("tensor", "pipeline"):
            need(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        need(self.zero_stage in (0, 1, 2, 3), "zero_stage", f"{self.zero_stage} is not 0, 1, 2 or 3")
        need(self.backend in ("auto", "gloo", "nccl"), "backend", f"{self.backend!r} is not auto, gloo or nccl")
        need(0 <= self.timeout_minutes <= 1e6, "timeout_minutes", f"must be >= 0 and at most 1e6 (about two years), got {self.timeout_minutes}")
        need(model.n_heads % self.tensor == 0, "tensor", f"{self.tensor} does not divide model.n_heads={model.n_heads}")
        need(model.d_ff % self.tensor == 0, "tensor", f"{self.tensor} does not divide model.d_ff={model.d_ff}")
        need(self.pipeline <= model.n_layers, "pipeline", f"{self.pipeline} stages for model.n_layers={model.n_layers} layers")
        need(
            self.pipeline == 1 or self.zero_stage <= 1,
            "zero_stage",
            f"ZeRO-{self.zero_stage} reduces gradients inside each backward pass, but the pipeline runs one backward per "
            "core call and stage; use zero_stage 0 or 1 with pipeline > 1",
        )


def shortest_stage(starts: list[int], steps: int) -> int:
    """The fewest steps of the curriculum stages starting at `starts` in a run of `steps`."""
    return min(stop - start for start, stop in zip(starts, [*starts[1:], steps]))


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    run_dir: str = "runs/default"

    def validate(self) -> RunConfig:
        if not self.run_dir.strip():
            raise ConfigError("run_dir: must name a directory (an empty one would write the run into the current one)")
        self.run_dir = os.path.expanduser(self.run_dir)
        self.task.validate()
        self.data.validate()
        self.train.validate()
        self.model.validate(self.train.segment_len)
        self.parallel.validate(self.model)
        if self.task.name == "text" and not self.data.dir:
            self._check_text_source()
        if self.task.stages > 1 and self.task.train_length_steps[-1] >= self.train.steps:
            raise ConfigError(f"task.train_length_steps: stage {self.task.stages - 1} starts at step "
                              f"{self.task.train_length_steps[-1]}, not before the run's end at train.steps={self.train.steps}")
        if self.train.stage_lr and len(self.train.stage_lr) != self.task.stages:
            raise ConfigError(f"train.stage_lr: {len(self.train.stage_lr)} values for {self.task.stages} curriculum stages")
        self._check_warm_up()
        for stage in self.train.carried_offset_stages:
            if self.task.name != "random_walk":
                raise ConfigError(f"train.carried_offset_stages: needs labels on a ring (task random_walk), not task {self.task.name}")
            if not 0 <= stage < self.task.stages:
                raise ConfigError(f"train.carried_offset_stages: stage {stage} is not one of the {self.task.stages} curriculum stages (0-based)")
        return self

    def _check_warm_up(self) -> None:
        """Warm-up shorter than what it warms up (the run, or with lr_restarts every stage): else
        the learning rate never reaches its peak, nor decays."""
        restarts = self.train.lr_restarts and self.task.stages > 1
        shortest = shortest_stage(self.task.train_length_steps if restarts else [0], self.train.steps)
        if self.train.warmup_steps and self.train.warmup_steps >= shortest:
            what = f"the shortest curriculum stage ({shortest} steps; train.lr_restarts warms up every stage)" if restarts \
                else f"the run (train.steps={self.train.steps})"
            raise ConfigError(f"train.warmup_steps: {self.train.warmup_steps} is not shorter than {what}: the learning "
                              f"rate would never reach its peak, nor decay; set a shorter one (--set train.warmup_steps={max(1, shortest // 10)})")

    def _check_text_source(self) -> None:
        path = Path(self.task.path).expanduser() if self.task.path else Path(sysconfig.get_paths()["stdlib"])
        if not path.exists():
            raise ConfigError(f"task.path: {self.task.path!r} does not exist")
        if self.task.format in ("bytes", "enwik8") and not path.is_file():
            raise ConfigError(f"task.format: {self.task.format} reads one file, but task.path {str(path)!r} is a directory (use files or auto)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def reach(cfg: RunConfig) -> int | None:
    """How far back a model can see without carried state, or None for the staircase family,
    whose carried state has no bound. With memory: attention span plus memory (the paper's
    measure), or the stacked span of all layer passes if that is longer."""
    m = cfg.model
    if m.is_staircase:
        return None
    stacked = m.n_layers * m.repeats * (m.attn_lim - 1) + 1
    if m.mem_len == 0:
        return min(cfg.train.segment_len, stacked)
    return max(m.attn_lim + m.mem_len, stacked)


INT_LIMIT = 2**31
SEED_LIMIT = 2**63  # seeds: torch.manual_seed takes 64 bits, and each rank adds its rank


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass `cls` from nested dicts, rejecting unknown keys and wrong types."""
    if data is None and prefix:  # an empty section in YAML
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            raise ConfigError(f"{prefix}{key}: unknown key (known: {', '.join(sorted(known))})")
    values = {key: _coerce(hints[key], value, f"{prefix}{key}") for key, value in data.items()}
    return cls(**values)


def _coerce(hint, value, key: str):
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, key + ".")
    origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"{key}: union types are not supported in configs")
    if hint is str and value is None:  # `--set data.dir=` (YAML reads nothing as null)
        return ""
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    is_bool_for_number = isinstance(value, bool) and hint is not bool
    if not isinstance(value, hint) or is_bool_for_number:
        raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r} ({type(value).__name__})")
    limit = SEED_LIMIT if key.endswith(".seed") else INT_LIMIT  # torch and the C libraries below take 32-bit counts and sizes
    if hint is int and abs(value) >= limit:
        raise ConfigError(f"{key}: {value} is out of range (its size must be below {limit:,})")
    return value


def apply_override(data: dict, assignment: str) -> None:
    """Apply one `dotted.key=value` (value parsed as YAML) to nested dict `data`."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key=value")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {assignment!r}: {key!r} is not a dotted key such as train.steps")
    node = data
    for part in parts[:-1]:
        if node.get(part) is None:  # absent, or an empty section in the file (`train:`)
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {part} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"{key}: {raw!r} is not a valid YAML value: {err}") from err


def check_writable_dir(path: str | Path, key: str) -> None:
    """`path` is a directory this process may write into, or can be made one: before any work,
    so that a bad path is a config error naming `key`, not a traceback at the end."""
    path = Path(path).absolute()
    existing = next(p for p in (path, *path.parents) if os.path.lexists(p))
    if not existing.exists():
        raise ConfigError(f"{key}: {path} cannot be made: {existing} is a broken link")
    if existing == path and not path.is_dir():
        raise ConfigError(f"{key}: {path} exists and is not a directory")
    if not existing.is_dir():
        raise ConfigError(f"{key}: {path} cannot be made: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}: {path} cannot be written: no write permission in {existing}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, except that a key given twice in one mapping is an error (plain YAML keeps the
    last, silently dropping the first: a second `train:` section would drop the first one)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` merges a mapping in; not a key
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):  # the base class names it
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML run config (or the built-in default), apply overrides, validate. An error in a
    value the file gives (not a --set key) names the file too."""
    data: dict = {}
    if path:
        try:
            data = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
        except OSError as err:
            raise ConfigError(f"config file {path}: {err.strerror}") from err
        except UnicodeDecodeError as err:
            raise ConfigError(f"config file {path}: not UTF-8 text ({err.reason} at byte {err.start})") from err
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path}: not valid YAML: {err}") from err
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path}: expected a mapping of sections (task, model, train, ...), got {type(data).__name__}")
    for assignment in overrides:
        apply_override(data, assignment)
    try:
        return from_dict(RunConfig, data).validate()
    except ConfigError as err:
        set_keys = [assignment.split("=", 1)[0].strip() for assignment in overrides]
        if path and not any(str(err).startswith((key + ":", key + ".")) for key in set_keys):
            raise ConfigError(f"config file {path}: {err}") from err
        raise
