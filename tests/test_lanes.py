import numpy as np

from stairscale.data.lanes import LaneStream, pack
from stairscale.data.tasks import IGNORE, Document

PAD, BOS = 0, 1


def doc(length, first=10, labels=False):
    tokens = np.concatenate([[BOS], np.arange(first, first + length - 1)]).astype(np.uint16)
    return Document(tokens, (tokens.astype(np.int32) + 100) if labels else None)


def block(docs, first_id, chunk):
    labels = np.concatenate([d.labels for d in docs]) if docs[0].labels is not None else None
    lengths = [len(d.tokens) for d in docs]
    return pack(np.concatenate([d.tokens for d in docs]).astype(np.int64), labels, lengths, np.arange(len(docs)) + first_id, chunk, PAD)


def packed(docs, segment_len, chunk, steps):
    """Pack the documents as two blocks (two shards) and read `steps` segments of one lane."""
    half = max(1, len(docs) // 2)
    blocks = [block(docs[:half], 0, chunk)] + ([block(docs[half:], half, chunk)] if docs[half:] else [])
    stream = LaneStream(iter(blocks), PAD)
    tokens, targets, starts, pos, ids = np.concatenate([stream.take(segment_len) for _ in range(steps)], axis=1)
    return tokens, targets, starts.astype(bool), pos, ids


def test_documents_start_at_chunk_boundaries_with_reset_flags():
    docs = [doc(5, 10), doc(9, 20), doc(4, 40)]
    tokens, targets, starts, pos, ids = packed(docs, segment_len=8, chunk=4, steps=4)
    assert np.flatnonzero(starts).tolist() == [0, 8, 20]  # 5 -> padded to 8, 9 -> padded to 12
    real = pos >= 0
    assert (tokens[~real] == PAD).all() and (targets[~real] == IGNORE).all() and (ids[~real] == -1).all()
    assert tokens[real].tolist() == np.concatenate([d.tokens for d in docs]).tolist()  # each token once, in order
    assert ids[real].tolist() == [0] * 5 + [1] * 9 + [2] * 4


def test_language_model_targets_are_next_tokens_across_segments():
    tokens, targets, *_ = packed([doc(13)], segment_len=4, chunk=4, steps=4)
    assert targets[:12].tolist() == tokens[1:13].tolist()
    assert (targets[12:] == IGNORE).all()  # the last token has no next token; padding is never a target


def test_labelled_documents_keep_aligned_labels():
    tokens, targets, *_ = packed([doc(6, labels=True)], segment_len=4, chunk=2, steps=2)
    assert targets[:6].tolist() == (tokens[:6] + 100).tolist()


def test_lane_pads_once_its_documents_run_out():
    tokens, targets, starts, pos, ids = packed([doc(3)], segment_len=8, chunk=4, steps=2)
    assert (pos[4:] == -1).all() and (tokens[4:] == PAD).all() and not starts[4:].any()
