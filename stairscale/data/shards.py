"""Webdataset tar shards: one sample per document, and a manifest that describes every shard.

Layout of a prepared dataset:

    DIR/manifest.json              vocabulary, task, per split: shards with documents, tokens,
                                   sha256 and per-document lengths
    DIR/<split>/shard-00000.tar    samples "<doc index>.tokens" (raw ids, manifest dtype),
                                   "<doc index>.labels" (labelled tasks), "<doc index>.json"

A dataset directory is written whole or not at all (temporary directory, then a rename).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import signal
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import webdataset as wds

from stairscale.data.tasks import IGNORE, Document, Vocab, label_dtype, token_dtype
from stairscale.errors import DataError
from stairscale.files import sync

MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"  # text with a trained tokenizer (task.tokenizer=bpe)
FORMAT = "stairscale-shards/1"
SKIPPED = -1  # the document id of a bad sample skipped under on_bad_sample="skip"


def write_dataset(
    out_dir: str | Path, vocab: Vocab, labelled: bool, splits: dict[str, list[Document]], shard_docs: int, shards: int,
    source: dict, files: dict[str, bytes] | None = None, replace: bool = False,
) -> dict:
    """Write every split as shards of `shard_docs` documents (0: as `shards` shards of nearly
    equal document counts), any extra `files` (such as tokenizer.json), then the manifest.
    `replace`: an earlier dataset in out_dir may be replaced."""
    out_dir = Path(out_dir)
    check_replaceable(out_dir, replace)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Named before it exists and made only once SIGTERM unwinds: however the writing is stopped,
    # the directory is removed or was never made.
    tmp = out_dir.parent / f".{out_dir.name}.writing-{secrets.token_hex(6)}"
    with _terminate_unwinds():
        try:
            try:
                tmp.mkdir()
                manifest = _write_splits(tmp, vocab, labelled, splits, shard_docs, shards, source, files)
                for path in [*tmp.rglob("*"), tmp]:  # on disk before it is put in place
                    sync(path)
            except OSError as err:  # a full disk, say
                raise DataError(f"dataset {out_dir} could not be written ({err}); nothing was put in place") from err
            _put_in_place(tmp, out_dir)
        finally:  # (once in place there is nothing left to remove)
            shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _put_in_place(tmp: Path, out_dir: Path) -> None:
    old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-")) if out_dir.exists() else None
    try:
        if old:  # an earlier dataset: swap the new one in, then delete the old one
            os.replace(out_dir, old / "dataset")
        os.replace(tmp, out_dir)
    except OSError as err:  # another writer got there first (a lock that does not hold across nodes)
        kept = ""
        if old and (old / "dataset").exists():
            kept = f"; the earlier dataset is in {old / 'dataset'}"
        elif old:
            shutil.rmtree(old, ignore_errors=True)
        raise DataError(f"dataset {out_dir} could not be put in place, another process may have written it at the same "
                        f"time: {err}{kept}") from err
    sync(out_dir.parent)
    if old:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _terminate_unwinds():
    """While shards are written, SIGTERM (`kill`, a scheduler's stop) unwinds like Ctrl-C, so the
    temporary directory is removed; the exit status stays 128 + SIGTERM."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread handles signals
        yield
        return

    def unwind(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, unwind)
    try:
        yield
    finally:  # (None: a handler set outside Python, which cannot be put back; the default then)
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def check_replaceable(out_dir: Path, replace: bool) -> None:
    """Only an empty directory, or with `replace` an earlier dataset that holds nothing but its
    own files, may be replaced: never the user's files."""
    out_dir = Path(out_dir)
    if not out_dir.exists() or (out_dir.is_dir() and not any(out_dir.iterdir())):
        return
    refuse = "nothing was written: choose an empty or new directory"
    if not (out_dir / MANIFEST).is_file():
        raise DataError(f"{out_dir} exists and is not a stairscale dataset (no {MANIFEST}); {refuse}")
    try:
        dataset = Dataset(out_dir)
        files = [shard.path.relative_to(out_dir) for split in dataset.splits for shard in dataset.shards(split)]
    except DataError as err:
        raise DataError(f"{out_dir} holds no dataset that can be read ({err}); {refuse}") from None
    own = {Path(MANIFEST), Path(TOKENIZER), *files, *(folder for file in files for folder in file.parents)}
    other = sorted(str(path.relative_to(out_dir)) for path in out_dir.rglob("*") if path.relative_to(out_dir) not in own)
    if other:
        raise DataError(f"{out_dir} holds a dataset and files that are not its own ({', '.join(other[:3])}"
                        f"{', ...' if len(other) > 3 else ''}); {refuse}")
    if not replace:
        raise DataError(f"{out_dir} holds a dataset; nothing was written: choose a new directory, or replace it "
                        "(prepare-data --replace; a run reading it would then fail)")


def _write_splits(tmp: Path, vocab: Vocab, labelled: bool, splits: dict[str, list[Document]], shard_docs: int, shards: int,
                  source: dict, files: dict[str, bytes] | None) -> dict:
    tokens_dtype, labels_dtype = token_dtype(len(vocab)), label_dtype(len(vocab))
    manifest = {
        "format": FORMAT,
        "source": source,
        "vocab": {"tokens": list(vocab.tokens), "pad_id": vocab.pad_id, "bos_id": vocab.bos_id},
        "labelled": labelled,
        "token_dtype": tokens_dtype.name,
        "label_dtype": labels_dtype.name,
        "splits": {},
    }
    for split, documents in splits.items():
        (tmp / split).mkdir()
        for index, doc in enumerate(documents):
            _check_document(doc, len(vocab), labelled, f"split {split}, document {index}")
        written = []
        for first, stop in shard_bounds(len(documents), shard_docs, shards):
            batch = [(index, documents[index]) for index in range(first, stop)]
            written.append(_write_shard(tmp, split, len(written), batch, tokens_dtype, labels_dtype))
        manifest["splits"][split] = {
            "documents": len(documents),
            "tokens": sum(s["tokens"] for s in written),
            "shards": written,
        }
    for name, content in (files or {}).items():
        (tmp / name).write_bytes(content)
    (tmp / MANIFEST).write_text(json.dumps(manifest))
    return manifest


def shard_bounds(documents: int, shard_docs: int, shards: int) -> list[tuple[int, int]]:
    """[first, stop) document ranges: `shard_docs` each, or (0) `shards` nearly equal ones."""
    if shard_docs:
        cuts = list(range(0, documents, shard_docs)) + [documents]
    else:
        cuts = np.linspace(0, documents, min(shards, documents) + 1).round().astype(int).tolist()
    return list(zip(cuts[:-1], cuts[1:]))


def _check_document(doc: Document, vocab_size: int, labelled: bool, where: str) -> None:
    if len(doc.tokens) == 0:
        raise DataError(f"{where}: empty document")
    for name, ids in (("token", doc.tokens), ("label", doc.labels)):
        if ids is None:
            continue
        bad = _outside(ids, vocab_size, ignore_label_ok=name == "label")
        if bad.any():
            raise DataError(f"{where}: {name} id {int(ids[bad][0])} outside the vocabulary of {vocab_size}")
    if labelled != (doc.labels is not None):
        raise DataError(f"{where}: {'missing' if labelled else 'unexpected'} labels")
    if labelled and len(doc.labels) != len(doc.tokens):
        raise DataError(f"{where}: {len(doc.labels)} labels for {len(doc.tokens)} tokens")


def _write_shard(root: Path, split: str, number: int, docs: list, tokens_dtype, labels_dtype) -> dict:
    name = f"{split}/shard-{number:05d}.tar"
    with wds.TarWriter(str(root / name), encoder=False, mtime=0) as sink:
        for index, doc in docs:
            sample = {
                "__key__": f"{index:09d}",
                "tokens": doc.tokens.astype(tokens_dtype).tobytes(),
                "json": json.dumps({"document": index, "length": len(doc.tokens)}).encode(),
            }
            if doc.labels is not None:
                sample["labels"] = doc.labels.astype(labels_dtype).tobytes()
            sink.write(sample)
    lengths = [len(doc.tokens) for _, doc in docs]
    data = (root / name).read_bytes()
    offsets = [members for _, members in _sample_offsets(data, root / name)]
    return {
        "file": name,
        "first_document": docs[0][0],
        "documents": len(docs),
        "tokens": sum(lengths),
        "sha256": hashlib.sha256(data).hexdigest(),
        "lengths": lengths,
        # Where each sample's payloads start, so a reader can gather a shard in one pass.
        "tokens_at": [m["tokens"][0] for m in offsets],
        "labels_at": [m["labels"][0] for m in offsets] if docs[0][1].labels is not None else None,
    }


@dataclass
class Shard:
    split: str
    number: int
    path: Path
    first_document: int
    documents: int
    tokens: int
    sha256: str
    lengths: list[int]
    tokens_at: list[int] | None  # payload offsets of each sample's tokens (None in older manifests)
    labels_at: list[int] | None


class Dataset:
    """A prepared dataset: its manifest, and validated reading of its shards."""

    def __init__(self, root: str | Path, on_bad_sample: str = "error"):
        self.root = Path(root)
        manifest_path = self.root / MANIFEST
        if not manifest_path.is_file():
            raise DataError(f"dataset {self.root}: no {MANIFEST} (run `stairscale prepare-data` first)")
        try:
            self.manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as err:
            raise DataError(f"{manifest_path}: not valid JSON: {err}") from err
        if not isinstance(self.manifest, dict) or self.manifest.get("format") != FORMAT:
            found = self.manifest.get("format") if isinstance(self.manifest, dict) else type(self.manifest).__name__
            raise DataError(f"{manifest_path}: format {found!r} is not {FORMAT}")
        with _manifest_entry(manifest_path):
            v = self.manifest["vocab"]
            self.vocab = Vocab(tuple(v["tokens"]), v["pad_id"], v["bos_id"])
            self.labelled = self.manifest["labelled"]
            source = self.manifest["source"]
            self.byte_level = source.get("tokenizer", "bytes") == "bytes"
            self.token_dtype = np.dtype(self.manifest["token_dtype"])
            self.label_dtype = np.dtype(self.manifest["label_dtype"])
            self.splits = self.manifest["splits"]
            if not isinstance(self.splits, dict):
                raise DataError(f"{manifest_path}: splits is a {type(self.splits).__name__}, not an object of splits")
            for name, value in (("vocab.pad_id", self.vocab.pad_id), ("vocab.bos_id", self.vocab.bos_id)):
                if not isinstance(value, int) or not 0 <= value < len(self.vocab):
                    raise DataError(f"{manifest_path}: {name} {value!r} is not an id of the vocabulary of {len(self.vocab)}")
            if self.labelled is not (source.get("name") != "text"):  # the text task predicts tokens; the others, labels
                raise DataError(f"{manifest_path}: labelled {self.labelled!r} does not fit the task {source.get('name')!r}")
        self.on_bad_sample = on_bad_sample
        self.skipped: set[str] = set()  # the bad samples this reader skipped (on_bad_sample="skip")

    @property
    def fingerprint(self) -> str:
        """Identifies the data: the hash of all shard checksums."""
        digest = hashlib.sha256()
        with _manifest_entry(self.root / MANIFEST):
            for split in sorted(self.splits):
                for shard in self.splits[split]["shards"]:
                    digest.update(shard["sha256"].encode())
        return digest.hexdigest()[:16]

    def shards(self, split: str) -> list[Shard]:
        if split not in self.splits:
            raise DataError(f"dataset {self.root}: no split {split!r} (has {', '.join(self.splits)})")
        shards, documents = [], 0
        with _manifest_entry(self.root / MANIFEST, f"split {split}"):
            for i, s in enumerate(self.splits[split]["shards"]):
                with _manifest_entry(self.root / MANIFEST, f"split {split}, shard {i}"):
                    shard = Shard(split, i, self.root / s["file"], s["first_document"], s["documents"], s["tokens"],
                                  s["sha256"], s["lengths"], s.get("tokens_at"), s.get("labels_at"))
                    _check_entry(shard, f"{self.root / MANIFEST}: split {split}, shard {i}")
                    if shard.first_document != documents:  # shards hold the split's documents in order, none left out
                        raise DataError(f"{self.root / MANIFEST}: split {split}, shard {i}: first_document {shard.first_document}, "
                                        f"but the shards before it hold {documents} documents")
                    documents += shard.documents
                    shards.append(shard)
            listed = self.splits[split]["documents"]
        if documents != listed:
            raise DataError(f"{self.root / MANIFEST}: split {split} lists {listed} documents, its shards {documents}")
        return shards

    def read_shard(self, shard: Shard) -> ShardDocuments:
        """All documents of a shard, checked against the manifest; errors name shard and sample."""
        data = self._load(shard)
        return self._read_fast(shard, data) or self._read_each(shard, data)

    def _read_fast(self, shard: Shard, data: bytes) -> ShardDocuments | None:
        """Gather every document at the manifest's offsets; None if anything looks off, so the
        sample-by-sample reader can find and name the problem."""
        if shard.tokens_at is None or (self.labelled and shard.labels_at is None):
            return None
        end = self._payload_end(shard)
        if data[end : end + _BLOCK] != _ZEROS:
            return None
        if not data.startswith(f"{shard.first_document:09d}.".encode()):  # the tar's first sample is the manifest's first
            return None
        lengths = np.asarray(shard.lengths, dtype=np.int64)
        keys = [f"{shard.first_document + i:09d}" for i in range(shard.documents)]
        tokens = _gather(data, shard.tokens_at, lengths, self.token_dtype, keys, "tokens")
        labels = _gather(data, shard.labels_at, lengths, self.label_dtype, keys, "labels") if self.labelled else None
        if tokens is None or (self.labelled and labels is None) or (lengths == 0).any():
            return None
        if not _in_vocab(tokens, len(self.vocab)) or (labels is not None and not _in_vocab(labels[labels != IGNORE], len(self.vocab))):
            return None
        return ShardDocuments(  # in the manifest's compact dtypes: a lane holds its whole shard
            tokens=tokens,
            labels=labels,
            lengths=lengths,
            ids=shard.first_document + np.arange(len(lengths)),
        )

    def _payload_end(self, shard: Shard) -> int:
        # Tokens are each sample's last member (TarWriter writes them in name order), so the
        # end-of-archive marker follows the last sample's tokens unless another sample does.
        return shard.tokens_at[-1] + _padded(shard.lengths[-1] * self.token_dtype.itemsize)

    def truncated(self, shard: Shard) -> bool:
        """The file ends before the manifest's last sample and the end-of-archive marker: a check
        of its size only (its sha256 is checked when it is read)."""
        return shard.tokens_at is not None and shard.path.stat().st_size < self._payload_end(shard) + 2 * _BLOCK

    def _read_each(self, shard: Shard, data: bytes) -> ShardDocuments:
        samples = list(_samples(data, shard.path))
        if len(samples) != shard.documents:
            raise DataError(f"shard {shard.path}: {len(samples)} samples, but the manifest lists {shard.documents}")
        for i, (key, _) in enumerate(samples):
            if key != f"{shard.first_document + i:09d}":
                raise DataError(f"shard {shard.path}: sample {i} is {key!r}, but the manifest lists document "
                                f"{shard.first_document + i} there")
        docs = [self._checked(shard, key, members, n) for (key, members), n in zip(samples, shard.lengths)]
        # Under on_bad_sample="skip" a bad sample keeps its place, as padding of the manifest's length
        # (id SKIPPED), so that the lane plan, made from those lengths, still holds.
        ids = np.array([SKIPPED if doc is None else shard.first_document + i for i, doc in enumerate(docs)], dtype=np.int64)
        tokens = [np.full(n, self.vocab.pad_id) if doc is None else doc.tokens for doc, n in zip(docs, shard.lengths)]
        labels = [np.full(n, IGNORE) if doc is None else doc.labels for doc, n in zip(docs, shard.lengths)] if self.labelled else []
        return ShardDocuments(
            tokens=np.concatenate(tokens).astype(np.int64) if tokens else np.zeros(0, dtype=np.int64),
            labels=np.concatenate(labels).astype(np.int64) if labels else None,
            lengths=np.array([len(t) for t in tokens], dtype=np.int64),
            ids=ids,
        )

    def content_digest(self, split: str) -> str:
        """Identifies a split's documents, however they are sharded (reads the split once, every
        shard checked against its sha256)."""
        digest = hashlib.sha256()
        for shard in self.shards(split):
            docs = self.read_shard(shard)
            for part in (docs.lengths, docs.tokens, docs.labels):
                if part is not None:
                    digest.update(np.asarray(part, dtype=np.int64).tobytes())
        return digest.hexdigest()[:16]

    def documents(self, split: str) -> Iterator[Document]:
        """Every document of a split, in order (for tools and tests; training reads read_shard)."""
        for shard in self.shards(split):
            docs = self.read_shard(shard)
            for start, length, doc_id in zip(np.cumsum(docs.lengths) - docs.lengths, docs.lengths, docs.ids):
                if doc_id == SKIPPED:
                    continue
                labels = None if docs.labels is None else docs.labels[start : start + length]
                yield Document(docs.tokens[start : start + length], labels)

    def _load(self, shard: Shard) -> bytes:
        try:
            data = shard.path.read_bytes()
        except FileNotFoundError:
            raise DataError(f"shard {shard.path} is missing (listed in {self.root / MANIFEST})") from None
        except OSError as err:  # permissions, an I/O error, a directory in its place
            raise DataError(f"shard {shard.path}: cannot read it: {err.strerror or err}") from None
        if hashlib.sha256(data).hexdigest() != shard.sha256:
            raise DataError(f"shard {shard.path}: sha256 does not match the manifest (changed or corrupt)")
        return data

    def _checked(self, shard: Shard, key: str, members: dict[str, memoryview], length: int) -> Document | None:
        """One sample as a Document; raise, or under on_bad_sample="skip" report it and return None."""
        where = f"shard {shard.path}, sample {key}"
        try:
            tokens = _payload(members, "tokens", self.token_dtype, where)
            labels = _payload(members, "labels", self.label_dtype, where) if self.labelled else None
            if labels is not None and len(labels) != len(tokens):
                raise DataError(f"{where}: {len(labels)} labels for {len(tokens)} tokens")
            _check_document(Document(tokens, labels), len(self.vocab), self.labelled, where)
            if len(tokens) != length:  # the lane plan is made from the manifest's lengths
                raise DataError(f"{where}: {len(tokens)} tokens, but the manifest lists {length}")
            return Document(tokens, labels)
        except DataError as err:
            if self.on_bad_sample != "skip":
                raise
            if where not in self.skipped:  # each epoch reads the shard again: report a sample once
                self.skipped.add(where)
                print(f"stairscale: skipping bad sample ({len(self.skipped)} in this process so far): {err}", file=sys.stderr, flush=True)
            return None


def _payload(members: dict[str, memoryview], field: str, dtype: np.dtype, where: str) -> np.ndarray:
    if field not in members:
        raise DataError(f"{where}: missing {field}")
    payload = members[field]
    if len(payload) % dtype.itemsize:
        raise DataError(f"{where}: {field} payload of {len(payload)} bytes is not a whole number of {dtype} values")
    return np.frombuffer(payload, dtype=dtype)


def _in_vocab(ids: np.ndarray, vocab_size: int) -> bool:
    return not len(ids) or (int(ids.min()) >= 0 and int(ids.max()) < vocab_size)


def _outside(ids: np.ndarray, vocab_size: int, ignore_label_ok: bool) -> np.ndarray:
    """Where ids are outside the vocabulary (labels may also be IGNORE)."""
    ids = ids.astype(np.int64)
    bad = (ids < 0) | (ids >= vocab_size)
    return bad & (ids != IGNORE) if ignore_label_ok else bad


def _check_entry(shard: Shard, where: str) -> None:
    """A shard's manifest entry agrees with itself (an edited manifest could else drop documents)."""
    for key, value in {"first_document": shard.first_document, "documents": shard.documents, "tokens": shard.tokens}.items():
        if not _whole(value):
            raise DataError(f"{where}: {key} {value!r} is not a whole number")
    if shard.documents < 1:
        raise DataError(f"{where}: no documents (a shard holds at least one)")
    listed = {"lengths": shard.lengths, "tokens_at": shard.tokens_at, "labels_at": shard.labels_at}
    for key, values in listed.items():
        if values is not None and not (isinstance(values, list) and all(map(_whole, values))):
            raise DataError(f"{where}: {key} is not a list of whole numbers")
        if values is not None and len(values) != shard.documents:
            raise DataError(f"{where}: {len(values)} {key} for {shard.documents} documents")
    if sum(shard.lengths) != shard.tokens:
        raise DataError(f"{where}: lengths sum to {sum(shard.lengths)} tokens, but tokens is {shard.tokens}")


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@contextlib.contextmanager
def _manifest_entry(path: Path, where: str = ""):
    """Turn a missing manifest field into an error naming the manifest and the entry."""
    try:
        yield
    except (KeyError, TypeError, AttributeError, ValueError) as err:
        raise DataError(f"{path}: {where + ': ' if where else ''}missing or malformed field {err}") from None


@dataclass
class ShardDocuments:
    tokens: np.ndarray  # all documents' tokens, one after another (an integer dtype, often compact)
    labels: np.ndarray | None  # the same for aligned labels; None for language modelling
    lengths: np.ndarray  # tokens per document
    ids: np.ndarray  # document index in the split


_BLOCK = 512
_ZEROS = bytes(_BLOCK)


def _samples(data: bytes, path: Path) -> Iterator[tuple[str, dict[str, memoryview]]]:
    """Webdataset samples of an in-memory tar: members grouped by key (the name up to the first dot)."""
    view = memoryview(data)
    for key, members in _sample_offsets(data, path):
        yield key, {field: view[start : start + size] for field, (start, size) in members.items()}


def _sample_offsets(data: bytes, path: Path) -> Iterator[tuple[str, dict[str, tuple[int, int]]]]:
    """Like _samples, with each member as (payload offset, payload size) in the tar."""
    key, members = None, {}
    for name, start, size in _tar_members(data, path):
        base, _, field = name.partition(".")
        if base != key:
            if key is not None:
                yield key, members
            key, members = base, {}
        members[field] = (start, size)
    if key is not None:
        yield key, members


def _tar_members(data: bytes, path: Path) -> Iterator[tuple[str, int, int]]:
    """(name, payload offset, payload size) of the regular files of a POSIX tar held in memory.

    A small reader of our own: Python's tarfile spends ~60 us per member, too slow to feed lanes
    of short documents. Integrity comes from the shard's sha256, checked before this runs; the
    structure is still checked here. Webdataset reads the same shards (tests check both agree)."""
    pos, count = 0, 0
    while True:
        header = data[pos : pos + _BLOCK]
        if len(header) < _BLOCK:
            raise DataError(f"shard {path}: truncated tar after {count} members (no end-of-archive marker)")
        if header == _ZEROS:
            return
        try:
            size = int(header[124:136].strip(b"\0 ") or b"0", 8)
        except ValueError:
            raise DataError(f"shard {path}: corrupt tar header after {count} members") from None
        start = pos + _BLOCK
        if start + size > len(data):
            raise DataError(f"shard {path}: truncated tar inside member {count + 1}")
        if header[156:157] in (b"0", b"\0"):
            try:
                name = header[:100].split(b"\0", 1)[0].decode()
                prefix = header[345:500].split(b"\0", 1)[0].decode() if header[257:262] == b"ustar" else ""
            except UnicodeDecodeError:
                raise DataError(f"shard {path}: corrupt member name after {count} members") from None
            yield (f"{prefix}/{name}" if prefix else name), start, size
        count += 1
        pos = start + _padded(size)


def _padded(size: int) -> int:
    """A tar member's payload size rounded up to whole blocks."""
    return -(-size // _BLOCK) * _BLOCK


def _gather(data: bytes, offsets: list[int], lengths: np.ndarray, dtype: np.dtype, keys: list[str], field: str) -> np.ndarray | None:
    """All payloads at the manifest's offsets, as one flat array (no per-member parsing); None
    unless every payload's tar header names the sample's `field` member and announces exactly
    the size the manifest expects."""
    buf = np.frombuffer(data, dtype=np.uint8)
    starts = np.asarray(offsets, dtype=np.int64)
    nbytes = lengths * dtype.itemsize
    if len(starts) != len(lengths) or (starts < _BLOCK).any() or (starts + nbytes > len(buf)).any():
        return None
    names = np.frombuffer("".join(f"{key}.{field}\0" for key in keys).encode(), dtype=np.uint8).reshape(len(keys), -1)
    if not np.array_equal(buf[(starts - _BLOCK)[:, None] + np.arange(names.shape[1])], names):
        return None
    digits = buf[(starts - _BLOCK + 124)[:, None] + np.arange(11)].astype(np.int64) - ord("0")
    if ((digits < 0) | (digits > 7)).any() or ((digits * 8 ** np.arange(10, -1, -1)).sum(1) != nbytes).any():
        return None
    return np.concatenate([buf[a : a + n] for a, n in zip(starts.tolist(), nbytes.tolist())]).view(dtype)
