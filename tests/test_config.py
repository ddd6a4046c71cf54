from pathlib import Path

import pytest

from stairscale.config import load_config
from stairscale.errors import ConfigError


def error_for(*overrides, path=None):
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    return str(info.value)


def test_default_is_valid():
    cfg = load_config()
    assert cfg.model.schedule == "staircase" and cfg.task.name == "random_walk"


def test_overrides_are_typed():
    cfg = load_config(None, ["train.steps=7", "train.warmup_steps=2", "model.dropout=0", "train.lr=1e-3", "task.train_lengths=[8]", "task.train_length_steps=[0]"])
    assert cfg.train.steps == 7 and cfg.model.dropout == 0.0 and cfg.train.lr == 0.001 and cfg.task.train_lengths == [8]


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["model.windw=2"], "model.windw"),
        (["trian.steps=2"], "trian"),
        (["train.steps=ten"], "train.steps"),
        (["train.steps=true"], "train.steps"),
        (["train.lr=fast"], "train.lr"),
        (["model.positions=absolute"], "model.positions"),
        (["model.schedule=rnn"], "model.schedule"),
        (["model.window=0"], "model.window"),
        (["model.chunk=12"], "model.chunk"),  # M=64 is not a multiple of F=12
        (["model.attn_lim=8"], "model.attn_lim"),  # shorter than the window n*F = 16
        (["model.schedule=cached", "model.cache_len=16", "model.attn_lim=24", "model.positions=relative"], "model.attn_lim"),
        (["model.schedule=cached"], "model.cache_len"),
        (["model.schedule=transformer_xl"], "model.mem_len"),
        (["model.repeats=3"], "model.repeats"),  # only the ladder repeats the core
        (["model.n_heads=3"], "model.n_heads"),
        (["train.grad_accum=3"], "train.grad_accum"),
        (["train.lr_schedule=linear"], "train.lr_schedule"),
        (["task.name=chess"], "task.name"),
        (["task.tokenizer=bpe"], "task.tokenizer"),  # the random walk has its own vocabulary
        (["task.name=text", "task.tokenizer=wordpiece"], "task.tokenizer"),
        (["task.train_length_steps=[0,5]"], "task.train_length_steps"),  # two starts, one length
        (["task.train_lengths=[64,128]", "task.train_length_steps=[0,0]"], "task.train_length_steps"),
        (["task.train_lengths=[64,128]", "task.train_length_steps=[0,2000]"], "task.train_length_steps"),  # after the last step
        (["task.positions=1"], "task.positions"),
        (["task.name=text", "task.format=xml"], "task.format"),
        (["task.name=text", "task.path=/no/such/corpus"], "task.path"),
        (["task.name=text", "task.format=bytes"], "task.format"),  # one file, but the default corpus is a directory
        (["task.name=text", "task.format=enwik8"], "task.format"),
        (["task.eval_length=1"], "task.eval_length"),
        (["task.name=algorithmic", "task.eval_docs=1001"], "task.eval_docs"),
        (["task.eval_docs=-1"], "task.eval_docs: must be >= 0"),
        (["train.lr=.inf"], "train.lr"),
        (["task.seed=-1"], "task.seed"),
        (["train.seed=-1"], "train.seed"),
        (["train.log_every=0"], "train.log_every"),
        (["train.eval_every=-1"], "train.eval_every"),
        (["train.beta1=1.5"], "train.beta1"),
        (["train.weight_decay=-0.1"], "train.weight_decay"),
        (["train.min_lr_ratio=2"], "train.min_lr_ratio"),
        (["train.steps=100"], "train.warmup_steps"),  # 200 steps of warm-up: the peak is never reached
        (["train.steps=5", "train.warmup_steps=5"], "train.warmup_steps: 5 is not shorter than the run (train.steps=5): the "
         "learning rate would never reach its peak, nor decay; set a shorter one (--set train.warmup_steps=1)"),
        (["train.lr_restarts=true", "task.train_lengths=[64,128,256]", "task.train_length_steps=[0,100,1100]"], "train.warmup_steps"),  # nor a stage of 100
        (["train.keep_best=true", "train.eval_every=0"], "train.keep_best"),  # nothing to choose from
        (["train.keep_best=true", "train.eval_every=2000"], "train.keep_best"),  # validated at the end only
        (["train.steps=[1"], "train.steps"),  # not valid YAML
        (["train.seed=18446744073709551616"], "train.seed: 18446744073709551616 is out of range"),  # torch.manual_seed overflowed
        (["train.threads=4294967296"], "train.threads: 4294967296 is out of range (its size must be below 2,147,483,648)"),
        (["model.attn_lim=4294967296"], "model.attn_lim: 4294967296 is out of range"),
        (["task.name=text", "task.tokenizer=bpe", "task.bpe_vocab=2000000"], "task.bpe_vocab: 2,000,000 is too large"),
        (["parallel.timeout_minutes=1e13"], "parallel.timeout_minutes"),  # a timedelta overflowed
        (["parallel.timeout_minutes=.nan"], "parallel.timeout_minutes"),
    ],
)
def test_bad_values_name_the_key(overrides, key):
    assert error_for(*overrides).startswith(key)


def test_cache_must_fit_in_the_span_with_either_positions():
    for positions in ("relative", "rope"):
        cached = ["model.schedule=global_cached", "model.cache_len=64", f"model.positions={positions}"]
        assert error_for(*cached, "model.attn_lim=79").startswith("model.attn_lim")
        load_config(None, [*cached, "model.attn_lim=80"])


def test_set_needs_a_dotted_key():
    assert "--set" in error_for("=3") and "--set" in error_for("train.=3") and "--set" in error_for("steps")


def test_bad_file(tmp_path):
    missing = tmp_path / "missing.yaml"
    assert str(missing) in error_for(path=missing)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2")
    assert str(bad) in error_for(path=bad)
    listed = tmp_path / "listed.yaml"
    listed.write_text("[1, 2]")
    assert str(listed) in error_for(path=listed) and str(listed) in error_for("train.steps=1", path=listed)
    empty_section = tmp_path / "empty_section.yaml"
    empty_section.write_text("train:\n")  # an empty section reads as null; --set still fills it
    assert load_config(empty_section, ["train.steps=7", "train.warmup_steps=0"]).train.steps == 7
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("model:\n  d_model: 64\n  layers: 2\n")
    assert error_for(path=wrong).startswith(f"config file {wrong}: model.layers: unknown key")  # the file's key: the file is named
    assert error_for("model.layers=2").startswith("model.layers: unknown key")  # a --set key names itself
    assert error_for("train.steps=-1", path=empty_section).startswith("train.steps: must be >= 1")
    twice = tmp_path / "twice.yaml"
    twice.write_text("train:\n  steps: 20\nmodel:\n  d_model: 32\ntrain:\n  log_every: 10\n")  # the first train: would be dropped
    assert f"config file {twice}: not valid YAML" in error_for(path=twice) and "key 'train' appears twice" in error_for(path=twice)
    merged = tmp_path / "merged.yaml"
    merged.write_text("model:\n  <<: {d_model: 32, n_heads: 2}\n  d_ff: 64\n")  # a merge key is not a repeated key
    assert load_config(merged).model.d_model == 32
    assert load_config(None, ["run_dir=~/runs/x"]).run_dir == str(Path.home() / "runs/x")


def test_shipped_configs_load_and_the_default_is_written_out():
    configs = Path(__file__).parent.parent / "configs"
    for path in configs.glob("*.yaml"):
        load_config(path)
    assert load_config(configs / "random_walk_staircase.yaml").to_dict() == load_config().to_dict()
