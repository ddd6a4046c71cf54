"""Webdataset tar shards: one sample per document, and a manifest that describes every shard.

Layout of a prepared dataset:

    DIR/manifest.json              vocabulary, task, per split: shards with documents, tokens,
                                   sha256 and per-document lengths
    DIR/<split>/shard-00000.tar    samples "<doc index>.tokens" (raw ids, manifest dtype),
                                   "<doc index>.labels" (labelled tasks), "<doc index>.json"

A dataset directory is written whole or not at all (temporary directory, then a rename).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import webdataset as wds
from webdataset import tariterators

from stairscale.data.tasks import Document, Vocab, label_dtype, token_dtype

MANIFEST = "manifest.json"
FORMAT = "stairscale-shards/1"


class DataError(RuntimeError):
    """Bad or missing data; the message names the dataset, shard and sample at fault."""


def write_dataset(
    out_dir: str | Path, vocab: Vocab, labelled: bool, splits: dict[str, list[Document]], shard_docs: int, source: dict
) -> dict:
    """Write every split as shards of at most `shard_docs` documents (0: about 64 shards per
    split), then the manifest."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
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
        per_shard = shard_docs or max(1, -(-len(documents) // 64))
        shards, batch, index = [], [], 0
        for doc in documents:
            _check_document(doc, len(vocab), labelled, f"split {split}, document {index}")
            batch.append((index, doc))
            index += 1
            if len(batch) == per_shard:
                shards.append(_write_shard(tmp, split, len(shards), batch, tokens_dtype, labels_dtype))
                batch = []
        if batch:
            shards.append(_write_shard(tmp, split, len(shards), batch, tokens_dtype, labels_dtype))
        manifest["splits"][split] = {
            "documents": index,
            "tokens": sum(s["tokens"] for s in shards),
            "shards": shards,
        }
    (tmp / MANIFEST).write_text(json.dumps(manifest))
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return manifest


def _check_document(doc: Document, vocab_size: int, labelled: bool, where: str) -> None:
    if len(doc.tokens) == 0:
        raise DataError(f"{where}: empty document")
    if int(doc.tokens.max()) >= vocab_size:
        raise DataError(f"{where}: token id {int(doc.tokens.max())} outside the vocabulary of {vocab_size}")
    if labelled != (doc.labels is not None):
        raise DataError(f"{where}: {'missing' if labelled else 'unexpected'} labels")


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
    return {
        "file": name,
        "first_document": docs[0][0],
        "documents": len(docs),
        "tokens": sum(lengths),
        "sha256": _sha256(root / name),
        "lengths": lengths,
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
        if self.manifest.get("format") != FORMAT:
            raise DataError(f"{manifest_path}: format {self.manifest.get('format')!r} is not {FORMAT}")
        v = self.manifest["vocab"]
        self.vocab = Vocab(tuple(v["tokens"]), v["pad_id"], v["bos_id"])
        self.labelled = self.manifest["labelled"]
        self.token_dtype = np.dtype(self.manifest["token_dtype"])
        self.label_dtype = np.dtype(self.manifest["label_dtype"])
        self.on_bad_sample = on_bad_sample
        self.skipped = 0  # samples skipped under on_bad_sample="skip"
        self._verified: set[Path] = set()

    @property
    def fingerprint(self) -> str:
        """Identifies the data: the hash of all shard checksums."""
        digest = hashlib.sha256()
        for split in sorted(self.manifest["splits"]):
            for shard in self.manifest["splits"][split]["shards"]:
                digest.update(shard["sha256"].encode())
        return digest.hexdigest()[:16]

    def shards(self, split: str) -> list[Shard]:
        if split not in self.manifest["splits"]:
            raise DataError(f"dataset {self.root}: no split {split!r} (has {', '.join(self.manifest['splits'])})")
        return [
            Shard(split, i, self.root / s["file"], s["first_document"], s["documents"], s["tokens"], s["sha256"], s["lengths"])
            for i, s in enumerate(self.manifest["splits"][split]["shards"])
        ]

    def read(self, shard: Shard, start: int = 0) -> Iterator[Document]:
        """The documents of a shard from document `start` on, each checked; errors name shard and sample."""
        self._verify(shard)
        seen = 0
        samples = tariterators.tarfile_samples([{"url": str(shard.path)}])
        try:
            for seen, sample in enumerate(samples, start=1):
                if seen <= start:
                    continue
                doc = self._decode(shard, sample)
                if doc is not None:
                    yield doc
        except DataError:
            raise
        except Exception as err:  # tarfile and webdataset errors: say where
            raise DataError(f"shard {shard.path}: corrupt or truncated tar after sample {seen}: {err}") from err
        if seen != shard.documents:
            raise DataError(f"shard {shard.path}: {seen} samples, but the manifest lists {shard.documents} (truncated?)")

    def _verify(self, shard: Shard) -> None:
        if shard.path in self._verified:
            return
        if not shard.path.is_file():
            raise DataError(f"shard {shard.path} is missing (listed in {self.root / MANIFEST})")
        if _sha256(shard.path) != shard.sha256:
            raise DataError(f"shard {shard.path}: sha256 does not match the manifest (changed or corrupt)")
        self._verified.add(shard.path)

    def _decode(self, shard: Shard, sample: dict) -> Document | None:
        where = f"shard {shard.path}, sample {sample.get('__key__')}"
        try:
            if "tokens" not in sample or (self.labelled and "labels" not in sample):
                raise DataError(f"{where}: missing {'tokens' if 'tokens' not in sample else 'labels'}")
            tokens = np.frombuffer(sample["tokens"], dtype=self.token_dtype)
            labels = np.frombuffer(sample["labels"], dtype=self.label_dtype) if self.labelled else None
            if labels is not None and len(labels) != len(tokens):
                raise DataError(f"{where}: {len(labels)} labels for {len(tokens)} tokens")
            _check_document(Document(tokens, labels), len(self.vocab), self.labelled, where)
            return Document(tokens, labels)
        except DataError as err:
            if self.on_bad_sample != "skip":
                raise
            self.skipped += 1
            print(f"stairscale: skipping bad sample ({self.skipped} so far): {err}", flush=True)
            return None
