"""CSR sparse KV cache: coders, NeuralDict, KIVI, the Cache plug-in and its memory accounting, on tiny models."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from edgecloud.kvcache.csr.cache import (  # noqa: E402
    CacheSpec,
    CodecLayer,
    CSRCodec,
    cache_bits_per_element,
    make_cache,
)
from edgecloud.kvcache.csr.coding import (  # noqa: E402
    matching_pursuit,
    orthogonal_matching_pursuit,
    reconstruct,
    spherical_kmeans,
)
from edgecloud.kvcache.csr.dictionary import CSRDictionaries, DictConfig, learn_dictionaries  # noqa: E402
from edgecloud.kvcache.csr.quant import pack, unpack  # noqa: E402

torch.set_num_threads(1)


def _orthonormal(d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    return q  # rows orthonormal


@pytest.mark.parametrize("coder", [matching_pursuit, orthogonal_matching_pursuit])
def test_recovers_exactly_sparse_signal(coder):
    d, M, s = 32, 200, 3
    D = _orthonormal(d)[None]
    g = torch.Generator().manual_seed(1)
    support = torch.stack([torch.randperm(d, generator=g)[:s] for _ in range(M)])[None]
    w = (torch.rand(1, M, s, generator=g) + 0.5) * torch.where(torch.rand(1, M, s, generator=g) > 0.5, 1.0, -1.0)
    x = reconstruct(D, support, w)
    idx, coef = coder(x, D, s)
    assert torch.equal(idx.sort(-1).values, support.sort(-1).values)
    assert torch.allclose(reconstruct(D, idx, coef), x, atol=1e-5)


def test_error_falls_as_s_grows_and_omp_beats_mp():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 500, 16, generator=g)
    D = torch.nn.functional.normalize(torch.randn(1, 64, 16, generator=g), dim=-1)
    errs = {}
    for name, coder in (("mp", matching_pursuit), ("omp", orthogonal_matching_pursuit)):
        errs[name] = [float((reconstruct(D, *coder(x, D, s)) - x).pow(2).mean()) for s in (1, 2, 4, 8)]
        assert all(a > b for a, b in zip(errs[name], errs[name][1:])), errs
    assert errs["omp"][-1] < errs["mp"][-1]


def test_neuraldict_beats_kmeans_and_roundtrips(tmp_path):
    g = torch.Generator().manual_seed(0)
    # vectors on a union of low-dimensional subspaces: structure a learned dictionary can exploit
    basis = torch.randn(8, 3, 16, generator=g)
    x = (torch.randn(2, 2000, 8, 1, 3, generator=g) @ basis.unsqueeze(0).unsqueeze(0)).squeeze(-2)
    x = x[:, torch.arange(2000), torch.randint(0, 8, (2000,), generator=g)]  # (L=2, M, 16)
    kv = {"keys": x, "values": x * 2}
    km_cfg = DictConfig(n_atoms=32, s=2, steps=0)
    nd_cfg = DictConfig(n_atoms=32, s=2, steps=150, lr=1e-2, batch=512)
    km, _ = learn_dictionaries(kv, km_cfg, km_cfg, "fp")
    nd, info = learn_dictionaries(kv, nd_cfg, nd_cfg, "fp")
    curve = info["keys"]["curve"]
    assert curve[-1]["train"] < curve[1]["train"] and curve[0]["step"] == 0

    def err(dicts):
        D = dicts.keys[:, 0]  # (L, N, d)
        return float((reconstruct(D, *matching_pursuit(x, D, 2)) - x).pow(2).sum() / x.pow(2).sum())

    assert err(nd) < err(km)
    assert torch.allclose(nd.keys.norm(dim=-1), torch.ones(()), atol=1e-5)
    path = tmp_path / "d.safetensors"
    nd.save(path)
    back = CSRDictionaries.load(path, fingerprint="fp")
    assert torch.equal(back.keys, nd.keys) and back.cfg_keys == nd.cfg_keys
    with pytest.raises(ValueError, match="learned for model"):
        CSRDictionaries.load(path, fingerprint="other")


def test_kmeans_atoms_unit_norm():
    D = spherical_kmeans(torch.randn(2, 300, 8), 16, iters=5)
    assert D.shape == (2, 16, 8) and torch.allclose(D.norm(dim=-1), torch.ones(()), atol=1e-5)


@pytest.mark.parametrize("bits", [2, 4])
def test_pack_roundtrip(bits):
    q = torch.randint(0, 2**bits, (3, 5, 64), dtype=torch.uint8)
    p = pack(q, bits)
    assert p.shape[-1] == 64 * bits // 8 and torch.equal(unpack(p, bits), q)


# ---------------------------------------------------------------- the cache inside a tiny Llama


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    return model, ids, ref


def _engine(model):
    """The shared substrate's Engine around a tiny model: CSR takes RoPE from it, like on SmolLM2."""
    from pathlib import Path

    from edgecloud.llm.engine import Engine
    from edgecloud.llm.models import LoadedModel

    return Engine(LoadedModel(model, None, "tiny", "tiny", Path(".")), threads=1)


def _run(model, ids, cache, chunk=8):
    out = []
    with torch.no_grad():
        for i in range(0, ids.shape[1], chunk):
            out.append(model(ids[:, i:i + chunk], cache=cache, use_cache=True).logits)
    return torch.cat(out, 1)


def _identity_dicts(n_layers, d, pre_rope):
    eye = _orthonormal(d, seed=3)[None, None].expand(n_layers, 1, d, d).contiguous()
    cfg = DictConfig(n_atoms=d, s=d, steps=0)
    return CSRDictionaries(eye, eye.clone(), cfg, cfg, "tiny", pre_rope)


@pytest.mark.parametrize("pre_rope", [True, False])
def test_sparse_cache_with_s_equal_head_dim_reproduces_logits(tiny, pre_rope):
    model, ids, ref = tiny
    d = model.config.head_dim
    spec = CacheSpec("csr", s_keys=d, s_values=d)
    cache = make_cache(spec, 2, _identity_dicts(2, d, pre_rope), engine=_engine(model))
    out = _run(model, ids, cache)
    assert (out - ref).abs().max() < 2e-2  # fp16 weights are the only loss
    assert torch.equal(out.argmax(-1), ref.argmax(-1))
    # and a sparser code does change the logits: the cache really reads the codes
    lossy = _run(model, ids, make_cache(CacheSpec("csr", s_keys=2, s_values=2), 2, _identity_dicts(2, d, pre_rope),
                                        engine=_engine(model)))
    assert (lossy - ref).abs().max() > 0.05


def test_rope_unrotate_is_exact(tiny):
    model, _, _ = tiny
    e = _engine(model)
    x = torch.randn(1, 2, 10, model.config.head_dim)
    pos = torch.arange(5, 15)
    assert torch.allclose(e.pre_rope_keys(e.rotate(x, pos), pos), x, atol=1e-5)
    # and the rotation is the model's own: a key rotated by the engine equals transformers' apply_rotary_pos_emb
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    cos, sin = model.model.rotary_emb(x, pos[None])
    ref, _ = apply_rotary_pos_emb(x, x, cos, sin)
    assert torch.allclose(e.rotate(x, pos), ref, atol=1e-5)


@pytest.mark.parametrize("spec,expected_bits", [
    (CacheSpec("fp16"), lambda T, d: 16.0),
    (CacheSpec("kivi", bits=2, group=8, residual=8),
     # keys: 2 bits + 2 fp16 per (8-token block, channel); values: 2 bits + 2 fp16 per (token, 8 channels)
     lambda T, d: None),
    (CacheSpec("csr", s_keys=2, s_values=3), lambda T, d: 32 * (2 + 3) / 2 / d),
])
def test_memory_accounting_matches_tensor_sizes(tiny, spec, expected_bits):
    model, ids, _ = tiny
    d = model.config.head_dim
    dicts = _identity_dicts(2, d, True)
    cache = make_cache(spec, 2, dicts, engine=_engine(model))
    _run(model, ids, cache, chunk=7)
    T = ids.shape[1]
    real = 0
    for layer in cache.layers:
        assert isinstance(layer, CodecLayer) and layer.get_seq_length() == T
        tensors = [layer.keys, layer.values, *layer.codes["keys"].values(), *layer.codes["values"].values()]
        real += sum(t.untyped_storage().nbytes() if t.is_contiguous() and t.storage_offset() == 0
                    else t.numel() * t.element_size() for t in tensors)
    n = 2 * 2 * 2 * T * d  # layers * (k, v) * kv_heads * T * d
    bits = cache_bits_per_element(cache)
    assert bits == pytest.approx(8 * real / n)
    if spec.method == "kivi":
        coded = (T - 8) // 8 * 8  # tokens outside the dense residual, whole blocks
        per_layer = (2 * coded * d * 2 / 8 + 2 * (coded // 8) * d * 4  # keys: codes + scale/zero
                     + 2 * coded * d * 2 / 8 + 2 * coded * (d // 8) * 4  # values
                     + 2 * 2 * (T - coded) * d * 2)  # dense residual, k and v, fp16
        assert bits == pytest.approx(8 * 2 * per_layer / n)
    else:
        assert bits == pytest.approx(expected_bits(T, d))


def test_online_atoms_counted(tiny):
    model, ids, _ = tiny
    d = model.config.head_dim
    cache = make_cache(CacheSpec("csr", s_keys=2, s_values=2, online=4), 2, _identity_dicts(2, d, True),
                       engine=_engine(model))
    _run(model, ids, cache)
    codec = cache.layers[0].codec["keys"]
    assert isinstance(codec, CSRCodec) and codec.atoms.shape[1] == d + 4
    base = 32 * 4 / 2 / d
    assert cache_bits_per_element(cache) > base


def test_kivi_error_within_half_step():
    from edgecloud.kvcache.csr import quant

    x = torch.randn(1, 2, 64, 32)
    for bits in (2, 4):
        k = quant.quantize_keys(x, bits, 32)
        v = quant.quantize_values(x, bits, 32)
        step_k = (x.reshape(1, 2, 2, 32, 32).amax(-2) - x.reshape(1, 2, 2, 32, 32).amin(-2)) / (2**bits - 1)
        err_k = (quant.dequantize_keys(k, bits) - x).abs().reshape(1, 2, 2, 32, 32)
        assert (err_k <= step_k.unsqueeze(-2) / 2 + 1e-2).all()
        assert (quant.dequantize_values(v, bits) - x).abs().max() < (x.amax(-1) - x.amin(-1)).max() / (2**bits - 1)


def test_layer_groups_share_dictionaries():
    x = torch.randn(4, 300, 8)
    cfg = DictConfig(n_atoms=8, s=1, group=2, steps=0, kmeans_iters=2)
    d, _ = learn_dictionaries({"keys": x, "values": x}, cfg, cfg, "fp")
    ids = d.groups["keys"]
    assert d.keys.shape[0] == 2 and ids == sorted(ids) and set(ids) == {0, 1}  # contiguous groups
    for a in range(4):
        for b in range(4):
            assert torch.equal(d.for_layer("keys", a), d.for_layer("keys", b)) == (ids[a] == ids[b])


def test_bad_input_is_a_user_error():
    from edgecloud.errors import UserError

    with pytest.raises(UserError, match="s_n"):
        DictConfig(s_n=3).check(64)
    with pytest.raises(UserError, match="method"):
        make_cache(CacheSpec("zip"), 2)
    with pytest.raises(UserError, match="kivi bits"):
        make_cache(CacheSpec("kivi", bits=3), 2)


def test_cli_registers_csr_bench():
    import typer
    from typer.testing import CliRunner

    from edgecloud.kvcache.csr.cli import register

    app = typer.Typer()
    app.callback()(lambda: None)
    register(app)
    res = CliRunner().invoke(app, ["csr-bench", "--help"])
    assert res.exit_code == 0 and "--quick" in res.output and "--seed" in res.output
    res = CliRunner().invoke(app, ["csr-bench", "--threads", "0"])
    assert res.exit_code == 2 and "--threads" in res.output  # refused at parse time (Typer min=1)
    # a loader failure is the loader's UserError, never a quietly swapped model
    from edgecloud.errors import UserError

    res = CliRunner().invoke(app, ["csr-bench", "--quick", "--model", "no-such-model"])
    assert isinstance(res.exception, UserError) and "no-such-model" in str(res.exception)


@pytest.mark.parametrize("chunk", [1, 7])
def test_sink_tokens_kept_fp16_and_counted(tiny, chunk):
    """The first ``sink`` tokens bypass the codec (fp16, exact up to fp16 rounding) and their bytes count."""
    from transformers import DynamicCache

    model, ids, _ = tiny
    d, sink = model.config.head_dim, 3
    ref = DynamicCache()
    with torch.no_grad():
        model(ids, cache=ref, use_cache=True)
    cache = make_cache(CacheSpec("csr", s_keys=2, s_values=3, sink=sink), 2, _identity_dicts(2, d, True),
                       engine=_engine(model))
    _run(model, ids, cache, chunk=chunk)
    T = ids.shape[1]
    for layer, r in zip(cache.layers, ref.layers):
        assert layer.get_seq_length() == T and layer.n_coded == T
        for kind, want in (("keys", r.keys), ("values", r.values)):
            # the reference layer 1 read fp32 sinks, this cache fp16 ones: equal up to fp16 rounding
            assert torch.allclose(layer.sinks[kind].float(), want[..., :sink, :], atol=2e-3)
            assert layer.sinks[kind].dtype == torch.float16
            assert torch.equal(layer.work[kind][..., :sink, :], layer.sinks[kind].float())
            assert not torch.allclose(layer.work[kind][..., sink:, :], want[..., sink:, :], atol=1e-2)
        assert layer.codes["keys"]["idx"].shape[2] == T - sink
    n = 2 * 2 * 2 * T * d
    coded = 2 * 2 * (T - sink) * 32 * (2 + 3)  # layers x kv_heads x tokens x (index + weight bits) x atoms
    assert cache_bits_per_element(cache) == pytest.approx((coded + 2 * 2 * 2 * sink * d * 16) / n)
