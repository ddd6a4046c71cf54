"""The semantics of the model family, pinned in float64 on tiny sizes."""

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from stairscale.config import ModelConfig
from stairscale.data.tasks import IGNORE
from stairscale.model.lm import StaircaseLM
from stairscale.model.provider import OutputHead
from stairscale.model.schedules import make_schedule
from stairscale.model.state import RecurrentState, Rows

VOCAB, PAD = 11, 0
TOL = 1e-6

STATEFUL = {
    "staircase_n2": dict(schedule="staircase", chunk=4, window=2, attn_lim=12),
    "staircase_n3": dict(schedule="staircase", chunk=4, window=3, attn_lim=12),
    "cached": dict(schedule="cached", chunk=4, window=2, cache_len=8, attn_lim=16),
    "global_cached": dict(schedule="global_cached", chunk=4, window=3, cache_len=40, attn_lim=52),
    "transformer_xl": dict(schedule="transformer_xl", mem_len=11, attn_lim=12),
    "ladder_memory": dict(schedule="ladder", repeats=2, mem_len=11, attn_lim=12),
}


def make_model(positions="relative", seed=0, **overrides):
    cfg = ModelConfig(d_model=16, n_layers=2, n_heads=2, d_ff=32, positions=positions, **overrides)
    torch.manual_seed(seed)
    return StaircaseLM(cfg, VOCAB, PAD).double().eval()


def stream(lanes=3, length=48, seed=1):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, VOCAB, (lanes, length), generator=gen)
    starts = torch.zeros(lanes, length, dtype=torch.bool)
    starts[:, 0] = True
    return tokens, starts


def run_segments(model, tokens, starts, lengths):
    state = RecurrentState.initial(tokens.shape[0])
    outputs, begin = [], 0
    for length in lengths:
        out, state = model.logprobs(tokens[:, begin : begin + length], starts[:, begin : begin + length], state)
        outputs.append(out)
        begin += length
    assert begin == tokens.shape[1]
    return torch.cat(outputs, dim=1)


@pytest.mark.parametrize("positions", ["relative", "rope"])
@pytest.mark.parametrize("name", sorted(STATEFUL))
def test_segmentation_invariance(name, positions):
    """One unbroken pass equals any segmentation, including M < (n-1)F and uneven segments."""
    model = make_model(positions, **STATEFUL[name])
    tokens, starts = stream()
    starts[1, 20] = True  # a second document in lane 1, chunk aligned
    whole = run_segments(model, tokens, starts, [48])
    assert whole.dtype == torch.float64  # compared in float64, not rounded to float32
    for lengths in ([8] * 6, [4] * 12, [16, 4, 8, 12, 8], [4, 4, 32, 8], [24, 24]):
        split = run_segments(model, tokens, starts, lengths)
        assert (split - whole).abs().max() < TOL, lengths


@pytest.mark.parametrize("schedule", [dict(schedule="transformer"), dict(schedule="ladder", repeats=2)])
def test_memoryless_models_see_only_their_segment(schedule):
    model = make_model(attn_lim=24, **schedule)
    tokens, starts = stream(length=32)
    split = run_segments(model, tokens, starts, [16, 16])
    alone = run_segments(model, tokens[:, 16:], torch.zeros_like(starts[:, 16:]), [16])
    whole = run_segments(model, tokens, starts, [32])
    assert (split[:, 16:] - alone).abs().max() < TOL
    assert (split[:, 16:] - whole[:, 16:]).abs().max() > 1e-3  # so they are not segmentation invariant


def reference_staircase(model, tokens):
    """The staircase by its definition: every step recomputes its whole window from scratch. With a
    cache, the window also sees the final rows of the `cache_len` tokens before it, at every layer."""
    cfg, core = model.cfg, model.core
    F, n = cfg.chunk, cfg.window
    chunks = tokens.shape[1] // F
    doc = torch.ones(tokens.shape, dtype=torch.long)
    pos = torch.arange(tokens.shape[1])
    embedded = model.embed(tokens)
    top = {}  # chunk -> its top output from the previous step
    finals = [None] * chunks
    for k in range(chunks + n - 1):
        window = [j for j in range(k - n + 1, k + 1) if 0 <= j < chunks]
        x = torch.cat([embedded[:, j * F : (j + 1) * F] if j == k else top[j] for j in window], dim=1)
        rows = torch.cat([pos[j * F : (j + 1) * F] for j in window])
        cache = None
        if cfg.cache_len and k - n + 1 > 0:  # chunks before the window are final
            before = torch.cat(finals[: k - n + 1], dim=1)[:, -cfg.cache_len :]
            cache = Rows(before[None], pos[(k - n + 1) * F - before.shape[1] : (k - n + 1) * F], doc[:, : before.shape[1]])
        out, _ = core(x, rows, doc[:, : len(rows)], cache)
        for i, j in enumerate(window):
            top[j] = out[:, i * F : (i + 1) * F]
            if k - j == n - 1:
                finals[j] = top[j]
    return model.head.logprobs(torch.cat(finals, dim=1))


STAIRCASES = {
    **{f"staircase_n{n}": dict(schedule="staircase", chunk=4, window=n, attn_lim=12) for n in (1, 2, 3)},
    "cached": STATEFUL["cached"],
    "global_cached": dict(schedule="global_cached", chunk=4, window=3, cache_len=16, attn_lim=28),  # the stream overflows the cache
}


@pytest.mark.parametrize("positions", ["relative", "rope"])
@pytest.mark.parametrize("name", sorted(STAIRCASES))
def test_staircase_matches_its_definition(name, positions):
    model = make_model(positions, **STAIRCASES[name])
    tokens, starts = stream(length=36)
    expected = reference_staircase(model, tokens)
    assert (run_segments(model, tokens, starts, [8, 4, 12, 12]) - expected).abs().max() < TOL


def reference_ladder(model, tokens):
    """The Ladder by its definition: R passes of the core over all of `tokens`. R = 1 is the
    Transformer."""
    h = model.embed(tokens)
    pos = torch.arange(tokens.shape[1])
    doc = torch.ones(tokens.shape, dtype=torch.long)
    for _ in range(model.cfg.repeats):
        h, _ = model.core(h, pos, doc)
    return model.head.logprobs(h)


@pytest.mark.parametrize("memory", [0, 11])
@pytest.mark.parametrize("schedule, repeats", [("transformer", 1), ("ladder", 1), ("ladder", 2), ("ladder", 3)])
def test_ladder_and_transformer_match_their_definition(schedule, repeats, memory):
    """Without memory each segment is on its own; with mem_len >= attn_lim - 1, segments of the
    stream give what one pass over the whole stream gives. Ladder with R = 1 is the Transformer."""
    if schedule == "transformer" and memory:
        schedule = "transformer_xl"
    model = make_model(schedule=schedule, repeats=repeats, mem_len=memory, attn_lim=12)
    tokens, starts = stream(length=24)
    if memory:
        expected = reference_ladder(model, tokens)
    else:
        expected = torch.cat([reference_ladder(model, tokens[:, :12]), reference_ladder(model, tokens[:, 12:])], dim=1)
    assert (run_segments(model, tokens, starts, [12, 12]) - expected).abs().max() < TOL


def test_every_token_gets_one_loss_term_from_its_final_pass():
    model = make_model(schedule="staircase", chunk=4, window=3, attn_lim=12)
    tokens, starts = stream(lanes=2, length=16)
    head_rows = []
    model.head.proj.register_forward_hook(lambda module, args, out: head_rows.append(out.shape[:2]))
    model.core.calls = 0
    logprobs, _ = model.logprobs(tokens, starts, RecurrentState.initial(2))
    assert head_rows == [torch.Size([2, 16])]  # the head sees each token once
    assert model.core.calls == 16 // 4 + 3 - 1  # M/F + n - 1 sequential core calls
    # The row given to the head is the n-th pass: it matches the definition only at pass n.
    assert (logprobs - reference_staircase(model, tokens)).abs().max() < TOL


def reference_layer(layer, cfg, table, x, context, positions):
    """One pre-norm layer as STAIRCASE.md writes it, one (query, key) pair at a time: x [T, d] are
    the query rows, context [C, d] earlier layer inputs, positions [C + T] those of both. Score
    (q.k + q.p[attn_lim - 1 - d]) / sqrt(head_dim) for 0 <= d < attn_lim; RoPE with base 10000 on
    the two halves of each head; one LayerNorm for queries and keys/values."""
    heads, head_dim = cfg.n_heads, cfg.d_model // cfg.n_heads

    def layer_norm(rows, norm):  # eps 1e-5
        return torch.nn.functional.layer_norm(rows, rows.shape[-1:], norm.weight, norm.bias, eps=1e-5)

    def linear(rows, proj, bias):  # q, k, v, o have no bias; the FFN's have
        return torch.nn.functional.linear(rows, proj.weight, proj.bias if bias else None)

    normed = layer_norm(torch.cat([context, x]), layer.norm1)
    q, k, v = (linear(rows, proj, bias=False).view(len(rows), heads, head_dim) for proj, rows in
               ((layer.attn.q, normed[len(context):]), (layer.attn.k, normed), (layer.attn.v, normed)))
    query_positions = positions[len(context):]
    if cfg.positions == "rope":
        def rotate(t, pos):
            half = head_dim // 2
            angle = pos.double()[:, None, None] * 10000.0 ** (-torch.arange(half, dtype=torch.float64) / half)
            a, b = t[..., :half], t[..., half:]
            return torch.cat([a * angle.cos() - b * angle.sin(), b * angle.cos() + a * angle.sin()], dim=-1)
        q, k = rotate(q, query_positions), rotate(k, positions)
    scores = torch.full((heads, len(x), len(positions)), float("-inf"), dtype=x.dtype)
    for i, query_pos in enumerate(query_positions.tolist()):
        for j, key_pos in enumerate(positions.tolist()):
            d = query_pos - key_pos
            if 0 <= d < cfg.attn_lim:
                score = (q[i] * k[j]).sum(-1)
                if cfg.positions == "relative":
                    score = score + (q[i] * table[:, cfg.attn_lim - 1 - d]).sum(-1)
                scores[:, i, j] = score / head_dim**0.5
    attended = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(len(x), -1)
    h = x + linear(attended, layer.attn.o, bias=False)
    return h + linear(torch.relu(linear(layer_norm(h, layer.norm2), layer.ffn.fc1, bias=True)), layer.ffn.fc2, bias=True)


@pytest.mark.parametrize("positions", ["relative", "rope"])
def test_core_matches_the_layer_formula_of_the_spec(positions):
    """The other tests compare schedules built on the same Core; this one checks Core itself
    against the spec's formula, with carried context rows at a large position offset."""
    model = make_model(positions, attn_lim=6)
    cfg, core = model.cfg, model.core
    gen = torch.Generator().manual_seed(3)
    queries, context = torch.randn(5, 16, generator=gen, dtype=torch.float64), torch.randn(2, 4, 16, generator=gen, dtype=torch.float64)
    positions_all = torch.arange(1000, 1009)
    carried = Rows(context[:, None], positions_all[:4], torch.ones(1, 4, dtype=torch.long))
    out, _ = core(queries[None], positions_all[4:], torch.ones(1, 5, dtype=torch.long), carried)
    expected = queries
    for n in range(cfg.n_layers):
        expected = reference_layer(core.layers[str(n)], cfg, core.relative, expected, context[n], positions_all)
    assert (out[0] - expected).abs().max() < TOL


@pytest.mark.parametrize("name", sorted(STATEFUL))
@pytest.mark.parametrize("length", [4, 8, 20])
def test_schedules_know_each_calls_rows_in_advance(name, length):
    """The pipeline sizes its receive buffers with schedule.rows before a call is made."""
    model = make_model(**STATEFUL[name])
    tokens, starts = stream(lanes=2, length=length)
    rows = []
    model.core.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[1]))
    model.logprobs(tokens, starts, RecurrentState.initial(2))
    schedule = make_schedule(model.cfg)
    assert rows == [schedule.rows(step, length) for step in range(schedule.count(length))]


@pytest.mark.parametrize("positions", ["relative", "rope"])
def test_causality(positions):
    """No output depends on a later input: gradients to later embeddings are exactly zero."""
    for name, overrides in STATEFUL.items():
        model = make_model(positions, **overrides)
        tokens, starts = stream(lanes=1, length=16)
        captured = []

        def capture(module, args, out, captured=captured):
            out = out.detach().requires_grad_()
            captured.append(out)
            return out

        hook = model.embed.register_forward_hook(capture)
        logprobs, _ = model.logprobs(tokens, starts, RecurrentState.initial(1))
        hook.remove()
        assert len(captured) == 1 and captured[0].shape[1] == 16  # one embedding of the whole stream: every input seen
        for t in range(16):
            (grad,) = torch.autograd.grad(logprobs[0, t].max(), captured[0], retain_graph=True)
            assert grad[0, t + 1 :].abs().sum() == 0, (name, t)
            assert grad[0, : t + 1].abs().max() > 0, (name, t)


@pytest.mark.parametrize("positions", ["relative", "rope"])
@pytest.mark.parametrize("name", sorted(STATEFUL))
def test_document_equals_fresh_model(name, positions):
    """A chunk-aligned document gives the outputs a fresh model gives on it alone; lanes are independent."""
    model = make_model(positions, **STATEFUL[name])
    tokens, starts = stream(lanes=2, length=40, seed=3)
    tokens[0, 10:12] = PAD  # document 1 of lane 0 ends at 10, padded to the chunk boundary 12
    starts[0, 12] = True
    out = run_segments(model, tokens, starts, [8, 16, 16])
    alone = run_segments(model, tokens[:1, 12:], starts[:1, 12:], [28])
    assert (out[0, 12:] - alone[0]).abs().max() < TOL
    lane1 = run_segments(model, tokens[1:], starts[1:], [8, 16, 16])
    assert (out[1] - lane1[0]).abs().max() < TOL


def test_reset_forgets_carried_rows():
    model = make_model(**STATEFUL["staircase_n2"])
    tokens, starts = stream(lanes=2, length=16)
    _, state = model.logprobs(tokens, starts, RecurrentState.initial(2))
    fresh, _ = model.logprobs(tokens, starts, RecurrentState.initial(2))
    reset = state.reset(torch.tensor([True, False]))
    no_starts = torch.zeros_like(starts)
    out, _ = model.logprobs(tokens, no_starts, reset)
    carried, _ = model.logprobs(tokens, no_starts, state)
    assert (out[0] - fresh[0]).abs().max() < TOL
    assert (out[1] - carried[1]).abs().max() < TOL
    assert (carried[0] - fresh[0]).abs().max() > 1e-3


def test_equal_parameter_counts():
    counts = {
        name: sum(p.numel() for p in make_model(**dict(overrides, attn_lim=52)).parameters())
        for name, overrides in STATEFUL.items()
    }
    counts["transformer"] = sum(p.numel() for p in make_model(schedule="transformer", attn_lim=52).parameters())
    assert len(set(counts.values())) == 1, counts


@pytest.mark.parametrize("positions", ["relative", "rope"])
def test_staircase_n1_is_a_chunked_transformer(positions):
    staircase = make_model(positions, schedule="staircase", chunk=4, window=1, attn_lim=12)
    transformer = make_model(positions, schedule="transformer", attn_lim=12)
    tokens, starts = stream(length=24)
    expected = run_segments(transformer, tokens, starts, [4] * 6)
    assert (run_segments(staircase, tokens, starts, [24]) - expected).abs().max() < TOL


def test_state_dict_round_trip():
    model = make_model(**STATEFUL["cached"])
    tokens, starts = stream(length=16)
    _, state = model.logprobs(tokens, starts, RecurrentState.initial(3))
    restored = RecurrentState.initial(3)
    restored.load_state_dict({k: v.clone() for k, v in state.state_dict().items()})
    a, _ = model.logprobs(tokens, starts * False, state)
    b, _ = model.logprobs(tokens, starts * False, restored)
    assert torch.equal(a, b)
    assert set(state.rows) == {"step0", "cache"}


def test_a_state_or_segment_the_model_cannot_read_is_refused():
    """A state carried by a model of another depth, or a segment that is not whole chunks, is an
    error, not a silent misreading (every layer reading layer 0's rows; a dropped tail)."""
    tokens, starts = stream(length=16)
    _, state = make_model(**STATEFUL["staircase_n2"]).logprobs(tokens, starts, RecurrentState.initial(3))
    deeper = StaircaseLM(ModelConfig(**{**STATEFUL["staircase_n2"], "d_model": 16, "n_layers": 3, "n_heads": 2, "d_ff": 32}), VOCAB, PAD).double()
    with pytest.raises(ValueError, match="carried rows hold 2 layers, the core has 3"):
        deeper.logprobs(tokens, starts * False, state)
    with pytest.raises(ValueError, match="a segment of 10 tokens is not a whole number of chunks of 4"):
        make_model(**STATEFUL["staircase_n2"]).logprobs(tokens[:, :10], starts[:, :10], RecurrentState.initial(3))


def test_scores_are_the_targets_negative_log_likelihood_and_the_argmax():
    """Scores.nll is -log softmax at the target, 0 where the target is IGNORE; predicted is the
    most likely token. Computed here from the head's weights with plain functional ops."""
    model = make_model(**STATEFUL["staircase_n2"])
    tokens, starts = stream(lanes=2, length=16)
    gen = torch.Generator().manual_seed(5)
    targets = torch.randint(0, VOCAB, (2, 16), generator=gen)
    targets[:, 0] = 0  # the first class too (IGNORE is clamped to it for the gather)
    ignored = torch.rand(2, 16, generator=gen) < 0.3
    ignored[0, 1] = True
    targets[ignored] = IGNORE
    scores, _ = model(tokens, starts, targets, RecurrentState.initial(2))
    final, _ = model.body(tokens, starts, RecurrentState.initial(2))
    head = model.head
    logits = torch.nn.functional.linear(torch.nn.functional.layer_norm(final, (16,), head.norm.weight, head.norm.bias, 1e-5),
                                        head.proj.weight, head.proj.bias)
    logprobs = logits - logits.logsumexp(-1, keepdim=True)
    assert torch.equal(scores.nll[ignored], torch.zeros(int(ignored.sum()), dtype=scores.nll.dtype))
    expected = torch.stack([-logprobs[b, t, targets[b, t]] for b, t in (~ignored).nonzero().tolist()])
    assert (scores.nll[~ignored] - expected).abs().max() < 1e-5  # the head scores in float32
    assert (scores.nll[~ignored] > 0).all()
    assert torch.equal(scores.predicted, logits.argmax(-1))


def test_initialisation_is_the_authors():
    """N(0, 1) embedding; the output projections of attention (wo) and of the FFN (fc2, and its
    bias) are PyTorch's default Linear init U(-1/sqrt(fan_in), 1/sqrt(fan_in)) divided by sqrt(2L);
    the other projections keep that default. Stds from a model large enough to estimate them to a
    few percent. The relative table is N(0, 1/head_dim); the head keeps the default init."""
    layers = 4
    cfg = ModelConfig(d_model=256, n_layers=layers, n_heads=4, d_ff=1024, positions="relative", attn_lim=256)
    torch.manual_seed(0)
    model = StaircaseLM(cfg, 300, PAD)
    uniform = lambda fan_in: 1 / (3 * fan_in) ** 0.5  # std of U(-b, b) with b = 1/sqrt(fan_in)
    scaled = 1 / (2 * layers) ** 0.5
    embedding = model.embed.weight
    assert abs(embedding.mean().item()) < 0.01 and embedding.std().item() == pytest.approx(1.0, rel=0.03)
    for layer in model.core.layers.values():
        for unscaled in (layer.attn.q.weight, layer.attn.k.weight, layer.attn.v.weight):
            assert unscaled.std().item() == pytest.approx(uniform(256), rel=0.03)
        assert layer.ffn.fc1.weight.std().item() == pytest.approx(uniform(256), rel=0.03)
        assert layer.ffn.fc1.bias.std().item() == pytest.approx(uniform(256), rel=0.15)
        assert layer.attn.o.weight.std().item() == pytest.approx(uniform(256) * scaled, rel=0.03)
        assert layer.ffn.fc2.weight.std().item() == pytest.approx(uniform(1024) * scaled, rel=0.03)
        assert layer.ffn.fc2.bias.std().item() == pytest.approx(uniform(1024) * scaled, rel=0.15)
        assert layer.ffn.fc2.bias.abs().max().item() <= 1024**-0.5 * scaled
    assert abs(model.core.relative.mean().item()) < 0.01 and model.core.relative.std().item() == pytest.approx(64**-0.5, rel=0.03)
    assert model.head.proj.weight.std().item() == pytest.approx(uniform(256), rel=0.03)


class HostReads(TorchDispatchMode):
    """Records the operations that make the host wait for the device: reading a value back, or an
    output whose shape depends on values (boolean indexing, nonzero)."""

    READS = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.is_nonzero", "aten.equal",
             "aten._unique2", "aten.unique_consecutive", "aten.unique_dim"}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        boolean_index = name in ("aten.index", "aten.index_put", "aten.index_put_") and any(
            i is not None and i.dtype == torch.bool for i in args[1])
        repeats_by_value = name == "aten.repeat_interleave" and isinstance(args[0], torch.Tensor) and len(args) > 1 and isinstance(args[1], torch.Tensor)
        if name in self.READS or boolean_index or repeats_by_value:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", sorted(STATEFUL))
def test_a_train_step_never_waits_for_the_device(name):
    """So that on a GPU the host can queue the next core calls while the device runs."""
    model = make_model(**STATEFUL[name]).train()
    tokens, starts = stream(length=24)
    starts[1, 12] = True
    state = RecurrentState.initial(3)
    with HostReads() as reads:
        for segment in (slice(0, 8), slice(8, 16), slice(16, 24)):
            scores, state = model(tokens[:, segment], starts[:, segment], tokens[:, segment], state)
            scores.nll.sum().backward()
    assert reads.seen == []


class DeviceReads(HostReads):
    """HostReads for a whole training step on the CPU, where the host's tensors and the device's
    look alike: it follows which tensors a GPU run would hold on the device, and records only the
    reads of those. On the device: parameters (and all computed from them: activations,
    gradients, optimizer state), recurrent state, tensors made with `device=` a torch.device (the
    run's device: torch's optimizer keeps its step counters on the host with device="cpu") or
    moved with `.to(device)` (a copy here, as a transfer to a GPU makes), and all computed from
    any of them. Reads of what the host batch alone gives (e.g. counting its supervised targets)
    are allowed. Use `with device_reads, device_reads.transfers:`.

    One CPU kernel reads where the CUDA one does not: one_hot with num_classes checks the range of
    its input with min().item() and max().item() on the CPU only (ATen's one_hot: "rely on device
    asserts from scatter to avoid sync here"); those reads are not counted."""

    def __init__(self, *device_tensors):
        super().__init__()
        self.on_device = {}  # id -> tensor (held, so that an id is never reused)
        self.cpu_only = 0  # inside a call whose reads a CUDA kernel does not make
        self.mark(device_tensors)
        reads = self

        class Transfers(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if func in (torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.tolist) and reads.holds(args[0]):
                    reads.seen.append(func.__name__)
                cpu_only = func is torch.nn.functional.one_hot and kwargs.get("num_classes", args[1] if len(args) > 1 else -1) != -1
                reads.cpu_only += cpu_only
                try:
                    out = func(*args, **kwargs)
                finally:
                    reads.cpu_only -= cpu_only
                if func is torch.Tensor.to and (any(isinstance(a, (torch.device, str)) for a in args[1:]) or "device" in kwargs):
                    out = out.clone() if out is args[0] else out
                    reads.mark([out])
                elif isinstance(kwargs.get("device"), torch.device) or (func is torch.Tensor.to and reads.holds(args[0])):
                    reads.mark(tree_flatten(out)[0])
                return out

        self.transfers = Transfers()

    def mark(self, tensors) -> None:
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self.on_device[id(t)] = t

    def holds(self, *tensors) -> bool:
        return any(isinstance(t, torch.Tensor) and id(t) in self.on_device for t in tensors)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = tree_flatten((args, kwargs))[0]
        before = len(self.seen)
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if self.cpu_only or not self.holds(*inputs):
            del self.seen[before:]  # host values only (or a CPU kernel's own check): no wait for the device
        else:
            self.mark(tree_flatten(out)[0])
        return out


@pytest.mark.parametrize("overrides", [
    [],
    ["model.schedule=cached", "model.cache_len=8", "model.attn_lim=16", "train.grad_accum=2"],
    ["train.carried_offset_stages=[0]", "train.grad_accum=2"],  # labels shifted on the device
])
def test_a_trainer_step_never_waits_for_the_device(tmp_path, overrides):
    """Trainer.train_step as a whole (moving the batch, forward and backward of every micro-batch,
    the tally, the optimizer step, carried offsets) queues its work without reading a value of the
    device back; the host reads only what the batch it was given tells."""
    from stairscale.config import load_config
    from stairscale.train.metrics import Tally
    from stairscale.train.trainer import Trainer

    cfg = load_config(None, ["model.d_model=16", "model.d_ff=32", "model.n_heads=2", "model.chunk=4", "model.attn_lim=16",
                             "train.lanes=4", "train.segment_len=16", "train.steps=3", "train.warmup_steps=1", "task.train_lengths=[24]",
                             "task.train_length_steps=[0]", "task.eval_docs=4", "task.train_docs=40",
                             f"data.cache={tmp_path / 'data'}", f"run_dir={tmp_path / 'run'}", *overrides])
    trainer = Trainer(cfg, quiet=True)
    tally = Tally(labelled=True, byte_level=False)
    reads = DeviceReads(*trainer.model.parameters())  # one for every step: the optimizer's state stays marked
    for step, batch, states in trainer.batches():
        reads.mark([t for state in states for t in (state.doc, *(r.h for r in state.rows.values()))])
        reads.mark([shift.offset for shift in trainer.label_shifts or []])
        with reads, reads.transfers:
            loss, grad_norm = trainer.train_step(batch, states, 1e-3, tally)
        assert reads.seen == [], step
    assert len(reads.on_device) > 100  # it did follow the device's tensors
    assert tally.count > 0 and 0 < float(loss) < 10 and float(grad_norm) > 0


def test_activation_checkpointing_recomputes_and_gives_the_same_gradients():
    grads, recomputed = [], []
    for checkpointing in (False, True):
        model = make_model(**STATEFUL["cached"], activation_checkpointing=checkpointing).train()
        layer_calls = []
        model.core.layers["0"].register_forward_hook(lambda *_: layer_calls.append(torch.is_grad_enabled()))
        tokens, starts = stream(length=16)
        state = RecurrentState.initial(3)
        for segment in (slice(0, 8), slice(8, 16)):
            logprobs, state = model.logprobs(tokens[:, segment], starts[:, segment], state)
            forward_calls = len(layer_calls)
            logprobs.sum().backward()
            recomputed.append(len(layer_calls) - forward_calls)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert (grads[0] - grads[1]).abs().max() < 1e-10
    calls_per_segment = 8 // 4 + 2 - 1
    assert recomputed == [0, 0, calls_per_segment, calls_per_segment]  # backward reruns every core call


def train_segments(model, lengths=(8, 8, 8)):
    """Log-probs and gradients of a few segments, each back-propagated on its own."""
    tokens, starts = stream(length=sum(lengths))
    starts[1, 12] = True
    state, outputs, begin = RecurrentState.initial(3), [], 0
    for length in lengths:
        logprobs, state = model.logprobs(tokens[:, begin : begin + length], starts[:, begin : begin + length], state)
        logprobs.sum().backward()
        outputs.append(logprobs.detach())
        begin += length
    return torch.cat(outputs, dim=1), torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("name, positions, mode", [
    ("cached", "relative", "default"), ("staircase_n3", "rope", "default"), ("ladder_memory", "rope", "default"),
    ("staircase_n3", "rope", "reduce-overhead"),
])
def test_compiled_core_calls_match_eager(name, positions, mode):
    """torch.compile of the core call (whole graph, no breaks) computes what eager computes; the
    aot_eager backend checks the capture and the autograd graph without a C++ toolchain (it
    ignores the mode: here reduce-overhead checks only the copies made for CUDA graphs)."""
    eager = train_segments(make_model(positions, **STATEFUL[name]).train())
    model = make_model(positions, **STATEFUL[name]).train()
    model.core.compile_calls(mode, backend="aot_eager")
    torch._dynamo.utils.counters.clear()
    compiled = train_segments(model)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2  # it did compile, per shape of call
    assert (compiled[0] - eager[0]).abs().max() < 1e-10
    assert (compiled[1] - eager[1]).abs().max() < 1e-10


@pytest.mark.parametrize("key", ["dropout", "attn_dropout"])
def test_dropout_acts_in_training_only(key):
    """Each dropout draws a new mask per forward pass in training, and evaluation is the model
    without it (the same weights with the rate 0)."""
    tokens, starts = stream()
    model, plain = make_model(**{key: 0.5}), make_model()
    assert model.state_dict().keys() == plain.state_dict().keys()
    plain.load_state_dict(model.state_dict())

    def log_probs(m):
        return m.body(tokens, starts, RecurrentState.initial(3))[0]

    assert torch.equal(log_probs(model), log_probs(plain))  # eval mode: dropout off
    model.train()
    first, second = log_probs(model), log_probs(model)
    assert not torch.allclose(first, second) and not torch.allclose(first, log_probs(plain))


def test_the_output_head_scores_in_full_precision_under_bf16_autocast():
    """Logits rounded to bf16 would shift the loss and tie the argmax: the head runs outside autocast."""
    head = OutputHead(16, 24)
    h = 8 * torch.randn(3, 5, 16)
    targets = torch.randint(0, 24, (3, 5))
    want = head(h, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = head(h, targets)
        assert torch.is_autocast_enabled("cpu")  # the head leaves it on for the caller
    assert got.nll.dtype == torch.float32 and torch.equal(got.nll, want.nll) and torch.equal(got.predicted, want.predicted)
