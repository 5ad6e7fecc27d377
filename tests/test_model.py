"""GPT forward pass and generation: causality, padding invariance, KV cache.

    python -m pytest -q tests/test_model.py
"""
import ast

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import head
import model as model_module
from head import token_logps
from model import GPT, IGNORE_INDEX, GPTConfig, KVCache

V = 64


@pytest.fixture
def model():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=V, block_size=64, n_layer=2, n_head=2, n_embd=32)).eval()


def test_changing_later_tokens_leaves_earlier_logits_unchanged(model):
    x = torch.randint(4, V, (2, 16))
    t = 7
    y = x.clone()
    y[:, t + 1:] = torch.randint(4, V, (2, 16 - t - 1))
    with torch.no_grad():
        a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :t + 1], b[:, :t + 1], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, t + 1:], b[:, t + 1:])


def test_logits_do_not_depend_on_padding_or_batch(model):
    seq = torch.randint(4, V, (9,))
    others = [torch.randint(4, V, (n,)) for n in (3, 14)]
    with torch.no_grad():
        alone = model(seq[None])[0]  # (9, V)
        pad = 5
        left = torch.cat([torch.zeros(pad, dtype=torch.long), seq])[None]
        left_mask = torch.cat([torch.zeros(pad), torch.ones(9)]).long()[None]
        from_left = model(left, left_mask)[0, pad:]
        right = torch.cat([seq, torch.zeros(pad, dtype=torch.long)])[None]
        right_mask = torch.cat([torch.ones(9), torch.zeros(pad)]).long()[None]
        from_right = model(right, right_mask)[0, :9]
        # right-padded batch with a shorter and a longer sequence
        T = 14
        batch = torch.zeros(3, T, dtype=torch.long)
        mask = torch.zeros(3, T, dtype=torch.long)
        for i, s in enumerate([others[0], seq, others[1]]):
            batch[i, :len(s)], mask[i, :len(s)] = s, 1
        from_batch = model(batch, mask)[1, :9]
    for got in (from_left, from_right, from_batch):
        torch.testing.assert_close(got, alone, rtol=0, atol=1e-5)


def test_pad_tokens_are_never_attended(model):
    """Changing what sits in the pad slots changes no real token's logits."""
    x = torch.randint(4, V, (1, 12))
    mask = torch.ones(1, 12, dtype=torch.long)
    mask[0, :4] = 0  # left padding
    y = x.clone()
    y[0, :4] = torch.randint(4, V, (4,))
    with torch.no_grad():
        torch.testing.assert_close(model(x, mask)[0, 4:], model(y, mask)[0, 4:], rtol=0, atol=1e-6)


def test_incremental_cached_logits_equal_full_recompute(model):
    B, P, N = 3, 6, 8
    ids = torch.randint(4, V, (B, P + N))
    mask = torch.ones(B, P + N, dtype=torch.long)
    mask[0, :2] = 0  # prompts of different lengths, left-padded
    mask[2, :5] = 0
    with torch.no_grad():
        full = model(ids, mask)
        cache = KVCache(model.config, B, P + N)
        steps = [model(ids[:, :P], mask[:, :P], cache)]
        for t in range(P, P + N):
            steps.append(model(ids[:, t:t + 1], mask[:, :t + 1], cache))
    cached = torch.cat(steps, dim=1)
    real = mask.bool()
    torch.testing.assert_close(cached[real], full[real], rtol=0, atol=1e-5)


def _prompts():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(4, V, (n,), generator=g).tolist() for n in (3, 7, 1, 5)]


def test_greedy_generation_with_cache_equals_without(model):
    out_cached, mask_cached = model.generate(_prompts(), 12, stop_ids=[3], pad_id=0, temperature=0)
    out_full, mask_full = model.generate(_prompts(), 12, stop_ids=[3], pad_id=0, temperature=0,
                                         use_cache=False)
    assert torch.equal(out_cached, out_full) and torch.equal(mask_cached, mask_full)
    # and it continues each prompt exactly as an unpadded greedy loop over the plain forward does
    for i, p in enumerate(_prompts()):
        seq = list(p)
        for _ in range(12):
            with torch.no_grad():
                seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
        assert out_cached[i].tolist() == seq[len(p):]


def test_generation_stops_at_eos_and_masks_the_rest(model):
    prompts = _prompts()
    free, _ = model.generate(prompts, 12, stop_ids=[], pad_id=0, temperature=0)
    eos = int(free[1, 2])  # make sequence 1's third token the eos
    out, mask = model.generate(prompts, 12, stop_ids=[eos], pad_id=0, temperature=0)
    for i in range(len(prompts)):
        row = free[i].tolist()
        stop = row.index(eos) + 1 if eos in row else 12
        assert mask[i].tolist() == [1] * stop + [0] * (12 - stop)
        assert out[i, :stop].tolist() == row[:stop]
        assert (out[i, stop:] == 0).all()


def test_sampling_is_seedable_and_topk1_or_tiny_topp_is_greedy(model):
    greedy, _ = model.generate(_prompts(), 10, stop_ids=[], pad_id=0, temperature=0)
    top1, _ = model.generate(_prompts(), 10, stop_ids=[], pad_id=0, top_k=1,
                             generator=torch.Generator().manual_seed(0))
    nucleus, _ = model.generate(_prompts(), 10, stop_ids=[], pad_id=0, top_p=1e-6,
                                generator=torch.Generator().manual_seed(0))
    assert torch.equal(top1, greedy) and torch.equal(nucleus, greedy)
    a, _ = model.generate(_prompts(), 10, stop_ids=[], pad_id=0, generator=torch.Generator().manual_seed(7))
    b, _ = model.generate(_prompts(), 10, stop_ids=[], pad_id=0, generator=torch.Generator().manual_seed(7))
    c, _ = model.generate(_prompts(), 10, stop_ids=[], pad_id=0, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_top_k_draws_only_from_the_k_likeliest_tokens():
    from model import sample_token
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]])).repeat(2000, 1)
    draws = sample_token(logits, 1.0, 2, None, torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {0, 1}
    assert abs((draws == 0).float().mean().item() - 0.4 / 0.7) < 0.04
    nucleus = sample_token(logits, 1.0, None, 0.75, torch.Generator().manual_seed(0))
    assert set(nucleus.tolist()) == {0, 1, 2}  # 0.4 + 0.3 < 0.75, so the nucleus needs a third token


def test_generate_restores_training_mode(model):
    model.train()
    model.generate(_prompts(), 2, stop_ids=[3], pad_id=0, temperature=0)
    assert model.training


def test_flops_per_token_matches_hand_count():
    m = GPT(GPTConfig(vocab_size=100, block_size=32, n_layer=2, n_head=2, n_embd=16))
    # per layer: qkv 16*48 + proj 16*16 + fc 16*64 + proj 64*16, plus two LayerNorms of 16
    per_layer = 16 * 48 + 16 * 16 + 16 * 64 + 64 * 16 + 2 * 16
    n = 2 * per_layer + 100 * 16 + 16  # + tied embedding + final LayerNorm
    assert m.num_params() == n
    assert m.flops_per_token(32) == 6 * n + 12 * 2 * 16 * 32


@pytest.mark.parametrize("changes, message", [
    (dict(n_embd=30), "n_embd (30) must be a multiple of n_head (4) unless head_dim is given"),
    (dict(n_kv_head=3), "n_head (4) must be a multiple of n_kv_head (3)")])
def test_a_config_built_in_code_refuses_a_head_split_it_cannot_fill_its_defaults_from(changes, message):
    """GPTConfig itself checks only what its defaults need; a config read from a file meets
    hf.check_config (tests/test_hostile_folders.py)."""
    with pytest.raises(ValueError) as e:
        GPTConfig(**{**dict(n_head=4, n_embd=32), **changes})
    assert str(e.value) == message
    assert GPTConfig(n_head=4, n_kv_head=2, n_embd=32).head_dim == 8


def test_the_head_module_imports_nothing_of_the_project():
    """head.py sits below model.py: model.py imports it, never the other way, and it needs torch alone."""
    tree = ast.parse(open(head.__file__).read())
    imports = [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]
    imported = {node.module if isinstance(node, ast.ImportFrom) else alias.name
                for node in imports for alias in node.names}
    assert {name.split(".")[0] for name in imported} == {"torch"}


def test_token_logps_is_the_shifted_log_softmax_at_each_label_and_zero_where_ignored():
    """Against a float64 loop over rows and positions: the logits at t score the label at t + 1."""
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7) * 3
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 6, 0],
                           [IGNORE_INDEX, 1, 2, IGNORE_INDEX, IGNORE_INDEX]])
    out = token_logps(logits, labels)
    assert out.shape == (2, 4) and out.dtype == torch.float32
    for b in range(2):
        for t in range(4):
            label = int(labels[b, t + 1])
            expected = 0.0 if label == IGNORE_INDEX else logits[b, t].double().log_softmax(-1)[label].item()
            assert out[b, t].item() == pytest.approx(expected, abs=1e-6)
    assert token_logps(logits.bfloat16(), labels).dtype == torch.float32  # bfloat16 logits, float32 log-probs


@pytest.mark.parametrize("chunk, keep", [
    (2**24, 2**26), (2**24, 0),  # one chunk, kept or recomputed
    (64 * 3, 2**26), (64 * 3, 64 * 3 * 2), (64 * 3, 0),  # 3 rows a chunk: 6
    (64, 64 * 5)])  # one row a chunk, the first five kept
def test_label_logps_equal_the_full_softmax_in_value_and_gradient_in_any_chunking(monkeypatch, chunk, keep):
    """The model given labels (the head a chunk at a time, each chunk's softmax kept for the
    backward pass or computed again there, all, none or the first ones) against token_logps of
    its full logits in float64: values, and the gradients of a weighted sum with respect to the
    head and a block's weight."""
    monkeypatch.setattr(head, "HEAD_CHUNK", chunk)
    monkeypatch.setattr(head, "HEAD_KEEP", keep)
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16, tie_embeddings=False))
    ids = torch.randint(0, 64, (3, 10))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels[:, :3] = IGNORE_INDEX  # a prompt of three tokens
    weights = torch.rand(3, 9)

    def grads(out):
        m.zero_grad()
        (out * weights).sum().backward()
        return [m.lm_head.weight.grad.clone(), m.transformer.h[0].mlp.c_fc.weight.grad.clone()]

    got = m(ids, mask, labels=labels)
    got_grads = grads(got)
    m.double()
    full = -torch.nn.functional.cross_entropy(m(ids, mask)[:, :-1].transpose(1, 2), labels[:, 1:],
                                              ignore_index=IGNORE_INDEX, reduction="none")  # all float64
    assert got.dtype == torch.float32 and got.shape == (3, 9)
    assert (got[labels[:, 1:] == IGNORE_INDEX] == 0).all()
    torch.testing.assert_close(got.double(), full, rtol=0, atol=1e-5)
    for g, expected in zip(got_grads, grads(full)):
        torch.testing.assert_close(g.double(), expected, rtol=1e-4, atol=1e-6)


# one piece; 5 rows a chunk, 1 kept
@pytest.mark.parametrize("chunk, keep", [(2**24, 2**26), (64 * 5, 64 * 5)])
def test_label_logps_under_bfloat16_autocast_match_the_full_softmax_path(monkeypatch, chunk, keep):
    """bfloat16 matmuls in the forward and in the backward's recomputed chunks alike: values and
    gradients within bfloat16's precision of token_logps over the same autocast logits."""
    monkeypatch.setattr(head, "HEAD_CHUNK", chunk)
    monkeypatch.setattr(head, "HEAD_KEEP", keep)
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16, tie_embeddings=False))
    ids = torch.randint(0, 64, (2, 12))
    mask = torch.ones_like(ids)
    out = []
    for use_labels in (True, False):
        m.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logps = m(ids, mask, labels=ids) if use_labels else token_logps(m(ids, mask), ids)
        logps.sum().backward()
        out.append((logps.detach(), m.lm_head.weight.grad.clone(),
                    m.transformer.h[0].mlp.c_fc.weight.grad.clone()))
    (got, got_head, got_block), (full, full_head, full_block) = out
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, full, rtol=0, atol=2e-2)
    # the head's gradient sums the rows' bfloat16 products chunk by chunk in float32 (the full path
    # rounds the one product of all rows to bfloat16): equal within bfloat16's rounding
    torch.testing.assert_close(got_head, full_head, rtol=0, atol=1e-2 * full_head.abs().max().item())
    # each row's gradient into the network is one bfloat16 product either way: the recomputed
    # chunks must run in bfloat16 as the forward did, else the softmax is off by its rounding
    torch.testing.assert_close(got_block, full_block, rtol=0, atol=1e-4 * full_block.abs().max().item())


class CountMatmuls(TorchDispatchMode):
    """Counts the matrix products torch runs below autograd (F.linear's included)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm)
        return func(*args, **(kwargs or {}))


# full fine-tuning; LoRA's frozen head; a frozen body
@pytest.mark.parametrize("trained", ["both", "hidden", "head"])
def test_the_head_backward_computes_only_the_needed_gradients_and_recomputes_only_unkept_chunks(
        monkeypatch, trained):
    """12 labelled rows in chunks of 3 at temperature 0.7, the first two chunks' softmax kept:
    the backward pass multiplies once a chunk for each gradient that is needed, plus once for
    each chunk computed again; that gradient equals the float64 full softmax's, and the other
    is None."""
    monkeypatch.setattr(head, "HEAD_CHUNK", 3 * 16)
    monkeypatch.setattr(head, "HEAD_KEEP", 2 * 3 * 16)
    torch.manual_seed(0)
    hidden = torch.randn(2, 7, 8, requires_grad=trained != "head")
    weight = torch.randn(16, 8, requires_grad=trained != "hidden")
    labels = torch.randint(0, 16, (2, 7))
    weights = torch.rand(2, 6)
    out = head.label_logps(hidden, weight, labels, temperature=0.7)
    with CountMatmuls() as counted:
        (out * weights).sum().backward()
    chunks, recomputed = 4, 2
    assert counted.count == recomputed + chunks * (2 if trained == "both" else 1)
    h, w = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    logits = torch.nn.functional.linear(h, w) / 0.7
    full = -torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:],
                                              reduction="none")  # float64 throughout
    (full * weights).sum().backward()
    torch.testing.assert_close(out.double(), full, rtol=0, atol=1e-5)
    for got, expected in ((hidden, h), (weight, w)):
        if got.requires_grad:
            torch.testing.assert_close(got.grad.double(), expected.grad, rtol=1e-4, atol=1e-6)
        else:
            assert got.grad is None


def test_the_head_keeps_softmax_for_the_backward_only_where_a_gradient_will_flow(monkeypatch):
    """What label_logps lets HeadLogps keep: HEAD_KEEP probabilities when a gradient flows to
    the hidden states or the head, none under no_grad (DPO's reference, PPO's rollout scoring)
    or with nothing to train, where a kept softmax would only add to the peak."""
    keeps, apply = [], head.HeadLogps.apply
    monkeypatch.setattr(head.HeadLogps, "apply", lambda *args: keeps.append(args[-1]) or apply(*args))
    hidden, weight, labels = torch.randn(1, 4, 8), torch.randn(16, 8), torch.randint(0, 16, (1, 4))
    head.label_logps(hidden.requires_grad_(), weight, labels)
    head.label_logps(hidden, weight.requires_grad_(), labels)
    with torch.no_grad():
        head.label_logps(hidden, weight, labels)
    head.label_logps(hidden.detach(), weight.detach(), labels)
    assert keeps == [head.HEAD_KEEP, head.HEAD_KEEP, 0, 0]


def test_a_second_backward_through_the_kept_softmax_is_refused_or_equal(monkeypatch):
    """The backward pass overwrites the kept softmax in place: a second backward through the same
    graph (retain_graph=True) must then fail, never give another gradient."""
    monkeypatch.setattr(head, "HEAD_CHUNK", 2 * 16)
    torch.manual_seed(0)
    hidden, weight = torch.randn(1, 5, 8, requires_grad=True), torch.randn(16, 8, requires_grad=True)
    out = head.label_logps(hidden, weight, torch.randint(0, 16, (1, 5)))
    out.sum().backward(retain_graph=True)
    first = hidden.grad.clone(), weight.grad.clone()
    try:
        out.sum().backward()
    except RuntimeError as e:
        assert "modified by an inplace operation" in str(e)
    else:
        torch.testing.assert_close((hidden.grad, weight.grad), (2 * first[0], 2 * first[1]))


def test_a_batch_without_padding_takes_the_causal_fast_path_and_matches_the_masked_one(monkeypatch):
    """An all-ones attention mask goes to SDPA as is_causal with no mask; the same rows inside a
    padded batch take the masked path, and both give the same logits."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=16, pos="rope",
                      norm="rmsnorm", mlp="swiglu", n_kv_head=1))
    ids = torch.randint(0, 32, (3, 10))
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0  # the third row is padded
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(*args, **kwargs):
        calls.append((kwargs["attn_mask"] is None, kwargs["is_causal"]))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    with torch.no_grad():
        fast = m(ids[:2], mask[:2])
        assert calls == [(True, True)] * 2  # every layer: no mask, is_causal
        calls.clear()
        masked = m(ids, mask)[:2]
        assert calls == [(False, False)] * 2
    torch.testing.assert_close(fast, masked, rtol=0, atol=1e-5)


def test_label_logps_of_a_batch_with_no_label_are_zero():
    m = GPT(GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=1, n_embd=8))
    ids = torch.randint(0, 16, (2, 5))
    out = m(ids, torch.ones_like(ids), labels=torch.full_like(ids, IGNORE_INDEX))
    assert out.shape == (2, 4) and (out == 0).all()


def test_sequence_longer_than_block_size_is_refused(model):
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_generation_stops_at_any_id_of_the_stop_set(model):
    """A folder's eos ids and its chat template's end-of-turn token all end a sequence."""
    prompts = _prompts()
    free, _ = model.generate(prompts, 12, stop_ids=[], pad_id=0, temperature=0)
    first, second = int(free[0, 3]), int(free[1, 1])  # a token of each of two sequences
    _, mask = model.generate(prompts, 12, stop_ids=[first, second], pad_id=0, temperature=0)
    for i in range(len(prompts)):
        row = free[i].tolist()
        stop = min([row.index(t) + 1 for t in (first, second) if t in row], default=12)
        assert mask[i].tolist() == [1] * stop + [0] * (12 - stop)
    assert mask[0].sum() <= 4 and mask[1].sum() <= 2


def ragged_batch(V: int, T: int = 12) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Six rows padded every way a batch is: right (SFT, DPO), left (a prompt), both (a PPO
    rollout), none, and a lone token. Labels on every real token but each row's first, the
    prompt's, as collate and the rollouts set them."""
    ids = torch.randint(0, V, (6, T))
    mask = torch.zeros_like(ids)
    for row, (start, end) in enumerate([(0, 4), (7, 12), (2, 9), (0, 5), (0, 12), (3, 4)]):
        mask[row, start:end] = 1
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels[torch.arange(6), mask.argmax(1)] = IGNORE_INDEX
    return ids, mask, labels


def test_packing_puts_whole_sequences_first_fit_decreasing_with_restarted_positions():
    ids, mask, _ = ragged_batch(V)
    packing = model_module.Packing.of(mask[:5])  # lengths 4, 5, 7, 5, 12 in rows of 12
    real = [ids[b][mask[b].bool()].tolist() for b in range(5)]
    # longest first, each into the first row it fits: [12], [7, 5], [5, 4]
    expected = [real[4], real[2] + real[1], real[3] + real[0] + [0] * 3]
    assert packing.pack(ids[:5]).tolist() == expected
    assert packing.positions.tolist() == [list(range(12)), list(range(7)) + list(range(5)),
                                          list(range(5)) + list(range(4)) + [0] * 3]
    allowed = packing.attn_mask[2, 0]  # the third row: keys of its own sequence, not after the query
    assert allowed[6].tolist() == [False] * 5 + [True, True] + [False] * 5
    assert allowed[11].tolist() == [False] * 9 + [True] * 3  # trailing pads attend each other
    torch.testing.assert_close(packing.unpack(packing.pack(ids[:5])), ids[:5] * mask[:5], rtol=0, atol=0)


@pytest.mark.parametrize("family", ["toy", "llama"])
def test_packed_rows_give_the_padded_batch_log_probs_values_and_gradients_in_float64(family):
    torch.manual_seed(0)
    kwargs = {} if family == "toy" else dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=1)
    m = GPT(GPTConfig(vocab_size=V, block_size=16, n_layer=2, n_head=2, n_embd=16, **kwargs)).double()
    ids, mask, labels = ragged_batch(V)
    assert model_module.Packing.of(mask).shape[0] < len(ids)  # 6 rows in fewer: the packed path runs
    results = []
    for packing in (False, True):
        m.packing = packing
        m.zero_grad()
        hidden = m.hidden_states(ids, mask)
        logps = m(ids, mask, labels=labels)  # (B, T - 1)
        (logps * torch.linspace(0.5, 2, ids.size(1) - 1, dtype=torch.float64)).sum().backward()
        results.append((hidden[mask.bool()].detach(), logps.detach(),
                        [p.grad.clone() for p in m.parameters()]))
    (h0, l0, g0), (h1, l1, g1) = results
    torch.testing.assert_close(h1, h0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(l1, l0, rtol=1e-12, atol=1e-12)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_sampling_draws_each_token_at_its_probability_and_never_one_of_probability_zero():
    """200,000 draws from a distribution with zeros inside and at the end: each frequency within
    five standard errors of its probability (the seed is fixed, so the check is deterministic)."""
    p = torch.tensor([0.5, 0.0, 0.2, 0.05, 0.25, 0.0])
    n = 200_000
    draws = model_module.sample_token(p.log()[None].expand(n, -1), 1.0, None, None,
                                      torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=len(p)).double() / n
    assert freq[p == 0].sum() == 0
    assert ((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt()).all(), freq


def test_a_batch_that_no_row_can_share_is_not_packed():
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[:, 5:] = 0  # three sequences of 5 in rows of 8
    assert model_module.Packing.of(mask) is None


def test_a_compiled_model_runs_padded_batches_unpacked(monkeypatch):
    """A packed batch's row count varies with its lengths, and each new one would be compiled
    anew (a 4-step DPO run compiled for over 10 minutes with packing, 43 s without)."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=V, block_size=16, n_layer=1, n_head=2, n_embd=16))
    ids, mask, _ = ragged_batch(V)
    eager = m(ids, mask)
    packings = []
    monkeypatch.setattr(model_module.Packing, "of", lambda attention_mask: packings.append(1))
    compiled = torch.compile(m, backend="eager")(ids, mask)  # eager backend: dynamo traces, nothing is built
    assert packings == []
    torch.testing.assert_close(compiled[mask.bool()], eager[mask.bool()], rtol=0, atol=1e-5)
