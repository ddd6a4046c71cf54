"""`stairscale prepare-data`: the task generators write their splits as shards.

Training, evaluation and benchmarks all read prepared shards through the lane loader; a run with
no `data.dir` prepares its task's dataset once into a cache directory named by the task config (and,
for text, by the corpus as it is now).
"""

from __future__ import annotations

import codecs
import dataclasses
import fcntl
import hashlib
import json
import math
import shlex
import sys
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from stairscale.config import RunConfig, TaskConfig, check_writable_dir
from stairscale.data.shards import MANIFEST, TOKENIZER, Dataset, check_replaceable, write_dataset
from stairscale.data.tasks import AlgorithmicTask, Document, RandomWalkTask, TextTask, Vocab
from stairscale.errors import ConfigError, DataError


def build_task(cfg: TaskConfig) -> RandomWalkTask | AlgorithmicTask | TextTask:
    if cfg.name == "random_walk":
        return RandomWalkTask(positions=cfg.positions, seed=cfg.seed)
    if cfg.name == "algorithmic":
        return AlgorithmicTask(variables=cfg.variables, seed=cfg.seed)
    return TextTask(path=cfg.path or None, format=cfg.format)  # its splits come from path hashes or byte offsets, not a seed


def train_split(cfg: TaskConfig, stage: int) -> str:
    """The split a curriculum stage trains on: random walks of one length per stage."""
    return f"train-{cfg.train_lengths[stage]}" if cfg.name == "random_walk" else "train"


def task_splits(task, cfg: TaskConfig) -> dict[str, Iterable[Document]]:
    if isinstance(task, RandomWalkTask):
        splits = {train_split(cfg, i): _walks(task, cfg, length) for i, length in enumerate(cfg.train_lengths)}
        for split in ("valid", "test"):
            splits[split] = task.documents(split, cfg.eval_docs or 1000, cfg.eval_length)
        return splits
    if isinstance(task, AlgorithmicTask):
        return {split: task.documents(split, None if split == "train" else (cfg.eval_docs or None)) for split in ("train", "valid", "test")}
    return {split: task.documents(split) for split in ("train", "valid", "test")}


def _walks(task: RandomWalkTask, cfg: TaskConfig, length: int) -> Iterator[Document]:
    """Training walks of random lengths up to `length`: lanes then drift out of step, so no
    batch holds only document starts or only late positions."""
    rng = np.random.default_rng([cfg.seed, 0, length])
    shortest = max(2, round(length * (1 - cfg.train_length_spread)))
    for _ in range(cfg.train_docs):
        yield task.document(int(rng.integers(shortest, length + 1)), rng)


TEXT_CUT = 3  # the version of text_pieces' cutting: a new one names new cached datasets


def text_pieces(documents: list[Document], piece_len: int, shards: int, lanes: int, bos_id: int) -> list[Document]:
    """Texts cut into pieces of at most `piece_len` tokens, the start token included, so that they
    deal evenly to the split's `shards`: one text (enwik8, a book) into a multiple of `shards`
    pieces of near-equal lengths, and texts that give fewer pieces than `shards` into exactly
    `shards` (each text into parts in proportion to its length). Every lane of the `lanes` needs
    a piece of text."""
    bodies = [len(doc.tokens) - 1 for doc in documents]  # the tokens after each text's start token
    natural = [math.ceil(body / (piece_len - 1)) for body in bodies]
    if not documents or shards == 1 or (len(documents) > 1 and sum(natural) >= shards):  # (an empty split is refused by the caller)
        return [piece for doc, count in zip(documents, natural) for piece in _cut(doc, count, bos_id)]
    if sum(bodies) < lanes:
        raise DataError(f"the train split has {sum(bodies)} tokens after its start tokens, fewer than train.lanes "
                        f"{lanes}: every lane needs a piece of text; use a larger corpus or fewer lanes")
    wanted = shards * math.ceil(sum(natural) / shards) if len(documents) == 1 else shards
    parts = [1] * len(documents)
    for _ in range(min(wanted, sum(bodies)) - len(documents)):  # one more part to the text with the longest parts
        longest = max(range(len(documents)), key=lambda i: bodies[i] / parts[i])
        parts[longest] += 1
    return [piece for doc, count in zip(documents, parts) for piece in _cut(doc, count, bos_id)]


def _cut(doc: Document, parts: int, bos_id: int) -> list[Document]:
    """A text cut into `parts` contiguous pieces of near-equal lengths, each with its own start token."""
    if parts <= 1:
        return [doc]
    start = np.array([bos_id], dtype=doc.tokens.dtype)
    return [Document(np.concatenate([start, body]), None, doc.source) for body in np.array_split(doc.tokens[1:], parts)]


def shards_per_split(cfg: RunConfig) -> int:
    """How many shards a split gets when data.shard_docs is 0: at least 64, a multiple of
    train.lanes, and at least two a lane. A lane reads whole shards, so with one shard a lane
    every epoch would hold the same batches; with two or more, each epoch deals new combinations."""
    lanes = cfg.train.lanes
    return lanes * max(2, math.ceil(64 / lanes))


def prepare_dataset(cfg: RunConfig, out_dir: str | Path, replace: bool = False) -> dict:
    """Write the task's splits as shards under out_dir (`replace`: in place of an earlier dataset there)."""
    check_replaceable(out_dir, replace)  # before the work, not after
    task = build_task(cfg.task)
    splits = {name: list(docs) for name, docs in task_splits(task, cfg.task).items()}
    vocab, files = task.vocab, {}
    if cfg.task.tokenizer == "bpe":
        vocab, splits, files[TOKENIZER] = bpe_encode(splits, cfg.task.bpe_vocab, cut_by_bytes=task.format != "files")
    if isinstance(task, TextTask):  # cut after tokenizing, so that no piece starts inside a character
        # Only the train split is dealt to lanes: evaluation pieces stay long, whatever the lanes.
        dealt = {"train": (cfg.train.lanes if cfg.data.shard_docs else shards_per_split(cfg), cfg.train.lanes)}  # (shards, lanes)
        splits = {name: text_pieces(docs, cfg.task.piece_len, *dealt.get(name, (1, 1)), vocab.bos_id) for name, docs in splits.items()}
    empty = [name for name, docs in splits.items() if not docs]
    if empty:  # only format "files" can leave a split empty: each non-empty file goes to one split
        raise DataError(f"task.path {task.path}: split {' and '.join(empty)} has no documents: each non-empty file "
                        "goes to train, valid or test by a hash of its name (about 90/5/5%), so this corpus needs more "
                        "files, or to be one file (joined: `cat FILES > corpus.txt`), which is cut by bytes; nothing was written")
    return write_dataset(out_dir, vocab, not isinstance(task, TextTask), splits, cfg.data.shard_docs,
                         shards_per_split(cfg), dataclasses.asdict(cfg.task), files, replace)


def _text(doc: Document, cut_start: bool = False, cut_end: bool = False) -> str:
    """The document as UTF-8 text; invalid bytes are an error. A split cut by bytes from one file
    (enwik8) may cut a character where it meets the next split: at such a cut (`cut_start`,
    `cut_end`) the at most 3 bytes of the cut character are dropped."""
    data = doc.tokens[1:].astype(np.uint8).tobytes()
    start = 0
    while cut_start and start < min(3, len(data)) and data[start] & 0xC0 == 0x80:  # the tail of a cut character
        start += 1
    try:
        return codecs.getincrementaldecoder("utf-8")().decode(data[start:], final=not cut_end)
    except UnicodeDecodeError as err:
        raise DataError(f"{doc.source}: not UTF-8 text at file byte {doc.offset + start + err.start}; the BPE tokenizer "
                        "needs UTF-8 (task.tokenizer=bytes reads any bytes)") from err


def _parts(text: str, part: int = 1 << 20) -> Iterator[str]:
    """A text in parts of about `part` characters, each cut after a newline (the BPE reads and
    encodes parts: all of enwik8 at once would take gigabytes)."""
    start = 0
    while start < len(text):
        stop = text.find("\n", start + part) + 1 or len(text)
        yield text[start:stop]
        start = stop


def bpe_encode(splits: dict[str, list[Document]], vocab_size: int, cut_by_bytes: bool) -> tuple[Vocab, dict[str, list[Document]], bytes]:
    """Train a byte-level BPE on the train split (`tokenizers`) and encode every split with it.
    `<pad>` and `<bos>` in the text are text; a tokenizer loaded from the saved tokenizer.json
    needs `encode_special_tokens = True` to encode them the same way (the file does not keep it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<bos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    cuts = {"train": (False, True), "valid": (True, True), "test": (True, False)} if cut_by_bytes else {}
    texts = {name: [_text(doc, *cuts.get(name, (False, False))) for doc in docs] for name, docs in splits.items()}
    tokenizer.train_from_iterator((part for text in texts["train"] for part in _parts(text)), trainer=trainer)
    tokenizer.encode_special_tokens = True  # "<pad>" in the text is text, not the pad token
    vocab = Vocab(tuple(sorted(tokenizer.get_vocab(), key=tokenizer.token_to_id)), tokenizer.token_to_id("<pad>"), tokenizer.token_to_id("<bos>"))
    encoded = {
        name: [Document(np.array([vocab.bos_id] + [i for part in _parts(text) for i in tokenizer.encode(part).ids], dtype=np.int64))
               for text in split_texts]
        for name, split_texts in texts.items()
    }
    return vocab, encoded, tokenizer.to_str().encode()


def content_hash(cfg: RunConfig) -> str:
    """Names a cached dataset by what decides its shards: the task and the sharding."""
    content = {key: getattr(cfg.task, key) for key in cfg.task.dataset_keys()}
    if cfg.task.name == "text":  # the same config over a changed corpus makes another dataset
        content["source"] = build_task(cfg.task).fingerprint()
        content["lanes"] = cfg.train.lanes  # a split with fewer texts than lanes is cut into one piece per lane
        content["cut"] = TEXT_CUT  # how text_pieces cuts
    if cfg.task.tokenizer == "bpe":  # another version of `tokenizers` may learn another vocabulary
        import tokenizers

        content["tokenizers"] = tokenizers.__version__
    content["sharding"] = cfg.data.shard_docs or f"{shards_per_split(cfg)} shards"
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:12]


def check_prepared_for(root: Path, task: TaskConfig) -> None:
    """data.dir holds a dataset prepared with this task section (its manifest records the one it
    was prepared with): else the run would record one task and be scored on another."""
    source = Dataset(root).manifest["source"]
    wanted = {key: getattr(task, key) for key in task.dataset_keys()}
    differ = [key for key, value in wanted.items() if key in source and source[key] != value]
    if differ:
        what = ", ".join(f"task.{key} {source[key]!r} (the run: {wanted[key]!r})" for key in differ)
        as_prepared = " ".join(f"--set {shlex.quote(f'task.{key}={json.dumps(source[key])}')}" for key in differ)  # JSON is YAML
        raise ConfigError(f"data.dir: {root} was prepared with {what}; set the run's task keys as they were "
                          f"prepared ({as_prepared}), or leave data.dir empty (--set data.dir=) to prepare the task's own dataset")


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def dataset_dir(cfg: RunConfig, log=_to_stderr) -> Path:
    """The run's dataset: `data.dir`, or the task's cached dataset, prepared on first use."""
    if cfg.data.dir:
        root = Path(cfg.data.dir).expanduser()
        check_prepared_for(root, cfg.task)
        return root
    check_writable_dir(Path(cfg.data.cache).expanduser(), "data.cache")
    path = Path(cfg.data.cache).expanduser() / f"{cfg.task.name}-{content_hash(cfg)}"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        try:  # concurrent runs of one task prepare it once
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another process preparing {path}")
            fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path / MANIFEST).is_file():
            log(f"preparing the {cfg.task.name} dataset in {path}")
            try:
                prepare_dataset(cfg, path)
            except DataError:
                if not (path / MANIFEST).is_file():  # unless a process the lock did not stop wrote it meanwhile
                    raise
    return path
