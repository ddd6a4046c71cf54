"""Shards, manifest and the lane loader: coverage, exact resume (also across data-parallel sizes
under torchrun with 2 ranks x 2 workers), and a clear error for each kind of bad data."""

import dataclasses
import hashlib
import itertools
import json
import re
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from stairscale.config import DataConfig, RunConfig, TaskConfig, TrainConfig
from stairscale.data import loader
from stairscale.data.lanes import pack
from stairscale.data.loader import LaneLoader, LoaderSpec, deal_warning, document_groups
from stairscale.data.prepare import check_prepared_for, content_hash, dataset_dir, prepare_dataset
from stairscale.data.shards import MANIFEST, Dataset, Shard
from stairscale.data.tasks import TextTask
from stairscale.errors import DataError
from stairscale.train.splits import check_split

LANES, SEGMENT, CHUNK = 4, 16, 4
SCRIPT = Path(__file__).parent / "scripts" / "loader_ranks.py"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A byte-level text dataset of 90 files of random lengths, 3 documents per shard."""
    corpus = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    for i in range(90):
        (corpus / f"file{i:02d}.txt").write_bytes(bytes(rng.integers(32, 127, rng.integers(5, 120)).tolist()))
    root = tmp_path_factory.mktemp("data") / "text"
    prepare_dataset(RunConfig(task=TaskConfig(name="text", path=str(corpus)), data=DataConfig(shard_docs=3)), root)
    return root


def spec(root, **overrides):
    fields = dict(root=str(root), split="train", lanes=LANES, segment_len=SEGMENT, chunk=CHUNK, seed=7, shuffle=True)
    return LoaderSpec(**{**fields, **overrides})


def global_batches(loader, steps):
    out = []
    for _, batch in zip(range(steps), loader):
        out.append(np.stack([batch.tokens.numpy(), batch.doc_start.numpy(), batch.doc_id.numpy(), batch.targets.numpy()]))
    return np.stack(out)


def test_manifest_describes_every_shard(dataset):
    manifest = json.loads((dataset / MANIFEST).read_text())
    assert manifest["token_dtype"] == "uint16" and len(manifest["vocab"]["tokens"]) == 258
    for split in manifest["splits"].values():
        assert split["documents"] == sum(s["documents"] for s in split["shards"])
        for shard in split["shards"]:
            assert hashlib.sha256((dataset / shard["file"]).read_bytes()).hexdigest() == shard["sha256"]
            assert len(shard["lengths"]) == shard["documents"] and sum(shard["lengths"]) == shard["tokens"]


def read_split(root, split):
    return [doc.tokens.tolist() for doc in Dataset(root).documents(split)]


def test_shards_are_webdataset_tars_and_our_reader_agrees(dataset):
    ours = read_split(dataset, "train")
    theirs = []
    for shard in Dataset(dataset).shards("train"):
        for sample in wds.WebDataset(str(shard.path), shardshuffle=False, nodesplitter=None):
            theirs.append(np.frombuffer(sample["tokens"], dtype=np.uint16).tolist())
            assert json.loads(sample["json"])["length"] == len(theirs[-1])
    assert ours == theirs and len(ours) > 50


def test_fast_shard_reading_equals_sample_by_sample_reading(dataset, tmp_path):
    data = Dataset(dataset)
    for shard in data.shards("train")[:5]:
        raw = shard.path.read_bytes()
        fast, each = data._read_fast(shard, raw), data._read_each(shard, raw)
        assert fast is not None  # a freshly written shard takes the one-pass path
        for name in ("tokens", "lengths", "ids"):
            assert np.array_equal(getattr(fast, name), getattr(each, name))
    shard = data.shards("train")[0]
    shifted = Shard(**{**shard.__dict__, "tokens_at": [o + 512 for o in shard.tokens_at]})
    assert data._read_fast(shifted, shard.path.read_bytes()) is None  # offsets that do not match the tar


def test_one_epoch_reads_every_document_exactly_once(dataset):
    loader = LaneLoader(spec(dataset))
    steps = loader.steps_per_epoch()
    tokens, starts, ids, _ = global_batches(loader, steps).transpose(1, 0, 2, 3)
    assert loader.epoch == 1 and loader.step == 0
    documents = read_split(dataset, "train")
    lanes_of = {}
    for lane in range(LANES):
        lane_tokens, lane_ids, lane_starts = (np.concatenate(x[:, lane]) for x in (tokens, ids, starts))
        for doc_id in np.unique(lane_ids[lane_ids >= 0]):
            where = np.flatnonzero(lane_ids == doc_id)
            assert doc_id not in lanes_of, "a document was read twice"
            lanes_of[doc_id] = lane
            assert lane_tokens[where].tolist() == documents[doc_id]  # whole, in order
            assert np.array_equal(where, np.arange(where[0], where[0] + len(where)))  # contiguous
            assert where[0] % CHUNK == 0  # chunk aligned
        document_begins = (np.diff(lane_ids, prepend=-2) != 0) & (lane_ids >= 0)  # where a new document id appears
        assert np.array_equal(lane_starts.astype(bool), document_begins)  # the reset flag is set there, and only there
    assert sorted(lanes_of) == list(range(len(documents)))


def test_epochs_reshuffle_and_every_lane_has_work(dataset):
    loader = LaneLoader(spec(dataset))
    first, second = loader.plan(0), loader.plan(1)
    assert [s.number for s in first.lanes[0]] != [s.number for s in second.lanes[0]]
    assert all(first.lanes)


def test_resume_at_any_step_in_process(dataset):
    steps = LaneLoader(spec(dataset)).steps_per_epoch() + 5  # cross an epoch boundary
    reference = global_batches(LaneLoader(spec(dataset)), steps)
    for stop in (1, 7, steps - 6, steps - 2):
        first = LaneLoader(spec(dataset))
        head = global_batches(first, stop)
        second = LaneLoader(spec(dataset), workers=2, prefetch=2)
        second.load_state_dict(json.loads(json.dumps(first.state_dict())))
        tail = global_batches(second, steps - stop)
        assert np.array_equal(np.concatenate([head, tail]), reference), stop


def torchrun(*args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", str(SCRIPT), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_two_ranks_two_workers_match_one_process_and_resume_across_dp_sizes(dataset, tmp_path):
    steps, stop = LaneLoader(spec(dataset)).steps_per_epoch() + 4, 9
    reference = global_batches(LaneLoader(spec(dataset)), steps)
    common = ["--root", str(dataset), "--split", "train", "--lanes", str(LANES), "--segment", str(SEGMENT), "--chunk", str(CHUNK)]

    out = str(tmp_path / "dp2.npz")
    torchrun(*common, "--steps", str(steps), "--stop", str(stop), "--out", out)
    ranks = np.load(out)
    assert np.array_equal(ranks["uninterrupted"], reference)
    assert np.array_equal(ranks["interrupted"], reference)  # stop and resume on dp=2

    # dp 2 -> 1: the state saved by two ranks continues in one process.
    single = LaneLoader(spec(dataset))
    single.load_state_dict(json.load(open(out + ".state.json")))
    assert np.array_equal(global_batches(single, steps - stop), reference[stop:])

    # dp 1 -> 2: a state saved by one process continues on two ranks.
    first = LaneLoader(spec(dataset))
    global_batches(first, stop)
    state_file = tmp_path / "dp1.json"
    state_file.write_text(json.dumps(first.state_dict()))
    out = str(tmp_path / "dp1to2.npz")
    torchrun(*common, "--steps", str(steps - stop), "--resume-from", str(state_file), "--out", out)
    assert np.array_equal(np.load(out)["uninterrupted"], reference[stop:])


def test_resume_refuses_a_different_global_batch(dataset):
    state = LaneLoader(spec(dataset)).state_dict()
    with pytest.raises(DataError, match="lanes was 4, now 8"):
        LaneLoader(spec(dataset, lanes=8)).load_state_dict(state)
    with pytest.raises(DataError, match="shuffle was True, now False"):  # a training position in an evaluation loader
        LaneLoader(spec(dataset, shuffle=False)).load_state_dict(state)
    state["step"] = 3
    state["lane_positions"][0]["offset"] += 1
    loader = LaneLoader(spec(dataset))
    with pytest.raises(DataError, match="saved positions differ"):
        loader.load_state_dict(state)
    assert (loader.epoch, loader.step) == (0, 0)  # a refused state moves nothing


def test_evaluation_reads_the_split_once_in_order(dataset):
    loader = LaneLoader(spec(dataset, split="valid", shuffle=False))
    batches = global_batches(loader, 10_000)
    assert len(batches) == loader.plan(0).steps
    read = []
    for lane in range(LANES):  # each lane: documents one after another, whole, in split order
        ids = np.concatenate(batches[:, 2, lane])
        runs = [int(doc) for doc, _ in itertools.groupby(ids) if doc >= 0]
        assert runs == sorted(runs), runs
        read += runs
    assert sorted(read) == list(range(len(read_split(dataset, "valid"))))  # every document once


# ---------------------------------------------------------------------------------- bad data


@pytest.fixture
def copy(dataset, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(dataset, root)
    return root


def first_shard(root):
    manifest = json.loads((root / MANIFEST).read_text())
    return manifest, manifest["splits"]["train"]["shards"][0]


def rewrite_manifest_checksum(root, manifest, shard):
    shard["sha256"] = hashlib.sha256((root / shard["file"]).read_bytes()).hexdigest()
    (root / MANIFEST).write_text(json.dumps(manifest))


def read_all(root, on_bad_sample="error"):
    data = Dataset(root, on_bad_sample)
    return list(data.documents("train")), data


def test_missing_shard(copy):
    _, shard = first_shard(copy)
    (copy / shard["file"]).unlink()
    with pytest.raises(DataError, match=f"shard .*{shard['file']} is missing"):
        read_all(copy)


def test_a_shard_that_cannot_be_read_is_named(copy):
    _, shard = first_shard(copy)
    path = copy / shard["file"]
    path.unlink()
    path.mkdir()  # a directory in its place: a read error other than a missing file
    with pytest.raises(DataError, match=f"shard .*{shard['file']}: cannot read it: Is a directory"):
        read_all(copy)


def test_checksum_mismatch(copy):
    _, shard = first_shard(copy)
    path = copy / shard["file"]
    data = bytearray(path.read_bytes())
    data[600] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=f"{shard['file']}: sha256 does not match"):
        read_all(copy)


def test_a_data_error_in_a_loader_worker_is_the_error_itself(copy):
    """torch would re-raise a worker's error with the worker's traceback in its message."""
    _, shard = first_shard(copy)
    path = copy / shard["file"]
    path.write_bytes(path.read_bytes()[:-1] + b"x")
    for workers in (0, 2):
        with pytest.raises(DataError) as caught:
            list(LaneLoader(spec(copy), workers=workers, prefetch=2))
        assert str(caught.value) == f"shard {path}: sha256 does not match the manifest (changed or corrupt)", workers


def test_manifest_fields_that_cannot_describe_the_data(copy):
    manifest = json.loads((copy / MANIFEST).read_text())
    edits = [
        (lambda m: m["vocab"].update(pad_id=999), "vocab.pad_id 999 is not an id of the vocabulary of 258"),
        (lambda m: m["vocab"].update(bos_id=None), "vocab.bos_id None is not an id"),
        (lambda m: m.update(labelled=True), "labelled True does not fit the task 'text'"),
        (lambda m: m.update(source=None), "missing or malformed field"),
        (lambda m: m.update(splits=[]), "splits is a list"),
    ]
    for edit, message in edits:
        changed = json.loads(json.dumps(manifest))
        edit(changed)
        (copy / MANIFEST).write_text(json.dumps(changed))
        with pytest.raises(DataError, match=f"{MANIFEST}: .*{message}"):
            read_all(copy)
    (copy / MANIFEST).write_text("[]")
    with pytest.raises(DataError, match=f"{MANIFEST}: format 'list' is not"):
        read_all(copy)


def test_a_text_dataset_is_checked_against_the_text_keys_only(copy):
    source = json.loads((copy / MANIFEST).read_text())["source"]
    task = TaskConfig(name="text", path=source["path"], train_lengths=[32], eval_length=512, positions=16)
    check_prepared_for(copy, task)  # the random walk's keys do not apply to text
    with pytest.raises(Exception, match="task.piece_len"):
        check_prepared_for(copy, dataclasses.replace(task, piece_len=99))


def test_a_corrupt_evaluation_shard_fails_before_training(tmp_path):
    cli = [sys.executable, "-m", "stairscale.cli"]
    walk = ["--set", "task.eval_docs=8", "--set", "task.train_docs=64", "--set", "train.lanes=4"]
    prepare = cli + ["prepare-data", "--out", str(tmp_path / "walk"), *walk]
    prepared = subprocess.run(prepare, capture_output=True, text=True)
    assert prepared.returncode == 0, prepared.stderr
    again = subprocess.run(prepare, capture_output=True, text=True)
    assert again.returncode == 1 and f"{tmp_path / 'walk'} holds a dataset; nothing was written" in again.stderr, again.stderr
    replaced = subprocess.run(prepare + ["--replace"], capture_output=True, text=True)
    assert replaced.returncode == 0, replaced.stderr
    shard = tmp_path / "walk" / "test" / "shard-00003.tar"
    shard.write_bytes(shard.read_bytes()[:-1] + b"x")
    run = subprocess.run(cli + ["train", *walk, "--set", f"data.dir={tmp_path / 'walk'}", "--set", f"run_dir={tmp_path / 'run'}"],
                         capture_output=True, text=True)
    assert run.returncode == 1 and f"shard {shard}: sha256 does not match" in run.stderr, run.stderr[-2000:]
    assert "step " not in run.stdout


def test_truncated_tar(copy):
    manifest, shard = first_shard(copy)
    path = copy / shard["file"]
    path.write_bytes(path.read_bytes()[:1800])  # cut inside the second sample
    rewrite_manifest_checksum(copy, manifest, shard)
    with pytest.raises(DataError, match=f"{shard['file']}.*(truncated|corrupt)"):
        read_all(copy)


@pytest.mark.parametrize("field, garbage, message", [
    (slice(124, 136), b"\xff" * 12, "corrupt tar header after 1 members"),  # the size of the second member
    (slice(0, 4), b"\xff" * 4, "corrupt member name after 1 members"),
])
def test_corrupt_tar(copy, field, garbage, message):
    manifest, shard = first_shard(copy)
    path = copy / shard["file"]
    data = bytearray(path.read_bytes())
    second = 512 + -(-int(data[124:135], 8) // 512) * 512  # the second member's header
    data[second + field.start : second + field.stop] = garbage
    path.write_bytes(bytes(data))
    del shard["tokens_at"]  # the sample-by-sample reader, which parses every header
    rewrite_manifest_checksum(copy, manifest, shard)
    with pytest.raises(DataError, match=f"{shard['file']}: {message}"):
        read_all(copy)


def test_a_sample_longer_than_the_manifest_says(copy):
    manifest, shard = first_shard(copy)
    shard["lengths"][0] += 8  # the lane plan would drift from here on
    shard["tokens"] += 8
    del shard["tokens_at"]
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=f"{shard['file']}, sample 000000000: {shard['lengths'][0] - 8} tokens, but the manifest lists"):
        read_all(copy)


def test_an_edited_manifest_cannot_drop_documents(copy):
    """A manifest that lists fewer documents than the shards hold is refused, however consistently
    it was edited: an entry's counts, the shards' document ranges, the split's total, the tar."""
    original = (copy / MANIFEST).read_text()

    def edit(index: int, documents_dropped: bool, first_moved: bool, split_total: bool) -> tuple[dict, dict]:
        manifest = json.loads(original)
        shard = manifest["splits"]["train"]["shards"][0]
        for key in ("lengths", "tokens_at", "labels_at"):
            if shard[key] is not None:  # labels_at: labelled tasks only
                del shard[key][index]
        shard["documents"] -= documents_dropped
        shard["tokens"] = sum(shard["lengths"])
        shard["first_document"] += first_moved
        manifest["splits"]["train"]["documents"] -= split_total
        (copy / MANIFEST).write_text(json.dumps(manifest))
        return manifest, shard

    _, shard = edit(1, documents_dropped=False, first_moved=False, split_total=False)
    with pytest.raises(DataError, match=f"{MANIFEST}: split train, shard 0: {shard['documents'] - 1} lengths for {shard['documents']} documents"):
        read_all(copy)
    manifest, _ = edit(1, documents_dropped=True, first_moved=False, split_total=False)
    with pytest.raises(DataError, match=f"{MANIFEST}: split train, shard 1: first_document 3, but the shards before it hold 2 documents"):
        read_all(copy)
    edit(0, documents_dropped=True, first_moved=True, split_total=False)
    with pytest.raises(DataError, match=f"{MANIFEST}: split train, shard 0: first_document 1, but the shards before it hold 0 documents"):
        read_all(copy)
    manifest = json.loads(original)  # a whole shard's entry deleted
    last = manifest["splits"]["train"]["shards"].pop()
    (copy / MANIFEST).write_text(json.dumps(manifest))
    total = manifest["splits"]["train"]["documents"]
    with pytest.raises(DataError, match=f"{MANIFEST}: split train lists {total} documents, its shards {total - last['documents']}"):
        read_all(copy)
    # The manifest consistent with itself, the shard's tar not: the tar's samples are counted.
    manifest = json.loads(original)
    shards = manifest["splits"]["train"]["shards"]
    shard = shards[0]
    for key in ("lengths", "tokens_at", "labels_at"):
        if shard[key] is not None:
            del shard[key][-1]
    shard["documents"] -= 1
    shard["tokens"] = sum(shard["lengths"])
    for later in shards[1:]:
        later["first_document"] -= 1
    manifest["splits"]["train"]["documents"] -= 1
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=f"{shard['file']}: 3 samples, but the manifest lists 2"):
        read_all(copy)


def replace_first_sample(root, tokens: bytes):
    """Rewrite the first shard with its first sample's tokens replaced (checksum kept valid)."""
    manifest, shard = first_shard(root)
    path = root / shard["file"]
    samples = list(wds.WebDataset(str(path), shardshuffle=False, nodesplitter=None))
    samples[0]["tokens"] = tokens
    with wds.TarWriter(str(path), encoder=False) as sink:
        for sample in samples:
            sink.write({k: v for k, v in sample.items() if not k.startswith("__") or k == "__key__"})
    rewrite_manifest_checksum(root, manifest, shard)
    return shard, samples[0]["__key__"]


def test_token_outside_the_vocabulary(copy):
    shard, key = replace_first_sample(copy, np.array([256, 300, 65], dtype=np.uint16).tobytes())
    with pytest.raises(DataError, match=f"{shard['file']}, sample {key}: token id 300 outside the vocabulary of 258"):
        read_all(copy)


def test_payload_that_is_not_whole_token_ids(copy):
    shard, key = replace_first_sample(copy, np.array([256, 65], dtype=np.uint16).tobytes()[:3])
    with pytest.raises(DataError, match=f"{shard['file']}, sample {key}: tokens payload of 3 bytes is not a whole number of uint16"):
        read_all(copy)
    docs, data = read_all(copy, on_bad_sample="skip")
    assert len(data.skipped) == 1 and len(docs) == json.loads((copy / MANIFEST).read_text())["splits"]["train"]["documents"] - 1


def test_a_sample_the_manifest_does_not_list(copy):
    """The one-pass reader too: a sample appended after the listed ones is an error, not dropped."""
    manifest, shard = first_shard(copy)
    path = copy / shard["file"]
    samples = list(wds.WebDataset(str(path), shardshuffle=False, nodesplitter=None))
    samples.append({**samples[-1], "__key__": "999999999"})
    with wds.TarWriter(str(path), encoder=False, mtime=0) as sink:  # the listed samples keep their offsets
        for sample in samples:
            sink.write({k: v for k, v in sample.items() if not k.startswith("__") or k == "__key__"})
    rewrite_manifest_checksum(copy, manifest, shard)
    with pytest.raises(DataError, match=f"{shard['file']}: {len(samples)} samples, but the manifest lists {len(samples) - 1}"):
        read_all(copy)


def test_a_manifest_entry_without_a_field(copy):
    manifest, shard = first_shard(copy)
    del shard["lengths"]
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=f"{MANIFEST}: split train, shard 0: missing or malformed field 'lengths'"):
        read_all(copy)


@pytest.mark.parametrize("key, value, message", [
    ("first_document", 0.0, "first_document 0.0 is not a whole number"),
    ("documents", "2", "documents '2' is not a whole number"),
    ("tokens_at", ["a"], "tokens_at is not a list of whole numbers"),
    ("lengths", [True], "lengths is not a list of whole numbers"),
])
def test_a_manifest_entry_of_the_wrong_type(copy, key, value, message):
    manifest, shard = first_shard(copy)
    shard[key] = value
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=f"{MANIFEST}: split train, shard 0: {message}"):
        read_all(copy)


def test_a_truncated_training_shard_is_found_before_training(copy):
    """Its sha256 is checked only when it is read, maybe hours into a run; its size at start."""
    manifest, shard = first_shard(copy)
    path = copy / shard["file"]
    path.write_bytes(path.read_bytes()[:1800])  # cut inside the second sample
    with pytest.raises(DataError, match=f"split train: 1 of its shards end before the samples the manifest lists \\({path}\\)"):
        check_split(Dataset(copy), "train")


def test_a_manifest_shard_without_documents(copy):
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["splits"]["valid"]["shards"].append({**manifest["splits"]["valid"]["shards"][0], "file": "valid/extra.tar",
                                                  "documents": 0, "tokens": 0, "lengths": [], "tokens_at": [], "labels_at": None})
    (copy / MANIFEST).write_text(json.dumps(manifest))
    shard = len(manifest["splits"]["valid"]["shards"]) - 1
    with pytest.raises(DataError, match=f"{MANIFEST}: split valid, shard {shard}: no documents"):
        Dataset(copy).shards("valid")


def test_label_outside_the_vocabulary_in_the_one_pass_reader(tmp_path):
    root = tmp_path / "walks"
    task = TaskConfig(train_lengths=[12], eval_length=12, train_docs=40, eval_docs=8)
    prepare_dataset(RunConfig(task=task, data=DataConfig(shard_docs=10)), root)
    manifest = json.loads((root / MANIFEST).read_text())
    shard = manifest["splits"]["train-12"]["shards"][0]
    path = root / shard["file"]
    data = bytearray(path.read_bytes())
    at = shard["labels_at"][1] + np.dtype(manifest["label_dtype"]).itemsize  # the second sample's second label
    data[at : at + 2] = np.array(99, dtype="<i2").tobytes()
    path.write_bytes(bytes(data))
    rewrite_manifest_checksum(root, manifest, shard)
    with pytest.raises(DataError, match=f"{shard['file']}, sample 000000001: label id 99 outside the vocabulary"):
        list(Dataset(root).documents("train-12"))


def test_empty_document(copy):
    shard, key = replace_first_sample(copy, b"")
    with pytest.raises(DataError, match=f"{shard['file']}, sample {key}: empty document"):
        read_all(copy)


def test_skip_option_counts_bad_samples_and_keeps_exact_resume(copy, capsys):
    replace_first_sample(copy, np.array([256, 300], dtype=np.uint16).tobytes())
    docs, data = read_all(copy, on_bad_sample="skip")
    list(data.documents("train"))  # a second epoch: the same sample, reported once
    assert len(data.skipped) == 1
    assert len(docs) == json.loads((copy / MANIFEST).read_text())["splits"]["train"]["documents"] - 1
    assert capsys.readouterr().err.count("skipping bad sample (1 in this process so far)") == 1
    skipping = spec(copy, on_bad_sample="skip")
    steps = LaneLoader(skipping).steps_per_epoch()
    reference = global_batches(LaneLoader(skipping), steps)
    tokens, starts, ids, targets = reference.transpose(1, 0, 2, 3)
    assert 0 not in ids and not starts[ids < 0].any() and (targets[ids < 0] == -100).all()  # in its place, padding
    for stop in range(1, steps):
        first = LaneLoader(skipping)
        head = global_batches(first, stop)
        second = LaneLoader(skipping)
        second.load_state_dict(first.state_dict())
        assert np.array_equal(np.concatenate([head, global_batches(second, steps - stop)]), reference), stop


def test_writer_refuses_bad_documents(tmp_path):
    from stairscale.data.shards import write_dataset
    from stairscale.data.tasks import Document, Vocab

    vocab = Vocab(("<pad>", "<bos>", "a"), 0, 1)
    good = Document(np.array([1, 2]), np.array([2, -100]))
    for bad, message in [
        (Document(np.array([1, 7]), np.array([2, 2])), "token id 7 outside the vocabulary of 3"),
        (Document(np.array([1, -2]), np.array([2, 2])), "token id -2 outside"),
        (Document(np.array([1, 2]), np.array([2, 9])), "label id 9 outside"),
        (Document(np.array([1, 2]), np.array([2])), "1 labels for 2 tokens"),
        (Document(np.array([1, 2])), "missing labels"),
    ]:
        with pytest.raises(DataError, match=f"split train, document 1: {message}"):
            write_dataset(tmp_path / "d", vocab, True, {"train": [good, bad]}, 0, 64, {})
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temporary directory


def test_prepare_data_never_replaces_a_directory_that_is_not_a_dataset(tmp_path):
    cfg = RunConfig(task=TaskConfig(name="random_walk", train_docs=100, eval_docs=10))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="mine exists and is not a stairscale dataset"):
        prepare_dataset(cfg, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    first = prepare_dataset(cfg, tmp_path / "walks")
    cfg.task.seed = 1
    with pytest.raises(DataError, match="walks holds a dataset; nothing was written: .*prepare-data --replace"):
        prepare_dataset(cfg, tmp_path / "walks")  # a run may be reading it
    second = prepare_dataset(cfg, tmp_path / "walks", replace=True)
    assert json.loads((tmp_path / "walks" / MANIFEST).read_text()) == second != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "walks"]
    # Files of the user's inside a dataset are never deleted with it.
    (tmp_path / "walks" / "NOTES.md").write_text("keep me")
    (tmp_path / "walks" / "valid" / "extra.tar").write_text("keep me")
    with pytest.raises(DataError, match=r"walks holds a dataset and files that are not its own \(NOTES.md, valid/extra.tar\)"):
        prepare_dataset(cfg, tmp_path / "walks", replace=True)
    assert (tmp_path / "walks" / "NOTES.md").read_text() == (tmp_path / "walks" / "valid" / "extra.tar").read_text() == "keep me"


def test_prepare_data_stopped_by_sigterm_leaves_nothing_behind(tmp_path):
    """A scheduler's stop (SIGTERM) while shards are written removes the temporary directory."""
    command = [sys.executable, "-m", "stairscale.cli", "prepare-data", "--set", "task.train_docs=50000", "--out", str(tmp_path / "walks")]
    writer = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".walks.writing-*")):
        assert writer.poll() is None and time.monotonic() < deadline, "prepare-data ended before it wrote shards"
        time.sleep(0.01)
    writer.send_signal(signal.SIGTERM)
    assert writer.wait(timeout=60) == 128 + signal.SIGTERM, writer.stderr.read()
    assert list(tmp_path.iterdir()) == []


def test_a_changed_text_corpus_is_another_dataset(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("first version")
    cfg = RunConfig(task=TaskConfig(name="text", path=str(corpus)))
    before = content_hash(cfg)
    assert content_hash(cfg) == before
    (corpus / "a.txt").write_text("second version, longer")
    edited = content_hash(cfg)
    assert edited != before
    (corpus / "b.txt").write_text("a new file")
    assert content_hash(cfg) != edited
    assert content_hash(RunConfig(task=cfg.task, train=TrainConfig(lanes=4))) != content_hash(cfg)  # pieces follow the lanes


def test_every_lane_gets_two_shards_or_more_by_default(tmp_path):
    """A lane reads whole shards: the default sharding cuts a multiple of the lanes, at least two
    shards a lane, so no lane is left without data and each epoch deals new combinations; a
    dataset with fewer shards than lanes is refused for training, and one that deals badly warns."""
    cfg = RunConfig(task=TaskConfig(name="random_walk", train_docs=1920, eval_docs=20), train=TrainConfig(lanes=96))
    prepare_dataset(cfg, tmp_path / "walks")
    for split, shards in (("train-64", 192), ("valid", 20)):
        counts = [s.documents for s in Dataset(tmp_path / "walks").shards(split)]
        assert len(counts) == shards and max(counts) - min(counts) <= 1
    spec = LoaderSpec(str(tmp_path / "walks"), "train-64", 96, 64, 8, seed=0, shuffle=True)
    loader = LaneLoader(spec)
    deals = [[{shard.path for shard in lane} for lane in loader.plan(epoch).lanes] for epoch in (0, 1)]
    assert sorted(map(sorted, deals[0])) != sorted(map(sorted, deals[1]))  # other combinations, not only other lanes
    assert deal_warning(spec, loader.shards) is None
    assert content_hash(cfg) != content_hash(RunConfig(task=cfg.task, train=TrainConfig(lanes=128)))
    with pytest.raises(DataError, match=r"split train-64 has 192 shards \(1920 documents\) for 256 lanes"):
        LaneLoader(dataclasses.replace(spec, lanes=256))
    # One shard a lane: every epoch the same batches. 1.5 shards a lane: half the lanes pad half the epoch.
    assert "192 shards for 192 lanes, so epochs repeat batches" in deal_warning(dataclasses.replace(spec, lanes=192), loader.shards)
    uneven = deal_warning(dataclasses.replace(spec, lanes=128), loader.shards)
    assert "192 shards for 128 lanes, so epochs repeat" in uneven
    assert 60 <= int(re.search(r"(\d+)% of each epoch's lane steps hold documents", uneven)[1]) <= 80, uneven


def test_bpe_reads_utf8_and_names_a_document_that_is_not(tmp_path):
    corpus = tmp_path / "book.txt"
    text = " ".join(f"café {i} naïve" for i in range(900)).encode()
    text = b"a" * next(n for n in range(200) if text[(n + len(text)) * 9 // 10 - n] & 0xC0 == 0x80) + text
    corpus.write_bytes(text)  # cut by bytes at 90/5/5%: the train split ends inside a character
    task = TaskConfig(name="text", path=str(corpus), tokenizer="bpe", bpe_vocab=300)
    manifest = prepare_dataset(RunConfig(task=task, train=TrainConfig(lanes=8)), tmp_path / "ok")
    assert manifest["splits"]["train"]["documents"] >= 8 and manifest["splits"]["valid"]["documents"] == 1  # a piece per training lane
    corpus.write_bytes(b"text, then a byte that is not UTF-8: \xff, then more text" * 20)
    with pytest.raises(DataError, match=f"{corpus}, the train split: not UTF-8 text at file byte 37"):
        prepare_dataset(RunConfig(task=task), tmp_path / "bad")
    with pytest.raises(DataError, match=f"{corpus}: not UTF-8 text at file byte 37"):  # the one file as one document
        prepare_dataset(RunConfig(task=dataclasses.replace(task, format="files")), tmp_path / "bad_file")
    # In a directory, the error names the file.
    folder = tmp_path / "folder"
    folder.mkdir()
    empty = next(f"-empty{k}.txt" for k in range(100) if TextTask._split_of(f"-empty{k}.txt") == "train")
    (folder / empty).write_bytes(b"")  # first in its split and no document: the names must still line up
    sized_0 = next(f"-proc{k}.txt" for k in range(100) if TextTask._split_of(f"-proc{k}.txt") == "train")
    (folder / sized_0).symlink_to("/proc/cpuinfo")  # its size reads 0, its content does not: a document
    for i in range(40):
        (folder / f"{i:02d}.txt").write_text(f"plain text {i} " * 20)
    latin = next(f"{i:02d}.txt" for i in range(40) if TextTask._split_of(f"{i:02d}.txt") == "train")
    (folder / latin).write_bytes("caf\xe9 in Latin-1".encode("latin-1"))
    with pytest.raises(DataError, match=f"{folder / latin}: not UTF-8 text at file byte 3"):
        prepare_dataset(RunConfig(task=dataclasses.replace(task, path=str(folder))), tmp_path / "bad_folder")


def test_one_text_is_cut_into_pieces_that_deal_evenly_to_the_lanes(tmp_path):
    """One text is cut into a multiple of the split's shards (two a lane by default) of near-equal
    lengths, so no lane's epoch is longer; pieces of piece_len tokens count their start token;
    too little text for the lanes is refused."""
    corpus = tmp_path / "book.txt"
    corpus.write_bytes(bytes(range(32, 127)) * 11)  # 1,045 bytes, 940 in the train split
    task = TaskConfig(name="text", path=str(corpus))
    prepare_dataset(RunConfig(task=task, train=TrainConfig(lanes=64)), tmp_path / "lanes")
    lengths = [len(doc.tokens) for doc in Dataset(tmp_path / "lanes").documents("train")]
    assert len(lengths) == 128 and max(lengths) - min(lengths) <= 1 and sum(lengths) == 940 + 128
    assert len(Dataset(tmp_path / "lanes").shards("train")) == 128
    prepare_dataset(RunConfig(task=dataclasses.replace(task, piece_len=10), train=TrainConfig(lanes=1)), tmp_path / "pieces")
    lengths = [len(doc.tokens) for doc in Dataset(tmp_path / "pieces").documents("train")]  # 105 pieces of 9: 2 x 64 shards
    assert len(lengths) == 128 and max(lengths) <= 10 and sum(lengths) - len(lengths) == 940
    corpus.write_bytes(b"x" * 60)
    with pytest.raises(DataError, match="the train split has 54 tokens .* fewer than train.lanes 64"):
        prepare_dataset(RunConfig(task=task, train=TrainConfig(lanes=64)), tmp_path / "few")


def test_bpe_drops_a_cut_character_only_where_the_splits_meet(tmp_path):
    """Bytes of a character cut at a split boundary are dropped; bad bytes at the file's own start
    or end are an error, and an error names the byte's place in the file."""
    corpus = tmp_path / "book.txt"
    task = TaskConfig(name="text", path=str(corpus), tokenizer="bpe", bpe_vocab=300)
    corpus.write_bytes(b"plain text " * 100 + "\u20ac".encode()[:2])  # the file ends inside a character
    with pytest.raises(DataError, match=f"{corpus}, the test split: not UTF-8 text at file byte 1100"):
        prepare_dataset(RunConfig(task=task), tmp_path / "end")
    corpus.write_bytes(b"plain text " * 93 + b"\xff" + b"plain text " * 7)  # byte 1,023: in the valid split
    with pytest.raises(DataError, match=f"{corpus}, the valid split: not UTF-8 text at file byte 1023"):
        prepare_dataset(RunConfig(task=task), tmp_path / "valid")


def test_data_dir_may_start_at_the_home_directory(dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(dataset.parent))
    cfg = RunConfig(task=TaskConfig(name="text", path=json.loads((dataset / MANIFEST).read_text())["source"]["path"]),
                    data=DataConfig(dir=f"~/{dataset.name}"))
    assert dataset_dir(cfg) == dataset


def test_a_dataset_that_cannot_be_written_is_named_and_leaves_nothing(tmp_path):
    """A full disk, as a file-size limit makes it: every file past 4 KiB fails to grow (EFBIG)."""
    import resource

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    out = tmp_path / "walk"
    prepare = [sys.executable, "-m", "stairscale.cli", "prepare-data", "--out", str(out),
               "--set", "task.eval_docs=8", "--set", "task.train_docs=64", "--set", "train.lanes=4"]
    done = subprocess.run(prepare, capture_output=True, text=True, preexec_fn=limit_file_size)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert f"stairscale: error: dataset {out} could not be written ([Errno 27] File too large); nothing was put in place" in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_document_groups_cover_every_document_once_in_order():
    lengths = np.array([5, 3, 10, 1, 1, 1, 7])
    assert document_groups(lengths, 8) == [(0, 2), (2, 3), (3, 7)]
    assert document_groups(lengths, 100) == [(0, 7)]
    assert document_groups(lengths, 1) == [(i, i + 1) for i in range(7)]


def test_a_lane_packs_its_shard_a_group_of_documents_at_a_time(dataset, monkeypatch):
    """The blocks a lane reads, packed a few documents at a time, are the whole shard packed at once."""
    data = Dataset(dataset)
    shards = data.shards("train")
    spec = LoaderSpec(str(dataset), "train", 1, 16, 4, seed=0, shuffle=False)
    monkeypatch.setattr(loader, "PACK_TOKENS", 50)  # one or two of the test corpus's documents per block
    blocks = list(loader._lane_blocks(spec, data, shards[:2], 0))
    whole = []
    for shard in shards[:2]:
        docs = data.read_shard(shard)
        whole.append(pack(docs.tokens, docs.labels, docs.lengths, docs.ids, 4, data.vocab.pad_id))
    assert len(blocks) > 2 and np.array_equal(np.concatenate(blocks, axis=1), np.concatenate(whole, axis=1))
