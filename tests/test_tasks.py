"""Tests for stairscale.data.tasks: each task is checked against an independent re-implementation."""

import os
import sysconfig

import numpy as np
import pytest

from stairscale.data.tasks import (
    IGNORE, AlgorithmicTask, Document, RandomWalkTask, TextTask, Vocab,
)
from stairscale.errors import DataError


def same_docs(a: list[Document], b: list[Document]) -> bool:
    return len(a) == len(b) and all(
        np.array_equal(x.tokens, y.tokens)
        and (x.labels is None) == (y.labels is None)
        and (x.labels is None or np.array_equal(x.labels, y.labels))
        for x, y in zip(a, b))


# ----------------------------------------------------------------------------- vocab

def test_vocab_decode_and_len():
    v = Vocab(tokens=("<pad>", "<bos>", "x"), pad_id=0, bos_id=1)
    assert len(v) == 3
    assert v.decode(np.array([1, 2, 0], dtype=np.uint8)) == ["<bos>", "x", "<pad>"]


# ----------------------------------------------------------------------------- random walk

def replay_walk(words: list[str], positions: int) -> list[str | None]:
    """Independent replay: expected label string for each token (None for BOS)."""
    pos, out = 0, [None]
    for w in words[1:]:
        pos = (pos + {"L": -1, "R": 1, "S": 0}[w]) % positions
        out.append(f"p{pos}")
    return out


@pytest.mark.parametrize("positions", [2, 8, 13])
def test_random_walk_labels_replay(positions):
    task = RandomWalkTask(positions=positions, seed=3)
    v = task.vocab
    assert v.tokens[:5] == ("<pad>", "<bos>", "L", "R", "S")
    assert v.tokens[5:] == tuple(f"p{i}" for i in range(positions))
    for doc in task.documents("train", count=5, length=200):
        assert doc.tokens.dtype == np.uint8 and len(doc.tokens) == 200
        assert doc.labels.dtype in (np.int16, np.int32) and len(doc.labels) == 200
        words = v.decode(doc.tokens)
        assert words[0] == "<bos>" and doc.tokens[0] == v.bos_id
        assert set(words[1:]) <= {"L", "R", "S"}
        expected = replay_walk(words, positions)
        assert doc.labels[0] == IGNORE
        assert v.decode(doc.labels[1:]) == expected[1:]


def test_random_walk_moves_are_roughly_uniform():
    task = RandomWalkTask()
    tokens = np.concatenate([d.tokens[1:] for d in task.documents("train", 10, 1000)])
    counts = np.bincount(tokens, minlength=5)[2:5] / len(tokens)
    assert np.all(np.abs(counts - 1 / 3) < 0.03)


def test_random_walk_determinism_and_splits():
    a = RandomWalkTask(seed=1).documents("train", 4, 64)
    assert same_docs(a, RandomWalkTask(seed=1).documents("train", 4, 64))
    assert not same_docs(a, RandomWalkTask(seed=1).documents("valid", 4, 64))
    assert not same_docs(a, RandomWalkTask(seed=2).documents("train", 4, 64))
    valid, test = (RandomWalkTask(seed=1).documents(s, 4, 64) for s in ("valid", "test"))
    assert not same_docs(valid, test)


def test_random_walk_document_takes_rng_and_length():
    task = RandomWalkTask()
    doc = task.document(1, np.random.default_rng(0))
    assert list(doc.tokens) == [task.vocab.bos_id] and list(doc.labels) == [IGNORE]
    d1 = task.document(50, np.random.default_rng(7))
    d2 = task.document(50, np.random.default_rng(7))
    assert same_docs([d1], [d2])


def test_random_walk_chance_error_and_errors():
    assert RandomWalkTask().chance_error == pytest.approx(7 / 8)
    assert RandomWalkTask(positions=4).chance_error == pytest.approx(3 / 4)
    with pytest.raises(ValueError, match="positions=1"):
        RandomWalkTask(positions=1)
    with pytest.raises(ValueError, match="split='dev'"):
        RandomWalkTask().documents("dev", 1, 10)
    with pytest.raises(ValueError, match="length=0"):
        RandomWalkTask().document(0, np.random.default_rng(0))


def test_random_walk_large_ring_uses_wider_dtype():
    task = RandomWalkTask(positions=300)
    doc = task.documents("test", 1, 100)[0]
    assert doc.tokens.dtype == np.uint16
    assert task.vocab.decode(doc.labels[1:]) == replay_walk(task.vocab.decode(doc.tokens), 300)[1:]


# ----------------------------------------------------------------------------- algorithmic

def interpret(words: list[str]):
    """Independent interpreter. Returns (statement count, {index of print ';': value}, all values seen).

    Parses the program with its own grammar and raises AssertionError on anything malformed.
    """
    assert words[0] == "<bos>" and words[-1] == "END"
    assert "END" not in words[1:-1]
    env: dict[str, int] = {}
    prints: dict[int, int] = {}
    seen: list[int] = []
    i, count = 1, 0

    def simple(i, apply):
        """Parse `v = k ;`, `v ++ ;` or `v -- ;` at i; return the index after it."""
        var, op = words[i], words[i + 1]
        assert var in "abcde" and len(var) == 1
        if op == "=":
            k = int(words[i + 2])
            assert words[i + 3] == ";"
            if apply:
                env[var] = k
            return i + 4
        assert op in ("++", "--") and words[i + 2] == ";"
        assert var in env
        if apply:
            env[var] += 1 if op == "++" else -1
        return i + 3

    def operand(w):
        return env[w] if w in env else int(w)

    while words[i] != "END":
        count += 1
        if words[i] == "print":
            assert words[i + 2] == ";"
            prints[i + 2] = env[words[i + 1]]
            i += 3
        elif words[i] == "if":
            left, op, right = env[words[i + 1]], words[i + 2], operand(words[i + 3])
            assert op in ("<", ">") and words[i + 4] == ":"
            i = simple(i + 5, left < right if op == "<" else left > right)
        else:
            i = simple(i, True)
        seen.extend(env.values())
    assert i == len(words) - 1
    return count, prints, seen


def test_algorithmic_vocab():
    task = AlgorithmicTask()
    assert len(task.vocab) == 26
    assert task.vocab.tokens[:6] == ("<pad>", "<bos>", "_", "a", "b", "c")
    assert task.vocab.tokens[-10:] == tuple(str(k) for k in range(1, 11))
    assert len(AlgorithmicTask(variables=5).vocab) == 28


@pytest.mark.parametrize("variables", [3, 5])
def test_algorithmic_labels_match_interpreter(variables):
    task = AlgorithmicTask(variables=variables, seed=5)
    v = task.vocab
    for doc in task.documents("train", 30):
        assert doc.tokens.dtype == np.uint8 and doc.labels.dtype == np.int16
        assert len(doc.tokens) == len(doc.labels)
        words = v.decode(doc.tokens)
        count, prints, seen = interpret(words)
        assert count == 100
        assert min(seen) >= 1 and max(seen) <= 10
        # the program starts with one assignment per variable, in order
        for j, name in enumerate("abcde"[:variables]):
            assert words[1 + 4 * j:3 + 4 * j] == [name, "="] and words[4 + 4 * j] == ";"
        supervised = {int(i): v.tokens[lab] for i, lab in enumerate(doc.labels) if lab != IGNORE}
        assert supervised == {i: str(val) for i, val in prints.items()}


def test_algorithmic_statistics():
    task = AlgorithmicTask()
    docs = task.documents("valid", 200)
    mean = np.mean([len(d.tokens) for d in docs])
    assert 350 <= mean <= 520
    words = [w for d in docs for w in task.vocab.decode(d.tokens)]
    n = 100 * len(docs)
    assert 0.12 < words.count("print") / n < 0.3
    assert 0.15 < words.count("if") / n < 0.35
    # both kinds of comparison operand and both operators occur
    after_if = [words[i + 3] for i, w in enumerate(words) if w == "if"]
    assert any(w in "abc" for w in after_if) and any(w.isdigit() for w in after_if)
    assert "<" in words and ">" in words


def test_algorithmic_determinism_prefix_and_splits():
    a = AlgorithmicTask(seed=2).documents("train", 6)
    b = AlgorithmicTask(seed=2)
    b.documents("train", 2)
    assert same_docs(a, b.documents("train", 6))  # lazy extension keeps the same stream
    assert same_docs(a[:3], AlgorithmicTask(seed=2).documents("train", 3))
    assert not same_docs(a, AlgorithmicTask(seed=2).documents("test", 6))
    assert not same_docs(a, AlgorithmicTask(seed=3).documents("train", 6))


def test_algorithmic_sizes_and_errors():
    task = AlgorithmicTask(sizes={"train": 5, "valid": 2, "test": 3})
    assert len(task.documents("valid")) == 2 and len(task.documents("train")) == 5
    with pytest.raises(ValueError, match="count"):
        task.documents("test", 4)
    with pytest.raises(ValueError, match="split='eval'"):
        task.documents("eval", 1)
    with pytest.raises(ValueError, match="sizes"):
        AlgorithmicTask(sizes={"dev": 3})
    with pytest.raises(ValueError, match="sizes"):
        AlgorithmicTask(sizes={"train": -1})
    with pytest.raises(ValueError, match="variables=7"):
        AlgorithmicTask(variables=7)
    with pytest.raises(ValueError, match="variables=1"):
        AlgorithmicTask(variables=1)


def test_algorithmic_program_text():
    task = AlgorithmicTask()
    doc = task.documents("train", 1)[0]
    text = task.program_text(doc)
    lines = text.splitlines()
    assert len(lines) == 101 and lines[-1] == "END"
    assert lines[0].startswith("a = ") and lines[0].endswith(" ;")
    assert "<bos>" not in text


# ----------------------------------------------------------------------------- text

@pytest.fixture
def text_tree(tmp_path):
    files = {f"dir{i % 3}/file{i}.txt": f"content {i}\n".encode() * (i + 1) for i in range(40)}
    files["bin/blob.dat"] = bytes(range(256))
    files["empty.txt"] = b""
    for rel, data in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    return tmp_path, files


def test_text_vocab():
    v = TextTask(path=__file__).vocab
    assert len(v) == 258 and v.bos_id == 256 and v.pad_id == 257
    assert len(set(v.tokens)) == 258
    assert v.decode([ord("A"), ord("z")]) == ["A", "z"]


def test_text_files_split(text_tree):
    root, files = text_tree
    task = TextTask(path=str(root))
    assert task.format == "files"
    nonempty = {data for data in files.values() if data}
    contents = {}
    for split in ("train", "valid", "test"):
        docs = task.documents(split)
        assert all(d.labels is None and d.tokens.dtype == np.uint16 for d in docs)
        assert all(d.tokens[0] == 256 for d in docs)
        contents[split] = [bytes(d.tokens[1:].astype(np.uint8)) for d in docs]
        assert all(len(c) for c in contents[split])
    # disjoint and covering all non-empty files, each document exactly one file's bytes
    all_docs = contents["train"] + contents["valid"] + contents["test"]
    assert len(all_docs) == len(nonempty) and set(all_docs) == nonempty
    assert len(contents["train"]) > len(contents["valid"]) + len(contents["test"])
    # deterministic: a fresh task splits the same way
    again = TextTask(path=str(root))
    for split in ("train", "valid", "test"):
        assert [bytes(d.tokens[1:].astype(np.uint8)) for d in again.documents(split)] == contents[split]
    # byte ids are the bytes themselves (values above 127 included)
    blob = next(d for s in ("train", "valid", "test") for d in task.documents(s) if len(d.tokens) == 257)
    assert list(blob.tokens[1:]) == list(range(256))


def test_text_single_file_is_cut_by_bytes(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_bytes(bytes(range(200)))
    task = TextTask(path=str(p))
    assert task.format == "bytes"
    parts = [task.documents(s) for s in ("train", "valid", "test")]
    assert [len(docs) for docs in parts] == [1, 1, 1]
    assert [list(docs[0].tokens) for docs in parts] == [[256, *range(180)], [256, *range(180, 190)], [256, *range(190, 200)]]
    # as format "files" it is one document, so two splits are empty
    files = TextTask(path=str(p), format="files")
    assert sorted(len(files.documents(s)) for s in ("train", "valid", "test")) == [0, 0, 1]


def test_text_enwik8_format(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, size=2000, dtype=np.uint8)
    p = tmp_path / "enwik8_small"
    data.tofile(p)
    task = TextTask(path=str(p))
    assert task.format == "enwik8"
    parts = {s: task.documents(s) for s in ("train", "valid", "test")}
    assert all(len(docs) == 1 and docs[0].labels is None for docs in parts.values())
    sizes = {s: len(docs[0].tokens) - 1 for s, docs in parts.items()}
    assert sizes == {"train": 1800, "valid": 100, "test": 100}
    joined = np.concatenate([parts[s][0].tokens[1:] for s in ("train", "valid", "test")])
    assert np.array_equal(joined, data) and parts["train"][0].tokens[0] == 256
    # explicit format on a file of another name; auto cuts it by bytes at the same proportions
    other = tmp_path / "data.bin"
    data.tofile(other)
    assert TextTask(path=str(other)).format == "bytes"
    assert len(TextTask(path=str(other), format="enwik8").documents("test")[0].tokens) == 101


def test_an_enwik8_file_longer_than_enwik8_is_refused(tmp_path):
    """Not silently cut at 100M bytes (enwik9 starts like enwik8); auto reads it as plain bytes."""
    p = tmp_path / "enwik9"
    with open(p, "wb") as f:
        f.truncate(100_000_001)  # sparse: no 100 MB written
    assert TextTask(path=str(p)).format == "bytes"
    with pytest.raises(DataError, match=f"{p}: 100,000,001 bytes, but the enwik8 format reads 100,000,000"):
        TextTask(path=str(p), format="enwik8").documents("train")


def test_text_files_leave_out_hidden_entries_and_report_what_is_not_a_file(tmp_path, capsys):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "sub" / "b.txt").write_text("b")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "object").write_bytes(b"\x78\x9c")
    (tmp_path / ".hidden").write_text("h")
    (tmp_path / "linked_file").symlink_to(tmp_path / "a.txt")
    (tmp_path / "linked_dir").symlink_to(tmp_path / "sub")
    (tmp_path / "broken").symlink_to(tmp_path / "nothing")
    os.mkfifo(tmp_path / "pipe")
    task = TextTask(path=str(tmp_path))
    assert sorted(f for s in ("train", "valid", "test") for f in task.files(s)) == ["a.txt", "linked_file", "sub/b.txt"]
    reported = capsys.readouterr().err
    assert f"3 entries under {tmp_path} are not regular files and are not read: broken, linked_dir, pipe" in reported


def test_text_errors(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(ValueError, match="path does not exist: .*nope"):
        TextTask(path=missing)
    with pytest.raises(ValueError, match="format='xml'"):
        TextTask(path=str(tmp_path), format="xml")
    with pytest.raises(ValueError, match="format 'enwik8' needs a single file"):
        TextTask(path=str(tmp_path), format="enwik8")
    with pytest.raises(ValueError, match="split='dev'"):
        TextTask(path=str(tmp_path)).documents("dev")


def test_text_unreadable_file_is_named(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"file{i}.txt").write_text("text " * 10)
    (corpus / "unreadable.txt").symlink_to("/proc/self/mem")  # a regular file whose read fails (EIO), even for root
    task = TextTask(path=str(corpus), format="files")
    with pytest.raises(DataError, match=f"task.path {corpus}: cannot read {corpus / 'unreadable.txt'}: Input/output error"):
        for split in ("train", "valid", "test"):
            task.documents(split)


def test_text_default_is_stdlib():
    task = TextTask()
    stdlib = sysconfig.get_paths()["stdlib"]
    assert task.path == stdlib and task.format == "files"
    train, valid = task.files("train"), task.files("valid")
    assert len(train) > 100 and len(valid) > 5
    assert not set(train) & set(valid)
    assert all(f.endswith(".py") and "site-packages" not in f for f in train + valid)
    assert train == sorted(train)
    docs = task.documents("valid")  # ~5% of the stdlib: quick to load
    assert 5 < len(docs) <= len(valid)
    with open(os.path.join(stdlib, valid[0]), "rb") as f:
        first = f.read()
    assert bytes(docs[0].tokens[1:].astype(np.uint8)) == first
