"""Tasks: turn a task definition into documents (token ids plus aligned labels).

Three tasks, as described in docs/staircase.md ("Documents, lanes, labels" and
"The paper's tasks and headline results"):

* :class:`RandomWalkTask` -- state tracking on a ring (ours).
* :class:`AlgorithmicTask` -- code execution: predict the value each ``print`` shows.
* :class:`TextTask` -- byte-level language modelling (a tree of text files, or enwik8).

Every document starts with the vocabulary's document-start token (``bos_id``).
Labelled tasks give *aligned* labels: ``labels[t]`` is the target of the prediction made
after reading ``tokens[0..t]``, and :data:`IGNORE` where there is nothing to predict.
Language modelling documents have ``labels=None`` (targets are the next tokens).

Randomness: every split draws from its own ``np.random.Generator`` seeded with
``np.random.SeedSequence([seed, split_index])`` (train 0, valid 1, test 2), so documents are
deterministic in ``(seed, split)`` and the splits use disjoint streams. The random walk's
prepared training splits are the exception: ``prepare._walks`` draws walks of random lengths
from ``default_rng([seed, 0, length])``, one stream per curriculum length.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import json
import os
import sys
import sysconfig
import zlib
from dataclasses import dataclass

import numpy as np

from stairscale.config import ALGORITHMIC_EVAL_PROGRAMS, TEXT_FORMATS
from stairscale.errors import DataError

IGNORE = -100
"""Label value meaning "no loss here"."""

SPLITS = ("train", "valid", "test")


# ----------------------------------------------------------------------------- shared pieces

@dataclass(frozen=True)
class Vocab:
    """Token strings (index = id) plus the ids of the padding and document-start tokens."""

    tokens: tuple[str, ...]
    pad_id: int
    bos_id: int

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def digest(self) -> str:
        """Identifies the vocabulary: weights trained with one read other ids as other tokens."""
        return hashlib.sha256(json.dumps([self.tokens, self.pad_id, self.bos_id]).encode()).hexdigest()[:16]

    def decode(self, ids) -> list[str]:
        return [self.tokens[int(i)] for i in ids]


@dataclass
class Document:
    """One document: token ids (starting with BOS) and aligned labels (None for language modelling)."""

    tokens: np.ndarray
    labels: np.ndarray | None = None
    source: str = ""  # where it comes from, for errors (text corpora)
    offset: int = 0  # where its first token's byte is in that file (text cut by bytes)

    def __len__(self) -> int:
        return len(self.tokens)


def token_dtype(vocab_size: int) -> np.dtype:
    """The most compact unsigned dtype that holds every id of a vocabulary of this size."""
    if vocab_size <= 1 << 8:
        return np.dtype(np.uint8)
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    return np.dtype(np.uint32)


def label_dtype(vocab_size: int) -> np.dtype:
    """int16 when every id (and IGNORE) fits, else int32."""
    return np.dtype(np.int16) if vocab_size <= np.iinfo(np.int16).max else np.dtype(np.int32)


def split_index(split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got split={split!r}")
    return SPLITS.index(split)


def split_rng(seed: int, split: str) -> np.random.Generator:
    """The random stream of one split: deterministic in (seed, split), disjoint across splits."""
    return np.random.default_rng(np.random.SeedSequence([seed, split_index(split)]))


# ----------------------------------------------------------------------------- random walk

class RandomWalkTask:
    """An agent on a ring of P positions starts at 0; each token is a move (L, R, S, uniform).

    The label of a move is the position after it (token ``p{pos}``); the BOS label is IGNORE.
    """

    name = "random_walk"
    MOVES = ("L", "R", "S")
    STEPS = (-1, 1, 0)

    def __init__(self, positions: int = 8, seed: int = 0):
        if positions < 2:
            raise ValueError(f"positions must be >= 2, got positions={positions!r}")
        self.positions = positions
        self.seed = seed
        tokens = ("<pad>", "<bos>") + self.MOVES + tuple(f"p{i}" for i in range(positions))
        self.vocab = Vocab(tokens=tokens, pad_id=0, bos_id=1)
        self.first_move_id = 2
        self.first_position_id = 2 + len(self.MOVES)
        self.chance_error = (positions - 1) / positions

    def document(self, length: int, rng: np.random.Generator) -> Document:
        """One walk of ``length`` tokens in all: BOS then ``length - 1`` moves."""
        if length < 1:
            raise ValueError(f"length must be >= 1 (BOS included), got length={length!r}")
        moves = rng.integers(0, len(self.MOVES), size=length - 1)
        positions = np.cumsum(np.asarray(self.STEPS)[moves]) % self.positions
        tokens = np.empty(length, dtype=token_dtype(len(self.vocab)))
        tokens[0] = self.vocab.bos_id
        tokens[1:] = self.first_move_id + moves
        labels = np.empty(length, dtype=label_dtype(len(self.vocab)))
        labels[0] = IGNORE
        labels[1:] = self.first_position_id + positions
        return Document(tokens, labels)

    def documents(self, split: str, count: int, length: int) -> list[Document]:
        """``count`` walks of ``length`` tokens, deterministic in (seed, split)."""
        if count < 0:
            raise ValueError(f"count must be >= 0, got count={count!r}")
        rng = split_rng(self.seed, split)
        return [self.document(length, rng) for _ in range(count)]


# ----------------------------------------------------------------------------- algorithmic

class AlgorithmicTask:
    """Code execution: programs of ``statements`` statements over a few variables, then END.

    ``sizes`` gives the number of programs per split; keys left out keep the defaults
    (10,000 / 1,000 / 1,000).

    Statements: ``v = k ;``, ``v ++ ;``, ``v -- ;``, ``print v ;`` and ``if v OP x : S``
    with OP in {<, >}, x another variable or a literal, and S one of ``=``, ``++``, ``--``
    (applied only when the condition holds). Values stay in 1..10 whichever way a condition
    goes: ++ is only written for a variable below 10, -- only above 1. A program starts with
    one ``v = k ;`` per variable (counted among the statements), so every print is defined.
    The label of a print's ``;`` is the printed value; every other label is IGNORE.
    """

    name = "algorithmic"
    NAMES = "abcde"
    MIN_VALUE, MAX_VALUE = 1, 10
    DEFAULT_SIZES = {"train": 10000, "valid": ALGORITHMIC_EVAL_PROGRAMS, "test": ALGORITHMIC_EVAL_PROGRAMS}

    # Top-level statement kinds and their weights (before dropping infeasible ones).
    # Tuned for the paper's ~430 tokens per program: an `if` costs 8-9 tokens and every
    # other statement 3-4, so ifs are ~22% of statements (30% would give ~460 tokens);
    # prints ~20%, plain assignments ~5%, ++ and -- the rest.
    KINDS = ("=", "++", "--", "print", "if")
    WEIGHTS = (0.05, 0.265, 0.265, 0.20, 0.22)
    NESTED_KINDS = ("=", "++", "--")  # uniform among the feasible ones

    def __init__(self, variables: int = 3, statements: int = 100, seed: int = 0,
                 sizes: dict | None = None):
        if not 2 <= variables <= len(self.NAMES):
            raise ValueError(f"variables must be in 2..{len(self.NAMES)} (the paper uses 3 or 5), "
                             f"got variables={variables!r}")
        if statements < variables:
            raise ValueError(f"statements must be >= variables ({variables}), "
                             f"got statements={statements!r}")
        self.variables = variables
        self.statements = statements
        self.seed = seed
        self.sizes = self._check_sizes(sizes)
        self.names = tuple(self.NAMES[:variables])
        values = tuple(str(v) for v in range(self.MIN_VALUE, self.MAX_VALUE + 1))
        tokens = (("<pad>", "<bos>", "_") + self.names
                  + ("=", "++", "--", "print", "if", "<", ">", ":", ";", "END") + values)
        self.vocab = Vocab(tokens=tokens, pad_id=0, bos_id=1)
        self._id = {t: i for i, t in enumerate(tokens)}
        self._cache: dict[str, tuple[np.random.Generator, list[Document]]] = {}
        self._top_kinds = self._choice_table(self.KINDS, self.WEIGHTS)
        self._nested_kinds = self._choice_table(self.NESTED_KINDS, (1,) * len(self.NESTED_KINDS))

    @classmethod
    def _check_sizes(cls, sizes: dict | None) -> dict[str, int]:
        merged = dict(cls.DEFAULT_SIZES)
        for split, size in (sizes or {}).items():
            if split not in SPLITS:
                raise ValueError(f"sizes keys must be in {SPLITS}, got sizes={sizes!r}")
            if not isinstance(size, (int, np.integer)) or size < 0:
                raise ValueError(f"sizes values must be ints >= 0, got sizes={sizes!r}")
            merged[split] = int(size)
        return merged

    # -- public

    def documents(self, split: str, count: int | None = None) -> list[Document]:
        """The first ``count`` programs of a split (all if None), generated lazily and cached.

        Programs come one after another from the split's random stream, so the first k
        programs do not depend on how many are asked for.
        """
        size = self.sizes[SPLITS[split_index(split)]]
        count = size if count is None else count
        if not 0 <= count <= size:
            raise ValueError(f"count must be in 0..{size} for split {split!r}, got count={count!r}")
        rng, docs = self._cache.setdefault(split, (split_rng(self.seed, split), []))
        while len(docs) < count:
            docs.append(self._program(rng))
        return docs[:count]

    def program_text(self, doc: Document) -> str:
        """The program as text, one statement a line (BOS left out)."""
        words = self.vocab.decode(doc.tokens)
        if words and words[0] == "<bos>":
            words = words[1:]
        return " ".join(words).replace("; ", ";\n")

    # -- generation

    def _program(self, rng: np.random.Generator) -> Document:
        """One program. Each statement consumes one row of uniforms (a fixed number)."""
        u = rng.random((self.statements, 9)).tolist()  # Python floats: much faster to use
        values = [0] * self.variables
        tokens, labels = ["<bos>"], [IGNORE]
        for i, row in enumerate(u):
            if i < self.variables:  # the initial assignments, in variable order
                stmt, label = self._assign(values, i, row[2])
            else:
                stmt, label = self._statement(values, row)
            tokens += stmt
            labels += [IGNORE] * (len(stmt) - 1) + [label]
        tokens.append("END")
        labels.append(IGNORE)
        ids = np.array([self._id[t] for t in tokens], dtype=token_dtype(len(self.vocab)))
        targets = np.array(labels, dtype=label_dtype(len(self.vocab)))
        ids.flags.writeable = targets.flags.writeable = False  # cached: shared by every caller
        return Document(ids, targets)

    def _statement(self, values: list[int], row: list[float]) -> tuple[list[str], int]:
        v = _pick(row[1], self.variables)
        kind = self._kind(self._top_kinds, values[v], row[0])
        if kind == "print":
            return ["print", self.names[v], ";"], self._id[str(values[v])]
        if kind == "if":
            return self._if(values, v, row), IGNORE
        return self._simple(values, v, kind, row[2]), IGNORE

    def _if(self, values: list[int], v: int, row: list[float]) -> list[str]:
        op = "<" if row[3] < 0.5 else ">"
        if row[4] < 0.5:  # compare with another variable
            w = (v + 1 + _pick(row[5], self.variables - 1)) % self.variables
            operand, right = self.names[w], values[w]
        else:  # compare with a literal
            right = self.MIN_VALUE + _pick(row[5], self.MAX_VALUE - self.MIN_VALUE + 1)
            operand = str(right)
        holds = values[v] < right if op == "<" else values[v] > right
        target = _pick(row[6], self.variables)
        kind = self._kind(self._nested_kinds, values[target], row[7])
        scratch = list(values)
        nested = self._simple(scratch, target, kind, row[8])
        if holds:
            values[:] = scratch
        return ["if", self.names[v], op, operand, ":"] + nested

    def _simple(self, values: list[int], v: int, kind: str, u: float) -> list[str]:
        """``v = k ;``, ``v ++ ;`` or ``v -- ;``, applied to ``values``."""
        if kind == "=":
            return self._assign(values, v, u)[0]
        values[v] += 1 if kind == "++" else -1
        return [self.names[v], kind, ";"]

    def _assign(self, values: list[int], v: int, u: float) -> tuple[list[str], int]:
        values[v] = self.MIN_VALUE + _pick(u, self.MAX_VALUE - self.MIN_VALUE + 1)
        return [self.names[v], "=", str(values[v]), ";"], IGNORE

    def _choice_table(self, kinds, weights) -> dict[int, tuple[tuple[str, ...], list[float]]]:
        """For each value: the kinds that keep it in 1..10 and their cumulative probabilities."""
        table = {}
        for value in range(self.MIN_VALUE, self.MAX_VALUE + 1):
            feasible = [(k, w) for k, w in zip(kinds, weights)
                        if not (k == "++" and value >= self.MAX_VALUE)
                        and not (k == "--" and value <= self.MIN_VALUE)]
            total = sum(w for _, w in feasible)
            table[value] = (tuple(k for k, _ in feasible),
                            np.cumsum([w / total for _, w in feasible]).tolist())
        return table

    @staticmethod
    def _kind(table, value: int, u: float) -> str:
        """Weighted choice (by uniform ``u``) among the kinds feasible for ``value``."""
        kinds, cumulative = table[value]
        return kinds[min(bisect.bisect_right(cumulative, u), len(kinds) - 1)]


def _pick(u: float, n: int) -> int:
    """Uniform index in 0..n-1 from a uniform u in [0, 1)."""
    return min(int(u * n), n - 1)


# ----------------------------------------------------------------------------- text

class TextTask:
    """Byte-level language modelling: byte b has id b; then ``<bos>`` (256) and ``<pad>`` (257).

    format "files": ``path`` is a directory tree (or one file); each non-empty file is one
    document, assigned to train/valid/test (~90/5/5%) by ``zlib.crc32`` of its relative path.
    ``path=None`` means every ``*.py`` file of the running interpreter's standard library
    (site-packages/dist-packages left out).

    format "bytes": ``path`` is one file, cut by bytes into train/valid/test (90/5/5%); each split
    is ONE document.

    format "enwik8": as "bytes", at the enwik8 benchmark's cuts: bytes [0, 90M), [90M, 95M),
    [95M, 100M). A file shorter than 100,000,000 bytes is cut in the 90/5/5 proportions; a longer
    one is refused (enwik9 is not cut silently).

    format "auto": "files" for a directory, "enwik8" for a file whose name starts with "enwik8",
    "bytes" for any other file.
    """

    name = "text"
    FORMATS = TEXT_FORMATS
    ENWIK8_CUTS = (90_000_000, 95_000_000, 100_000_000)

    def __init__(self, path: str | None = None, format: str = "auto"):
        if format not in self.FORMATS:
            raise ValueError(f"format must be one of {self.FORMATS}, got format={format!r}")
        tokens = tuple(_byte_name(b) for b in range(256)) + ("<bos>", "<pad>")
        self.vocab = Vocab(tokens=tokens, pad_id=257, bos_id=256)
        self.stdlib = path is None
        self.path = sysconfig.get_paths()["stdlib"] if path is None else os.path.expanduser(os.fspath(path))
        if not os.path.exists(self.path):
            raise ValueError(f"path does not exist: path={self.path!r}")
        if format == "auto":
            if not os.path.isfile(self.path):
                format = "files"
            else:
                format = "enwik8" if os.path.basename(self.path).startswith("enwik8") else "bytes"
        if format in ("bytes", "enwik8") and not os.path.isfile(self.path):
            raise ValueError(f"format {format!r} needs a single file, got path={self.path!r}")
        self.format = format
        self._files: dict[str, list[str]] | None = None

    # -- public

    def documents(self, split: str) -> list[Document]:
        """The documents of a split (labels None, tokens uint16, each starting with BOS)."""
        split_index(split)
        if self.format != "files":
            return [self._byte_range(split)]
        docs = []
        for rel in self.files(split):
            data = self._read(rel)
            if len(data):
                docs.append(self._document(np.frombuffer(data, dtype=np.uint8), self._full(rel)))
        return docs

    def files(self, split: str) -> list[str]:
        """Relative paths (sorted) of the split's files, format "files" only; empty files included."""
        split_index(split)
        if self.format != "files":
            raise ValueError(f"files() needs format 'files', this task has format={self.format!r}")
        if self._files is None:
            self._files = {s: [] for s in SPLITS}
            for rel in self._file_names:
                self._files[self._split_of(rel)].append(rel)
        return self._files[split]

    def fingerprint(self) -> list:
        """The corpus as it is now: its absolute path and every file's size and modification time.
        A dataset prepared from it is stale once this changes (an edited file, another
        interpreter's standard library)."""
        root = os.path.abspath(self.path)
        names = self._file_names  # one file: its name
        stats = [os.stat(root if os.path.isfile(root) else os.path.join(root, name)) for name in names]
        return [root, self.format, [(name, st.st_size, st.st_mtime_ns) for name, st in zip(names, stats)]]

    # -- helpers

    def _document(self, data: np.ndarray, source: str, offset: int = 0) -> Document:
        tokens = np.empty(len(data) + 1, dtype=np.uint16)
        tokens[0] = self.vocab.bos_id
        tokens[1:] = data
        return Document(tokens, None, source, offset)

    def _byte_range(self, split: str) -> Document:
        size = os.path.getsize(self.path)
        cuts = self.ENWIK8_CUTS
        if self.format == "enwik8" and size > cuts[-1]:
            raise DataError(f"{self.path}: {size:,} bytes, but the enwik8 format reads {cuts[-1]:,} "
                            "(task.format=bytes splits a file of any size 90/5/5)")
        if self.format == "bytes" or size < cuts[-1]:
            cuts = tuple(size * c // cuts[-1] for c in cuts)
        bounds = (0,) + cuts
        i = split_index(split)
        # np.memmap refuses empty files; an empty file gives three BOS-only documents.
        data = np.memmap(self.path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
        return self._document(data[bounds[i]:bounds[i + 1]], f"{self.path}, the {split} split", bounds[i])

    @functools.cached_property
    def _file_names(self) -> list[str]:
        """Relative posix paths of the files under ``path``, sorted. Hidden files and directories
        (a name starting with a dot, such as .git) are left out; any other entry that is not a
        regular file (a link to a directory, a broken link, a pipe) is reported, not read."""
        if os.path.isfile(self.path):
            return [os.path.basename(self.path)]

        def unreadable(err: OSError):
            raise DataError(f"task.path {self.path}: cannot list {err.filename}: {err.strerror}")

        found, other = [], []
        for root, dirs, names in os.walk(self.path, onerror=unreadable):
            dirs[:] = [d for d in dirs if not d.startswith(".") and not (self.stdlib and d in ("site-packages", "dist-packages"))]
            names = [n for n in names if not n.startswith(".") and (not self.stdlib or n.endswith(".py"))]
            linked = [d for d in dirs if os.path.islink(os.path.join(root, d))]  # os.walk does not enter them
            for name in names + linked:
                full = os.path.join(root, name)
                (found if os.path.isfile(full) else other).append(os.path.relpath(full, self.path).replace(os.sep, "/"))
        if other:
            print(f"stairscale: {len(other)} entries under {self.path} are not regular files and are not read: "
                  f"{', '.join(sorted(other)[:5])}{', ...' if len(other) > 5 else ''}", file=sys.stderr, flush=True)
        return sorted(found)

    @staticmethod
    def _split_of(rel: str) -> str:
        bucket = zlib.crc32(rel.encode("utf-8", "surrogateescape")) % 100
        return "train" if bucket < 90 else "valid" if bucket < 95 else "test"

    def _full(self, rel: str) -> str:
        return self.path if os.path.isfile(self.path) else os.path.join(self.path, rel)

    def _read(self, rel: str) -> bytes:
        full = self._full(rel)
        try:
            with open(full, "rb") as f:
                return f.read()
        except OSError as err:
            raise DataError(f"task.path {self.path}: cannot read {full}: {err.strerror or err}") from err


def _byte_name(b: int) -> str:
    """Printable ASCII as itself, every other byte as ``\\xNN``."""
    return chr(b) if 33 <= b < 127 else f"\\x{b:02x}"
