"""`stairscale prepare-data`: the task generators write their splits as shards.

Training, evaluation and benchmarks all read prepared shards through the lane loader; a run with
no `data.dir` prepares its task's dataset once into a cache directory named by the task config (and,
for text, by the corpus as it is now).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import sys
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from stairscale.config import RunConfig, TaskConfig
from stairscale.data.shards import MANIFEST, write_dataset
from stairscale.data.tasks import AlgorithmicTask, Document, RandomWalkTask, TextTask, Vocab

# Task config keys that do not change the documents.
_NOT_CONTENT = ("train_length_steps",)


def build_task(cfg: TaskConfig) -> RandomWalkTask | AlgorithmicTask | TextTask:
    if cfg.name == "random_walk":
        return RandomWalkTask(positions=cfg.positions, seed=cfg.seed)
    if cfg.name == "algorithmic":
        return AlgorithmicTask(variables=cfg.variables, seed=cfg.seed)
    return TextTask(path=cfg.path or None, format=cfg.format, seed=cfg.seed)


def train_split(cfg: TaskConfig, stage: int) -> str:
    """The split a curriculum stage trains on: random walks of one length per stage."""
    return f"train-{cfg.train_lengths[stage]}" if cfg.name == "random_walk" else "train"


def task_splits(cfg: TaskConfig) -> dict[str, Iterable[Document]]:
    task = build_task(cfg)
    if isinstance(task, RandomWalkTask):
        splits = {train_split(cfg, i): _walks(task, cfg, length) for i, length in enumerate(cfg.train_lengths)}
        for split in ("valid", "test"):
            splits[split] = task.documents(split, cfg.eval_docs or 1000, cfg.eval_length)
        return splits
    if isinstance(task, AlgorithmicTask):
        return {split: task.documents(split, None if split == "train" else (cfg.eval_docs or None)) for split in ("train", "valid", "test")}
    return {split: _pieces(task.documents(split), cfg.piece_len, task.vocab.bos_id) for split in ("train", "valid", "test")}


def _walks(task: RandomWalkTask, cfg: TaskConfig, length: int) -> Iterator[Document]:
    """Training walks of random lengths up to `length`: lanes then drift out of step, so no
    batch holds only document starts or only late positions."""
    rng = np.random.default_rng([cfg.seed, 0, length])
    shortest = max(2, round(length * (1 - cfg.train_length_spread)))
    for _ in range(cfg.train_docs):
        yield task.document(int(rng.integers(shortest, length + 1)), rng)


def _pieces(documents: list[Document], piece_len: int, bos_id: int) -> Iterator[Document]:
    """Cut long texts (enwik8 is one) into contiguous pieces, each with its own start token."""
    for doc in documents:
        body = doc.tokens[1:]
        if len(body) <= piece_len:
            yield doc
            continue
        for start in range(0, len(body), piece_len):
            yield Document(np.concatenate([np.array([bos_id], dtype=body.dtype), body[start : start + piece_len]]))


def prepare_dataset(cfg: TaskConfig, out_dir: str | Path, shard_docs: int = 0) -> dict:
    """Write the task's splits as shards under out_dir (about 64 shards per split by default)."""
    task = build_task(cfg)
    splits = {name: list(docs) for name, docs in task_splits(cfg).items()}
    vocab, files = task.vocab, {}
    if cfg.tokenizer == "bpe":
        vocab, splits, files["tokenizer.json"] = bpe_encode(splits, cfg.bpe_vocab)
    return write_dataset(out_dir, vocab, not isinstance(task, TextTask), splits, shard_docs, dataclasses.asdict(cfg), files)


def _text(doc: Document) -> str:
    return doc.tokens[1:].astype(np.uint8).tobytes().decode("utf-8", errors="replace")


def bpe_encode(splits: dict[str, list[Document]], vocab_size: int) -> tuple[Vocab, dict[str, list[Document]], bytes]:
    """Train a byte-level BPE on the train split (`tokenizers`) and encode every split with it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<bos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator((_text(doc) for doc in splits["train"]), trainer=trainer)
    vocab = Vocab(tuple(sorted(tokenizer.get_vocab(), key=tokenizer.token_to_id)), tokenizer.token_to_id("<pad>"), tokenizer.token_to_id("<bos>"))
    encoded = {
        name: [Document(np.array([vocab.bos_id] + tokenizer.encode(_text(doc)).ids, dtype=np.int64)) for doc in docs]
        for name, docs in splits.items()
    }
    return vocab, encoded, tokenizer.to_str().encode()


def content_hash(cfg: TaskConfig) -> str:
    content = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_CONTENT}
    if cfg.name == "text":  # the same config over a changed corpus makes another dataset
        content["source"] = build_task(cfg).fingerprint()
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:12]


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def dataset_dir(cfg: RunConfig, log=_to_stderr) -> Path:
    """The run's dataset: `data.dir`, or the task's cached dataset, prepared on first use."""
    if cfg.data.dir:
        return Path(cfg.data.dir)
    path = Path(cfg.data.cache).expanduser() / f"{cfg.task.name}-{content_hash(cfg.task)}"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent runs of one task prepare it once
        if not (path / MANIFEST).is_file():
            log(f"preparing the {cfg.task.name} dataset in {path}")
            prepare_dataset(cfg.task, path, cfg.data.shard_docs)
    return path
