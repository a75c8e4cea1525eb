"""Key preparation for CSR (keyprep): exact inverse, the fitted mean/scale, codes through the cache, bits counted."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from edgecloud.errors import UserError  # noqa: E402
from edgecloud.kvcache.csr import keyprep  # noqa: E402
from edgecloud.kvcache.csr.bench import BenchConfig, _by_head, prep_flat  # noqa: E402
from edgecloud.kvcache.csr.cache import CacheSpec, CSRCodec, cache_bits_per_element, make_cache  # noqa: E402
from edgecloud.kvcache.csr.dictionary import CSRDictionaries, DictConfig  # noqa: E402

torch.set_num_threads(1)


def _prep(L=2, H=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(L, H, 50, d, generator=g) * 3 + torch.randn(L, H, 1, d, generator=g) * 5
    queries = torch.randn(L, 2 * H, 40, d, generator=g) * torch.linspace(0.01, 4, d)
    return keys, queries


def test_fit_mean_scale_pairs_and_exact_inverse():
    keys, queries = _prep()
    p = keyprep.fit(keys, queries, "center+qscale")
    assert torch.allclose(p.mean, keys.mean(2), atol=1e-2)  # fp16-rounded
    d = keys.shape[-1]
    assert torch.equal(p.scale[..., : d // 2], p.scale[..., d // 2:])  # RoPE pairs (i, i + d/2) share a scale
    # the pair scale is the RMS query of the query heads that read the KV head (2 per KV head here), RMS-normalised
    e = queries.pow(2).mean(2).reshape(2, 2, 2, d).mean(2)
    s = ((e[..., : d // 2] + e[..., d // 2:]) / 2).sqrt()
    s = torch.cat([s, s], -1)
    want = (s / s.pow(2).mean(-1, keepdim=True).sqrt()).clamp_min(keyprep.FLOOR)
    assert torch.allclose(p.scale, want, rtol=2e-3)
    x = keys[0][None]  # (B=1, H, T, d) of layer 0
    assert torch.allclose(p.inverse(p.forward(x, 0), 0), x, atol=1e-4)
    centred = keyprep.fit(keys, None, "center")
    assert torch.equal(centred.scale, torch.ones_like(centred.scale))
    assert centred.forward(x, 0).mean(2).abs().max() < 1e-2  # the coded vectors have (almost) zero mean


def test_fit_and_meta_refuse_bad_input():
    keys, queries = _prep()
    with pytest.raises(UserError, match="keyprep"):
        keyprep.fit(keys, queries, "whiten")
    with pytest.raises(UserError, match="queries"):
        keyprep.fit(keys, None, "center+qscale")
    p = keyprep.fit(keys, queries, "center+qscale")
    meta = p.to_meta()
    back = keyprep.KeyPrep.from_meta(meta, 2, 8)
    assert torch.equal(back.mean, p.mean) and torch.equal(back.scale, p.scale)
    assert keyprep.KeyPrep.from_meta({}, 2, 8) is None  # dictionaries of raw keys
    with pytest.raises(UserError, match="do not fit"):
        keyprep.KeyPrep.from_meta(meta, 3, 8)  # another layer count
    with pytest.raises(UserError, match="do not fit"):
        keyprep.KeyPrep.from_meta({"key_mean": meta["key_mean"], "key_scale": (-p.scale).tolist()}, 2, 8)
    with pytest.raises(UserError, match="corrupt"):
        keyprep.KeyPrep.from_meta({"key_mean": meta["key_mean"], "key_scale": "x"}, 2, 8)
    with pytest.raises(UserError, match="keyprep"):
        BenchConfig(keyprep="whiten")


def test_flat_layout_helpers_match_per_head_application():
    """calibrate's rows are (window, head, token)-ordered: prep_flat must hit each row with its own head's prep."""
    L, W, H, T, d = 2, 3, 2, 5, 8
    keys, queries = _prep(L, H, d)
    p = keyprep.fit(keys, queries, "center+qscale")
    x = torch.randn(L, W, H, T, d)
    flat = x.reshape(L, W * H * T, d)
    assert torch.equal(_by_head(flat, T, H), x.transpose(1, 2).reshape(L, H, W * T, d))
    got = prep_flat(p, flat, T).reshape(L, W, H, T, d)
    for li in range(L):
        for w in range(W):
            assert torch.allclose(got[li, w], p.forward(x[li, w][None], li)[0], atol=1e-6)


def _orthonormal(d, seed=3):
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed)))
    return q


def test_codec_with_prep_round_trips_and_counts_its_bytes():
    """With a complete orthonormal dictionary (s = d) the prepared code is exact up to the fp16 weights; the cache
    counts codes + the layer's fp16 mean and scale."""
    L, H, d = 2, 2, 16
    keys, queries = _prep(L, H, d)
    p = keyprep.fit(keys, queries, "center+qscale")
    D = _orthonormal(d)[None]
    codec = CSRCodec(D, d, pre_rope=False, prep=p, layer=1)
    x = keys[1][None] * 2
    rec = codec.decode(codec.encode(x))
    assert torch.allclose(rec, x, rtol=0, atol=2e-2 * float(x.abs().max()))
    plain = CSRCodec(D, d, pre_rope=False)
    codes = plain.encode(p.forward(x, 1))  # the prepared codec codes the prepared key, and decodes through inverse
    assert all(torch.equal(a, b) for a, b in zip(codec.encode(x).values(), codes.values()))
    assert torch.allclose(codec.decode(codes), p.inverse(plain.decode(codes), 1), atol=1e-5)
    assert codec.extra_bytes() == 2 * (H * d + H * d // 2) and plain.extra_bytes() == 0  # mean + pair scales
    centred = CSRCodec(D, d, pre_rope=False, prep=keyprep.fit(keys, None, "center"), layer=1)
    assert centred.extra_bytes() == 2 * H * d  # a unit scale is not stored


def test_cache_with_prepared_keys_counts_bits(tiny_llama):
    model, ids = tiny_llama
    from test_kvcache_csr import _engine, _run

    d, H, L = model.config.head_dim, model.config.num_key_value_heads, 2
    keys, queries = _prep(L, H, d)
    p = keyprep.fit(keys, queries, "center+qscale")
    eye = _orthonormal(d)[None, None].expand(L, 1, d, d).contiguous()
    cfg = DictConfig(n_atoms=d, s=d, steps=0)
    dicts = CSRDictionaries(eye, eye.clone(), cfg, cfg, "tiny", True,
                            meta={"n_layers": L, "head_dim": d, **p.to_meta()})
    spec = CacheSpec("csr", s_keys=2, s_values=3)
    cache = make_cache(spec, L, dicts, engine=_engine(model))
    assert cache.layers[0].codec["keys"].prep is not None and cache.layers[0].codec["values"].prep is None
    _run(model, ids, cache, chunk=7)
    T = ids.shape[1]
    n = 2 * L * H * T * d
    coded = L * H * T * 32 * (2 + 3)
    assert cache_bits_per_element(cache) == pytest.approx((coded + L * H * (d + d // 2) * 16) / n)
    # complete codes through the cache reproduce the model's logits (mean/scale inverted exactly)
    full = make_cache(CacheSpec("csr", s_keys=d, s_values=d), L, dicts, engine=_engine(model))
    with torch.no_grad():
        ref = model(ids).logits
    assert (_run(model, ids, full) - ref).abs().max() < 3e-2


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval(), torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(0))


def test_capture_queries_are_the_pre_rope_projection(tiny_llama):
    """The captured queries are q_proj's output per head (pre-RoPE): the attention's own projection."""
    from test_kvcache_csr import _engine

    model, ids = tiny_llama
    eng = _engine(model)
    with keyprep.capture_queries(eng) as qs:
        with torch.no_grad():
            model(ids)
    with keyprep.capture_queries(eng, on=False) as none:
        pass
    assert none == {}
    att = model.model.layers[0].self_attn
    with torch.no_grad():
        h = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
        want = att.q_proj(h)[0].reshape(ids.shape[1], -1, att.head_dim).transpose(0, 1)
    assert len(qs) == 2 and qs[0][0].shape == (4, ids.shape[1], att.head_dim)
    assert torch.allclose(qs[0][0], want, atol=1e-5)


def test_captured_queries_with_calibrated_keys_give_gemma3_attention():
    """On a tiny Gemma 3 (QK-norm, local/global RoPE, GQA): the captured pre-RoPE queries, rotated per layer by the
    engine, against the calibrated pre-RoPE keys reproduce the model's own attention weights, so the query energy
    behind ``scale`` is measured where attention reads."""
    from pathlib import Path

    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from edgecloud.kvcache.csr.bench import calibrate
    from edgecloud.llm.engine import Engine
    from edgecloud.llm.models import LoadedModel

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=8,
                           layer_types=["sliding_attention", "full_attention"], max_position_embeddings=64,
                           attn_implementation="eager")
    model = Gemma3ForCausalLM(cfg).eval()
    e = Engine(LoadedModel(model, None, "tiny-gemma", "tiny-gemma", Path(".")), threads=1)
    ids = torch.randint(0, 64, (1, 20), generator=torch.Generator().manual_seed(1))
    with keyprep.capture_queries(e) as qs:
        kv = calibrate(e, ids)
    with torch.no_grad():
        att = model(ids, output_attentions=True).attentions
    T, pos = ids.shape[1], torch.arange(ids.shape[1])
    for li in range(2):
        q = e.rotate(qs[li][0], pos, li)  # (Hq, T, d)
        k = e.rotate(kv["keys"][li], pos, li)  # (T, d): one KV head
        mask = torch.ones(T, T).tril().bool()
        if li == 0:
            mask &= ~torch.ones(T, T).tril(-cfg.sliding_window).bool()
        w = (q @ k.T * model.model.layers[li].self_attn.scaling).masked_fill(~mask, float("-inf")).softmax(-1)
        assert torch.allclose(w, att[li][0], atol=1e-5)


def test_gemma_preset_fits_two_bits_with_every_byte_counted():
    """Gemma's preset (keyprep, 3 sinks) stays <= 2 bits/element at 512 tokens with the key mean and pair scales
    counted per prompt; 4 sinks would not (why the preset keeps 3)."""
    from dataclasses import replace

    from edgecloud.kvcache.csr.bench import budget, preset
    from edgecloud.kvcache.csr.cache import index_bits

    cfg = preset(BenchConfig(), "gemma3-270m")
    assert cfg.keyprep == "center+qscale" and preset(BenchConfig(), "smollm2-135m") == BenchConfig()
    d, T = 256, cfg.seq_len

    def bits(c):
        sk, sv = budget(c, c.atoms)
        codes = (sk + sv) * (index_bits(c.atoms) + 8) / (2 * c.chunk_dim)
        return codes * (T - c.sink) / T + 16 * c.sink / T + (d + d // 2) * 16 / (2 * T * d)

    assert bits(cfg) <= 2.0 < bits(replace(cfg, sink=4))


def test_cli_refuses_a_bad_keyprep_before_loading_a_model():
    from typer.testing import CliRunner

    from edgecloud.kvcache.csr.cli import app

    res = CliRunner().invoke(app, ["csr-bench", "--quick", "--keyprep", "whiten", "--model", "no-such-model"])
    assert isinstance(res.exception, UserError) and "keyprep" in str(res.exception)


def test_diagnose_attention_kl_runs_on_a_tiny_gemma3(monkeypatch):
    """bench/csr_diagnose.py's attn run end to end on a tiny Gemma 3 (random token windows): every variant gives a
    KL >= 0 per layer, and the KL of exact keys is 0."""
    import importlib.util
    from dataclasses import replace
    from pathlib import Path

    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from edgecloud.kvcache.csr import bench as B
    from edgecloud.llm import corpus
    from edgecloud.llm.engine import Engine
    from edgecloud.llm.models import LoadedModel

    spec = importlib.util.spec_from_file_location("csr_diagnose", Path(__file__).parents[1] / "bench/csr_diagnose.py")
    diag = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(diag)
    torch.manual_seed(0)
    mcfg = Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=8,
                            layer_types=["sliding_attention", "full_attention"], max_position_embeddings=64)
    eng = Engine(LoadedModel(Gemma3ForCausalLM(mcfg).eval(), None, "tiny-gemma", "tiny-gemma", Path(".")), threads=1)
    g = torch.Generator().manual_seed(0)
    monkeypatch.setattr(corpus, "token_windows", lambda tok, text, n, k: torch.randint(0, 64, (k, n), generator=g))
    cfg = replace(BenchConfig(), calib_seqs=4, calib_len=16, seq_len=16, atoms=8, chunk_dim=16, group=1, sink=2,
                  kmeans_sample=64, kmeans_iters=2)
    w = torch.randint(0, 64, (1, 16), generator=g)
    out = diag.attention_kl(eng, B, cfg, w)
    assert set(out) == {"raw", "center", "center+qscale", "raw, global layers' own dictionary"}
    for v in out.values():
        assert len(v["kl"]) == 2 and all(x >= -1e-6 for x in v["kl"]) and v["err_mean"] > 0
    with keyprep.capture_queries(eng) as qs:
        k = B.calibrate(eng, w)["keys"][1].reshape(1, 16, 16)
    assert abs(diag._attention_kl(eng, 1, qs[1][0], k, k.clone(), "full_attention")) < 1e-6
