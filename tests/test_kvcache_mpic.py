"""MPIC mechanisms on a tiny random Llama (and a tiny Llava for image chunks), plus the real model at layer 0."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch

from edgecloud.errors import UserError
from edgecloud.kvcache.mpic import MPIC, Segment, image_chunk, link
from edgecloud.kvcache.selection import CacheBlend, MPICk
from edgecloud.kvcache.store import KVStore, chunk_key
from edgecloud.llm.engine import Engine
from edgecloud.llm.models import LoadedModel


def tiny_engine(seed: int = 0, context: int = 256) -> Engine:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                      rope_theta=10000.0)
    model = LlamaForCausalLM(cfg).eval()
    return Engine(LoadedModel(model, None, f"tiny-{seed}", "tiny", Path(".")), threads=1)


@pytest.fixture(scope="module")
def eng():
    return tiny_engine()


def prompt(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    r = lambda n: torch.randint(0, 101, (n,), generator=g).tolist()  # noqa: E731
    return [Segment("chunk", r(7), label="sys"), Segment("chunk", r(20), label="a"),
            Segment("chunk", r(15), label="b"), Segment("text", r(6), label="q")]


def full_logits(e: Engine, segs):
    ids = [t for s in segs for t in s.ids]
    return e.prefill(ids)


def test_rotation_matches_fresh_prefill_at_layer0(eng):
    segs = prompt()
    ids = [t for s in segs for t in s.ids]
    _, cache = eng.prefill(ids)
    off = len(segs[0]) + len(segs[1])
    k, _ = eng.kv_of(segs[2].ids)
    fresh = cache.layers[0].keys[0][:, off : off + len(segs[2])]
    assert torch.allclose(eng.rotate(k[0], off), fresh, atol=1e-4)
    assert not torch.allclose(k[0], fresh, atol=1e-2)  # without rotation it would be wrong


def test_linker_exact_when_all_selected_and_reuse_approximate(eng, tmp_path):
    segs = prompt()
    ref, ref_cache = full_logits(eng, segs)
    m = MPIC(eng, KVStore(tmp_path, eng.lm.fingerprint))
    res = m.prefill(segs, MPICk(10_000))
    assert res.n_recomputed == res.n_tokens - len(segs[0])  # the chunk at position 0 is exact as stored
    assert torch.allclose(res.logits, ref, atol=1e-4)
    for layer in range(eng.n_layers):
        assert torch.allclose(res.cache.layers[layer].keys, ref_cache.layers[layer].keys, atol=1e-4)
    part = m.prefill(segs, MPICk(4))
    assert part.n_recomputed == 4 + 4 + len(segs[3])  # the chunk at position 0 is exact, never recomputed
    assert not torch.allclose(part.logits, ref, atol=1e-4)
    # the linked cache decodes like any cache
    toks, _ = eng.greedy(part.cache, part.logits, 3)
    assert len(toks) == 3
    m.close()


def test_linker_paths_agree_fused_runs_and_dense(eng, tmp_path, monkeypatch):
    """The linker's three ways to run its pass give the same cache and logits to 1e-5 on a selection with several
    runs (two chunks' first tokens and the question): the fused pass (packed GEMMs, masks built once, the last layer
    on the last row only), transformers' layers with run-by-run attention, and transformers' dense masked SDPA."""
    from contextlib import nullcontext

    import edgecloud.kvcache.mpic as mp

    segs = prompt()
    m = MPIC(eng, KVStore(tmp_path, eng.lm.fingerprint))
    calls = []
    fused_forward = mp._fused_forward
    monkeypatch.setattr(mp, "_fused_forward", lambda *a: calls.append(1) or fused_forward(*a))
    fused = m.prefill(segs, MPICk(4))
    assert calls == [1]  # the tiny plain Llama takes the fused pass
    monkeypatch.setattr(eng, "use_fused", False)
    runs = m.prefill(segs, MPICk(4))
    monkeypatch.setattr(mp, "prefix_attention", lambda e: nullcontext())
    dense = m.prefill(segs, MPICk(4))
    assert calls == [1] and eng.config._attn_implementation != mp._PREFIX_ATTN  # restored after the pass
    for got in (fused, runs):
        assert torch.allclose(got.logits, dense.logits, atol=1e-5)
        for layer in range(eng.n_layers):
            assert torch.allclose(got.cache.layers[layer].keys, dense.cache.layers[layer].keys, atol=1e-5)
            assert torch.allclose(got.cache.layers[layer].values, dense.cache.layers[layer].values, atol=1e-5)
    m.close()


def test_run_masks_tile_the_causal_mask():
    """Each run's additive mask is exactly the dense causal mask (query at slot p sees keys 0..p) on its rows,
    cut at the run's last key; a one-token run needs none."""
    from edgecloud.kvcache.mpic import _runs

    slots = torch.tensor([3, 4, 5, 9, 12, 13, 14, 15])
    dense = torch.arange(16)[None, :] <= slots[:, None]
    runs = _runs(slots, torch.float32)
    assert [(a, b, e) for a, b, e, _ in runs] == [(0, 3, 6), (3, 4, 10), (4, 8, 16)]
    for a, b, e, bias in runs:
        assert not dense[a:b, e:].any()
        if bias is None:
            assert b - a == 1 and dense[a, :e].all()
        else:
            assert torch.equal(bias == 0, dense[a:b, :e]) and torch.isinf(bias[~dense[a:b, :e]]).all()


def test_chunk_at_start_is_exact_without_recompute(eng, tmp_path):
    segs = prompt()
    segs = [segs[1], segs[3]]
    ref, _ = full_logits(eng, segs)
    m = MPIC(eng, KVStore(tmp_path, eng.lm.fingerprint))
    res = m.prefill(segs, MPICk(0))
    assert res.n_recomputed == len(segs[1])
    assert torch.allclose(res.logits, ref, atol=1e-4)


def test_cacheblend_selects_r_fraction(eng, tmp_path):
    segs = prompt()
    m = MPIC(eng, KVStore(None, eng.lm.fingerprint))
    res = m.prefill(segs, CacheBlend(0.2))
    assert res.n_recomputed == round(0.2 * 35) + len(segs[3])


def test_cacheblend_keeps_probe_layers_fresh_kv_for_every_token(eng):
    """CacheBlend's probe computes layers 0..probe_layer over the whole prompt; that exact KV is kept for all tokens
    (its reference code does), so those layers equal full prefill while deeper layers still carry reused KV."""
    segs = prompt()
    _, ref_cache = full_logits(eng, segs)
    m = MPIC(eng, KVStore(None, eng.lm.fingerprint))
    res = m.prefill(segs, CacheBlend(0.2, probe_layer=0))
    for kind in ("keys", "values"):
        got, ref = getattr(res.cache.layers[0], kind), getattr(ref_cache.layers[0], kind)
        assert torch.allclose(got, ref, atol=1e-5)
        assert not torch.allclose(getattr(res.cache.layers[1], kind), getattr(ref_cache.layers[1], kind), atol=1e-3)
    m.close()


def test_store_roundtrip_corrupt_stale_and_lru(tmp_path):
    k, v = torch.randn(2, 2, 5, 16), torch.randn(2, 2, 5, 16)
    s = KVStore(tmp_path, "fp-a", mem_bytes=k.nbytes * 2 + 1)
    key = chunk_key("fp-a", [1, 2, 3])
    assert key != chunk_key("fp-b", [1, 2, 3]) and key != chunk_key("fp-a", [1, 2, 4])
    s.put(key, k, v)
    fresh = KVStore(tmp_path, "fp-a")
    got = fresh.get(key)
    assert got is not None and torch.equal(got[0], k) and torch.equal(got[1], v)
    # flip one byte in the tensor data: detected, deleted, a miss
    p = s.path(key)
    raw = bytearray(p.read_bytes())
    raw[-3] ^= 0xFF
    p.write_bytes(bytes(raw))
    fresh = KVStore(tmp_path, "fp-a")
    assert fresh.get(key) is None and fresh.stats["corrupt"] == 1 and not p.exists()
    # truncated file
    s.put(key, k, v)
    p.write_bytes(p.read_bytes()[:50])
    assert KVStore(tmp_path, "fp-a").get(key) is None
    # an entry written for another model, copied under this model's name, is stale
    other = KVStore(tmp_path, "fp-b")
    other.put(key, k, v)
    other.path(key).replace(s.path(key))
    assert KVStore(tmp_path, "fp-a").get(key) is None
    # LRU: budget for two entries
    for i in range(3):
        s.put(f"k{i}", k, v, disk=False)
    assert s.stats["evictions"] >= 1 and s.get("k0", memory=True) is None and s.get("k2") is not None


def test_disk_full_falls_back(eng, tmp_path, monkeypatch):
    import safetensors.torch

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    segs = prompt()
    store = KVStore(tmp_path, eng.lm.fingerprint)
    m = MPIC(eng, store)
    ref, _ = full_logits(eng, segs)
    res = m.prefill(segs, MPICk(10_000))
    assert store.stats["write_errors"] == 3 and torch.allclose(res.logits, ref, atol=1e-4)
    assert not list(Path(tmp_path).rglob("*.safetensors")) and not list(Path(tmp_path).rglob("*.tmp"))


def test_failed_parallel_load_recomputes(eng, tmp_path):
    segs = prompt()
    store = KVStore(tmp_path, eng.lm.fingerprint)
    m = MPIC(eng, store)
    for s in segs:
        if s.kind == "chunk":
            m.ingest(s)
    ref = m.prefill(segs, MPICk(10_000)).logits

    def boom(key, memory=True):
        raise OSError("disk went away")

    store.get = boom
    res = m.prefill(segs, MPICk(10_000))
    assert res.timings["computed"] == 3 and torch.allclose(res.logits, ref, atol=1e-5)
    m.close()


def test_too_long(tmp_path):
    e = tiny_engine(context=32)
    m = MPIC(e, KVStore(tmp_path, e.lm.fingerprint))
    with pytest.raises(UserError, match="context"):
        m.prefill([Segment("chunk", list(range(40)), label="big"), Segment("text", [1, 2])])
    with pytest.raises(UserError, match="context"):
        link(e, [Segment("text", list(range(20))), Segment("text", list(range(20)))], {})


def test_image_chunks_on_tiny_llava(tmp_path):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    text_cfg = LlamaConfig(vocab_size=120, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    vis = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8, projection_dim=32)
    cfg = LlavaConfig(vision_config=vis, text_config=text_cfg, image_token_index=119,
                      vision_feature_select_strategy="full", vision_feature_layer=-1)
    model = LlavaForConditionalGeneration(cfg).eval()
    e = Engine(LoadedModel(model, None, "tiny-llava", "tiny-llava", Path(".")), threads=1)
    with torch.inference_mode():
        feats = model.get_image_features(pixel_values=torch.randn(1, 3, 32, 32))
    feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
    img = (feats[0] if isinstance(feats, (list, tuple)) else feats).reshape(-1, 64)
    segs = [Segment("text", [1, 5, 7]), image_chunk(img), Segment("text", [9, 10, 11, 12])]
    store = KVStore(tmp_path, e.lm.fingerprint)
    m = MPIC(e, store)
    key = m.ingest(segs[1])
    assert key == chunk_key(e.lm.fingerprint, embeds=img) and store.path(key).exists()
    x = torch.cat([s.input_embeds(e) for s in segs]).unsqueeze(0)
    ref, _ = e.prefill(embeds=x)
    res = m.prefill(segs, MPICk(10_000))
    assert res.timings["computed"] == 0 and torch.allclose(res.logits, ref, atol=1e-4)
    approx = m.prefill(segs, MPICk(2))
    assert approx.n_recomputed == 3 + 2 + 4
