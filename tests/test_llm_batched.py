"""The batched engine computes, per sequence, what the sequence computes alone (fp32, SmolLM2-135M)."""

from __future__ import annotations

import copy

import pytest
import torch

from edgecloud.errors import UserError
from edgecloud.llm.batch import Batch, current_rows, generate_batch, last_logits

QUESTIONS = ["What is 2+2?", "Name a colour of the sky on a clear day, and explain why it looks that way.", "Hi",
             "Write the word 'python' backwards, then tell me how many letters it has."]


@pytest.fixture(scope="module")
def engine():
    from edgecloud.llm.engine import Engine
    from edgecloud.llm.models import load_model

    return Engine(load_model("smollm2-135m"), threads=1)


@pytest.fixture(scope="module")
def prompts(engine):
    return [engine.chat_prompt("You are helpful.", q) for q in QUESTIONS]


def test_batch_greedy_equals_single(engine, prompts):
    outs = generate_batch(engine, prompts, max_new_tokens=8)
    lens = {len(engine.encode_prompt(p)) for p in prompts}
    assert len(lens) == len(prompts)  # really different lengths: left padding is exercised
    for p, o in zip(prompts, outs):
        g = engine.generate(p, 8)
        assert o.tokens == g.tokens
        assert torch.allclose(o.first_logits, g.first_logits, atol=1e-4)


def test_join_mid_flight_and_leave(engine, prompts):
    ids = [engine.encode_prompt(p) for p in prompts[:3]]
    refs = [engine.prefill(i)[1] for i in ids]
    b = Batch(engine)
    b.add({0: ids[0], 1: ids[1]})
    out = b.step({0: 5, 1: 17})
    for i, t in ((0, 5), (1, 17)):
        assert torch.allclose(out[i], engine.logits_for([t], refs[i])[-1], atol=1e-4)
    b.add({2: ids[2]})  # joins between decode steps; 0 and 1 are not recomputed
    out = b.step({0: 9, 1: 9, 2: 300})
    for i, t in ((0, 9), (1, 9), (2, 300)):
        assert torch.allclose(out[i], engine.logits_for([t], refs[i])[-1], atol=1e-4)
    b.remove(1)
    assert b.row_ids == [0, 2]
    out = b.step({0: 11, 2: 12})
    for i, t in ((0, 11), (2, 12)):
        assert torch.allclose(out[i], engine.logits_for([t], refs[i])[-1], atol=1e-4)


def test_rollback_then_decode_matches(engine, prompts):
    ids = engine.encode_prompt(prompts[0])
    b = Batch(engine)
    b.add({"a": ids, "b": engine.encode_prompt(prompts[2])})
    b.step({"a": 5, "b": 6})
    b.step({"a": 7, "b": 8})
    b.rollback("a", len(ids) + 1)  # reject the drafted 7: keep prompt + 5
    out = b.step({"a": 42, "b": 9})
    _, ref = engine.prefill(ids)
    engine.logits_for([5], ref)
    assert torch.allclose(out["a"], engine.logits_for([42], ref)[-1], atol=1e-4)
    assert b.seqs["a"].tokens == [5, 42]


def test_fused_path_used_and_transformers_fallback_agrees(engine, prompts):
    """The fused path runs for SmolLM2, and the transformers path (what a wrapped model gets) gives the same
    tokens and logits; a wrapper around q_proj switches the fused path off until it is taken away."""
    assert engine.fused() is not None
    ids = {i: engine.encode_prompt(p) for i, p in enumerate(prompts)}
    runs = []
    for fused in (True, False):
        engine.use_fused = fused
        b = Batch(engine)
        first = b.add(ids, max_new_tokens=4)
        runs.append((first, [b.step() for _ in range(3)], [b.seqs[i].tokens for i in ids]))
    engine.use_fused = True
    (f1, s1, t1), (f2, s2, t2) = runs
    assert t1 == t2
    for i in ids:
        assert torch.allclose(f1[i], f2[i], atol=1e-4)
        assert all(torch.allclose(a[i], c[i], atol=1e-4) for a, c in zip(s1, s2))
    attn = engine.decoder.layers[0].self_attn
    q = attn.q_proj
    attn.q_proj = torch.nn.Sequential(q)  # any wrapper (a LoRA layer, say)
    try:
        assert engine.fused() is None
    finally:
        attn.q_proj = q
    assert engine.fused() is not None


def test_wide_batch_decode_matches(engine, prompts):
    """Eight rows decode through the prepacked (>= 8 rows) GEMMs and still match the single path to 1e-4."""
    ids = engine.encode_prompt(prompts[2])
    b = Batch(engine)
    b.add({i: ids[i % 3:] for i in range(8)})
    out = b.step(dict.fromkeys(range(8), 42))
    for i in (0, 1, 2):
        _, ref = engine.prefill(ids[i:])
        assert torch.allclose(out[i], engine.logits_for([42], ref)[-1], atol=1e-4)


def test_cache_grows_past_its_reserve(engine, prompts):
    """More decode steps than the preallocated reserve: the cache regrows and still matches the single path."""
    ids = engine.encode_prompt(prompts[2])
    b = Batch(engine)
    b.add({0: ids, 1: engine.encode_prompt(prompts[0])}, max_new_tokens=1)
    cap = b.k.shape[3]
    feed = list(range(100, 100 + cap))
    for t in feed:
        out = b.step({0: t, 1: t})
    assert b.k.shape[3] > cap
    _, ref = engine.prefill(ids)
    assert torch.allclose(out[0], engine.logits_for(feed, ref)[-1], atol=1e-4)


def test_last_logits_equal_single(engine, prompts):
    from transformers import DynamicCache

    ids = [engine.encode_prompt(p) for p in prompts]
    got = last_logits(engine, ids, 3)
    for r, i in enumerate(ids):
        assert torch.allclose(got[r], engine.logits_for(i, DynamicCache())[-3:], atol=1e-4)
    with pytest.raises(UserError, match="at least n=5"):
        last_logits(engine, [[1, 2, 3, 4]], 5)


def test_seeded_sampling_per_sequence(engine, prompts):
    a = generate_batch(engine, prompts[:3], 6, temperature=[0.9, 0.0, 0.9], seed=[1, 2, 3])
    again = generate_batch(engine, prompts[:3], 6, temperature=[0.9, 0.0, 0.9], seed=[1, 2, 3])
    assert [o.tokens for o in a] == [o.tokens for o in again]
    assert a[0].tokens == engine.generate(prompts[0], 6, temperature=0.9, seed=1).tokens
    assert a[1].tokens == engine.generate(prompts[1], 6).tokens


def test_rows_visible_during_forward(engine):
    seen = []
    hook = engine.decoder.layers[0].register_forward_hook(lambda *a: seen.append(current_rows()))
    try:
        b = Batch(engine)
        b.add({"x": [1, 2, 3], "y": [4, 5]})
        b.step()
    finally:
        hook.remove()
    assert seen == [["x", "y"], ["x", "y"]]
    assert current_rows() is None


def test_rows_are_per_thread(engine):
    """Two batches stepping in two threads at once (DRAGON's sides in worker threads) each see their own rows, and
    neither leaks its rows to the caller afterwards (a process-wide global restored out of order did)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    seen: dict[str, list] = {}
    start = threading.Barrier(2)

    def record(*_):
        rows = current_rows()
        seen.setdefault(str(rows[0])[0], []).append(rows)

    def run(tag):
        start.wait()
        b = Batch(engine)
        b.add({tag + "1": [1, 2, 3], tag + "2": [4, 5]})
        for _ in range(3):
            b.step()

    hook = engine.decoder.layers[0].register_forward_hook(record)
    try:
        with ThreadPoolExecutor(2) as ex:
            list(ex.map(run, ["a", "b"]))
    finally:
        hook.remove()
    assert seen == {t: [[t + "1", t + "2"]] * 4 for t in "ab"}
    assert current_rows() is None


def test_bad_requests_named(engine):
    b = Batch(engine)
    with pytest.raises(UserError, match="request 'q2': empty prompt"):
        b.add({"q1": [1, 2], "q2": []})
    with pytest.raises(UserError, match="request 3: prompt has"):
        generate_batch(engine, [[1], [1], [1], [1] * (engine.context + 1)])
    b.add({"q1": [1, 2]})
    with pytest.raises(UserError, match="already in the batch"):
        b.add({"q1": [3]})


@pytest.mark.slow
def test_llm_bench_contract(engine):
    """`edgecloud llm bench --json` keys, on a tiny configuration of the same code path."""
    from edgecloud.llm.bench import EngineBenchConfig, run
    from edgecloud.llm.cli import engine_result

    cfg = EngineBenchConfig(prefill_tokens=64, decode_steps=2, decode_prompt_tokens=16, batches=(1, 4), check_prompts=2,
                            check_tokens=3, ppl_tokens=32, ppl_passages=1, bf16_speed=False)
    res = run(engine, cfg)
    doc = __import__("json").loads(engine_result(res, 0).to_json())
    for k in ("decode_tok_s_batch1", "decode_tok_s_batch4", "batch4_speedup", "prefill_tok_s", "ppl_fp32",
              "ppl_bf16"):
        assert doc[k] > 0
    assert doc["batched_matches_single"] is True
    assert doc["provenance"]["commit"]
    assert abs(doc["ppl_bf16"] / doc["ppl_fp32"] - 1) < 0.05


def test_fused_prefill_equals_transformers(engine, prompts):
    """``Engine.prefill`` on a fresh cache runs the fused layers (causal attention, no mask; oneDNN's prepacked
    GEMMs): the same cache and logits as transformers' layers, and decoding on from it too. Tolerances: the prepacked
    GEMMs sum in another order than MKL's ``F.linear`` (relative error ~4e-6 per GEMM), measured up to 4e-5 on the
    cache and 9e-5 on logits of ~30 (docs/llm.md); batched == single stays at 1e-4 because both run this path."""
    from unittest import mock

    from edgecloud.llm.fused import FusedLlama

    ids = engine.encode_prompt(prompts[1])
    engine.use_fused = False
    try:
        ref_logits, ref = engine.prefill(ids)
    finally:
        engine.use_fused = True
    with mock.patch.object(FusedLlama, "forward", autospec=True, side_effect=FusedLlama.forward) as spy:
        logits, cache = engine.prefill(ids)
    assert spy.call_count == 1
    assert torch.allclose(logits, ref_logits, atol=2e-4)
    for a, b in zip(cache.layers, ref.layers):
        assert a.keys.shape == b.keys.shape == (1, engine.config.num_key_value_heads, len(ids), a.keys.shape[-1])
        assert torch.allclose(a.keys, b.keys, atol=1e-4) and torch.allclose(a.values, b.values, atol=1e-4)
    assert torch.allclose(engine.logits_for([42], cache)[-1], engine.logits_for([42], ref)[-1], atol=2e-4)


@pytest.mark.parametrize("lens", [pytest.param((7, 64, 130, 200), marks=pytest.mark.slow),
                                  pytest.param((300, 299, 12), marks=pytest.mark.slow), (1, 2, 33, 90, 91, 150, 17),
                                  (130, 130, 130)])  # equal lengths: no padding, block-causal attention at 3 rows
def test_batched_prefill_equals_single_on_corpus(engine, lens):
    """Several prompt sets of corpus text: a left-padded batched prefill and three decode steps give, per sequence,
    the single path's logits to 1e-4 (both prefill through the same prepacked GEMMs, which are row-independent)."""
    from edgecloud.llm.bench import _held_out_text

    text = _held_out_text(engine, sum(lens) + 3)
    ids, at = {}, 0
    for r, n in enumerate(lens):
        ids[r], at = text[at:at + n], at + n
    b = Batch(engine)
    got = [b.add(ids, max_new_tokens=4)]
    feed = [dict.fromkeys(ids, t) for t in (42, 7, 1000)]
    got += [b.step(f) for f in feed]
    for r, p in ids.items():
        first, cache = engine.prefill(p)
        ref = [first] + [engine.logits_for([f[r]], cache)[-1] for f in feed]
        for g, want in zip(got, ref):
            assert torch.allclose(g[r], want, atol=1e-4), (lens, r, float((g[r] - want).abs().max()))


@pytest.mark.parametrize("b,L,block", [(1, 1500, 64), (2, 130, 64), (1, 37, 16), (1, 5, 64), (3, 200, 48)])
def test_causal_gqa_attention_equals_sdpa(b, L, block):
    """The block-causal GQA attention of a maskless prefill is SDPA's causal GQA attention (to 1e-5)."""
    import torch.nn.functional as F

    from edgecloud.llm.fused import causal_gqa_attention

    torch.manual_seed(L)
    hk, g, d = 3, 3, 64
    q, k, v = torch.randn(b, hk * g, L, d), torch.randn(b, hk, L, d), torch.randn(b, hk, L, d)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=d ** -0.5, enable_gqa=True)
    qg = (q * d ** -0.5).view(b, hk, g, L, d).transpose(2, 3).reshape(b, hk, L * g, d)  # rows (position, head)
    got = causal_gqa_attention(qg, k, v, block).view(b, hk, L, g, d).transpose(2, 3).reshape(b, hk * g, L, d)
    assert torch.allclose(got, ref, atol=1e-5)


def test_add_after_cached_prefix_equals_full_prefill(engine, prompts):
    """A sequence joined from a precomputed prefix KV (only the suffix prefilled) computes what the whole prompt
    computes: next-token logits and later decode steps, on the fused path and on the transformers path."""
    ids = engine.encode_prompt(prompts[1])
    p = len(ids) - 9
    kv = engine.kv_of(ids[:p])
    for fused in (True, False):
        engine.use_fused = fused
        try:
            full, cached = Batch(engine), Batch(engine)
            want = full.add({"x": ids, "other": engine.encode_prompt(prompts[2])})["x"]
            cached.add({"other": engine.encode_prompt(prompts[2])})
            got = cached.add_after("x", kv, ids[p:])
            assert torch.allclose(got, want, atol=1e-4)
            assert cached.seqs["x"].length == len(ids)
            for t in (5, 77):
                a, b = full.step({"x": t, "other": 3}), cached.step({"x": t, "other": 3})
                assert torch.allclose(a["x"], b["x"], atol=1e-4)
            cached.rollback("x", len(ids) + 1)  # rollback reaches into the suffix, not the cached prefix
            full.rollback("x", len(ids) + 1)
            assert torch.allclose(full.step({"x": 9, "other": 4})["x"], cached.step({"x": 9, "other": 4})["x"],
                                  atol=1e-4)
        finally:
            engine.use_fused = True
    with pytest.raises(UserError, match="empty suffix"):
        Batch(engine).add_after("y", kv, [])
    with pytest.raises(UserError, match="does not fit"):
        Batch(engine).add_after("y", (kv[0][:, :1], kv[1][:, :1]), ids[p:])
    with pytest.raises(UserError, match="context"):
        Batch(engine).add_after("y", kv, [1] * engine.context)


def test_fused_path_notices_every_change(engine):
    """The fused path is reused while the model is untouched and dropped (None or rebuilt) after an in-place weight
    edit, a projection replaced by a wrapper, a hook on a projection, or a layer replaced: the cheap identity check
    (``FusedLlama.fresh``) sees what the full walk of the model saw."""
    fz = engine.fused()
    assert fz is not None and engine.fused() is fz
    layer = engine.decoder.layers[1]
    w = layer.mlp.up_proj.weight
    with torch.no_grad():
        w.add_(0.0)  # an in-place edit bumps the version even when the values stay
    fz2 = engine.fused()
    assert fz2 is not None and fz2 is not fz
    proj = layer.self_attn.k_proj

    class Wrapped(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    layer.self_attn.k_proj = Wrapped(proj)
    try:
        assert engine.fused() is None
    finally:
        layer.self_attn.k_proj = proj
    fz3 = engine.fused()
    assert fz3 is not None and engine.fused() is fz3
    hook = layer.mlp.down_proj.register_forward_pre_hook(lambda *a: None)
    try:
        assert not fz3.fresh() and engine.fused() is None
    finally:
        hook.remove()
    fz4 = engine.fused()
    old = engine.decoder.layers[2]
    engine.decoder.layers[2] = copy.deepcopy(old)
    try:
        assert not fz4.fresh()
        assert engine.fused() is not fz4
    finally:
        engine.decoder.layers[2] = old
    assert engine.fused() is not None
