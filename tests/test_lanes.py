import numpy as np
import torch

from stairscale.data.lanes import deal, lane_batches
from stairscale.data.tasks import IGNORE, Document

PAD, BOS = 0, 1


def doc(length, first=10, labels=False):
    tokens = np.concatenate([[BOS], np.arange(first, first + length - 1)]).astype(np.uint16)
    return Document(tokens, (tokens.astype(np.int32) + 100) if labels else None)


def collect(batches):
    return {name: torch.cat([getattr(b, name) for b in batches], dim=1) for name in ("tokens", "targets", "doc_start", "doc_pos")}


def test_documents_start_at_chunk_boundaries_with_reset_flags():
    docs = [doc(5, 10), doc(9, 20), doc(4, 40)]
    out = collect(list(lane_batches([iter(docs)], segment_len=8, chunk=4, pad_id=PAD)))
    starts = torch.nonzero(out["doc_start"][0]).flatten().tolist()
    assert starts == [0, 8, 20]  # 5 -> padded to 8, 9 -> padded to 12
    assert all(s % 4 == 0 for s in starts)
    real = out["doc_pos"][0] >= 0
    assert torch.equal(out["tokens"][0][~real], torch.full(((~real).sum(),), PAD))
    assert (out["targets"][0][~real] == IGNORE).all()
    # Every token of every document appears exactly once, in order.
    expected = np.concatenate([d.tokens for d in docs])
    assert out["tokens"][0][real].tolist() == expected.tolist()


def test_language_model_targets_are_next_tokens_across_segments():
    out = collect(list(lane_batches([iter([doc(13)])], segment_len=4, chunk=4, pad_id=PAD)))
    tokens, targets = out["tokens"][0], out["targets"][0]
    assert targets[:12].tolist() == tokens[1:13].tolist()
    assert (targets[12:] == IGNORE).all()  # the last token has no next token; padding is never a target


def test_labelled_documents_keep_aligned_labels():
    out = collect(list(lane_batches([iter([doc(6, labels=True)])], segment_len=4, chunk=2, pad_id=PAD)))
    assert out["targets"][0][:6].tolist() == (out["tokens"][0][:6] + 100).tolist()


def test_finite_lanes_end_together_and_are_padded():
    lanes = [iter([doc(20)]), iter([doc(3)])]
    batches = list(lane_batches(lanes, segment_len=8, chunk=4, pad_id=PAD))
    assert len(batches) == 3
    assert (batches[-1].doc_pos[1] == -1).all()


def test_deal_balances_tokens():
    docs = [doc(n) for n in (50, 10, 10, 10, 10, 10, 40)]
    dealt = deal(docs, 2)
    loads = [sum(len(d.tokens) for d in lane) for lane in dealt]
    assert max(loads) - min(loads) <= max(len(d.tokens) for d in docs)  # greedy in order: [90, 50]
    assert sorted(loads) == [50, 90]
    assert sum(len(lane) for lane in dealt) == len(docs)
