"""CSR at the paper's sizes: batched MP/OMP equal per-vector references, packed storage, NeuralDict early stopping,
JSD layer groups, dictionary files refused when foreign, corrupt or stale, bit budgets, per-layer RoPE (Gemma 3),
and the QA sets."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

pytest.importorskip("transformers")

from edgecloud.errors import UserError  # noqa: E402
from edgecloud.kvcache.csr.cache import CacheSpec, index_bits, make_cache, pack_bits, unpack_bits  # noqa: E402
from edgecloud.kvcache.csr.coding import (  # noqa: E402
    QUANTS,
    matching_pursuit,
    orthogonal_matching_pursuit,
    reconstruct,
)
from edgecloud.kvcache.csr.dictionary import (  # noqa: E402
    CSRDictionaries,
    DictConfig,
    _best_cuts,
    coherence,
    layer_groups,
    train_dictionary,
)

torch.set_num_threads(1)


def _mp_reference(x: torch.Tensor, D: torch.Tensor, s: int, quant=None):
    """Matching pursuit written plainly for one vector at a time (float64)."""
    idx, coef = [], []
    r = x.clone()
    for _ in range(s):
        best, bi = -1.0, -1
        for j in range(D.shape[0]):
            v = abs(float(r @ D[j]))
            if v > best:
                best, bi = v, j
        c = r @ D[bi]
        if quant is not None:
            c = quant(c)
        r = r - c * D[bi]
        idx.append(bi)
        coef.append(float(c))
    return idx, coef


@pytest.mark.parametrize("coef", [None, "fp8"])
def test_batched_mp_equals_per_vector_reference(coef):
    g = torch.Generator().manual_seed(0)
    K, M, N, d, s = 2, 21, 64, 16, 4
    D = torch.nn.functional.normalize(torch.randn(K, N, d, generator=g, dtype=torch.float64), dim=-1)
    x = torch.randn(K, M, d, generator=g, dtype=torch.float64)
    q = QUANTS[coef] if coef else None
    idx, c = matching_pursuit(x, D, s, q, chunk=8)  # 5 chunks of vectors: the chunked path
    for k in range(K):
        for m in range(M):
            ri, rc = _mp_reference(x[k, m], D[k], s, q)
            assert idx[k, m].tolist() == ri
            assert torch.allclose(c[k, m], torch.tensor(rc, dtype=torch.float64), atol=1e-12)
    # unchunked gives the same codes
    i2, c2 = matching_pursuit(x, D, s, q, chunk=10_000)
    assert torch.equal(i2, idx) and torch.equal(c2, c)


def test_batched_omp_equals_per_vector_least_squares():
    g = torch.Generator().manual_seed(1)
    D = torch.nn.functional.normalize(torch.randn(1, 200, 12, generator=g, dtype=torch.float64), dim=-1)
    x = torch.randn(1, 20, 12, generator=g, dtype=torch.float64)
    idx, c = orthogonal_matching_pursuit(x, D, 3, ridge=0.0, chunk=7)
    for m in range(20):
        A = D[0, idx[0, m]]  # (s, d)
        ref = torch.linalg.lstsq(A.T, x[0, m]).solution
        assert torch.allclose(c[0, m], ref, atol=1e-9)
        r = x[0, m]  # the greedy support: each pick maximises |<residual, atom>| after the least-squares refit
        for t in range(3):
            corr = (D[0] @ r).abs()
            corr[idx[0, m, :t]] = 0
            assert int(corr.argmax()) == int(idx[0, m, t])
            At = D[0, idx[0, m, : t + 1]]
            r = x[0, m] - At.T @ torch.linalg.lstsq(At.T, x[0, m]).solution


def test_mp_at_16k_atoms_bounded_memory():
    D = torch.nn.functional.normalize(torch.randn(1, 16384, 64), dim=-1)
    x = torch.randn(1, 600, 64)
    idx, c = matching_pursuit(x, D, 2, chunk=128)
    err = (reconstruct(D, idx, c) - x).pow(2).sum(-1)
    assert idx.shape == (1, 600, 2) and bool((err < x.pow(2).sum(-1)).all())


def test_coherence_is_the_frobenius_identity():
    D = torch.nn.functional.normalize(torch.randn(3, 50, 8, dtype=torch.float64), dim=-1)
    direct = (torch.eye(50, dtype=torch.float64) - D @ D.transpose(-1, -2)).pow(2).mean()
    assert torch.allclose(coherence(D), direct)


@pytest.mark.parametrize("bits,n", [(12, 4), (13, 7), (14, 11), (16, 3)])
def test_pack_bits_roundtrip(bits, n):
    x = torch.randint(0, 2**bits, (2, 3, 5, n))
    p = pack_bits(x, bits)
    assert p.dtype == torch.uint8 and p.shape[-1] == math.ceil(n * bits / 8)
    assert torch.equal(unpack_bits(p, bits, n), x)
    assert index_bits(4096) == 12 and index_bits(4097) == 13 and index_bits(16384) == 14


def test_packed_fp8_cache_counts_exact_bits():
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.test_kvcache_csr import _engine, _run

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg).eval()
    d = 16
    atoms = torch.nn.functional.normalize(torch.randn(2, 1, 4096, d), dim=-1)
    dc = DictConfig(n_atoms=4096, s=2, steps=0)
    dicts = CSRDictionaries(atoms, atoms.clone(), dc, dc, "tiny", True)
    ids = torch.randint(0, 64, (1, 24))
    cache = make_cache(CacheSpec("csr", s_keys=2, s_values=3, coef="fp8", packed=True), 2, dicts, _engine(model))
    _run(model, ids, cache)
    from edgecloud.kvcache.csr.cache import cache_bits_per_element

    # keys: 2 x 12-bit indices = 3 bytes + 2 fp8 weights; values: 36 bits -> 5 bytes + 3 weights
    assert cache_bits_per_element(cache) == pytest.approx((5 + 8) * 8 / (2 * d))
    layer = cache.layers[0]
    assert layer.codes["keys"]["coef"].dtype == torch.float8_e4m3fn and layer.codes["keys"]["idx"].shape[-1] == 3


def test_early_stopping_stops_and_keeps_the_curve():
    x = torch.randn(2, 500, 8)
    cfg = DictConfig(n_atoms=16, s=2, steps=200, lr=0.0, eval_every=5, patience=2, kmeans_iters=2)
    D, curve = train_dictionary(x, cfg, x[:, :100])
    assert curve[0]["step"] == 0 and curve[-1]["step"] == 10  # lr 0: no improvement, stopped after 2 evaluations
    assert D.shape == (2, 16, 8)
    cfg = DictConfig(n_atoms=16, s=2, steps=40, lr=1e-2, eval_every=10, patience=5, kmeans_iters=2)
    _, curve = train_dictionary(x, cfg, x[:, :100])
    assert [c["step"] for c in curve] == [0, 10, 20, 30, 40]


def test_best_cuts_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    for L, n_groups, longest in ((7, 3, 3), (9, 3, 5), (6, 2, 3)):
        jsd = torch.rand(L - 1, generator=g).tolist()
        best = max((c for c in itertools.combinations(range(L - 1), n_groups - 1)
                    if all(b - a <= longest for a, b in zip((-1, *c), (*c, L - 1)))),
                   key=lambda c: sum(jsd[i] for i in c))
        assert _best_cuts(jsd, n_groups, longest) == list(best)


def test_jsd_groups_cut_where_the_distribution_changes():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 8, generator=g), torch.randn(2, 8, generator=g)  # two different 2-d subspaces
    x = torch.cat([torch.randn(3, 400, 2, generator=g) @ a, torch.randn(3, 400, 2, generator=g) @ b])
    ids, jsd = layer_groups(x, group=3)
    assert ids == [0, 0, 0, 1, 1, 1] and max(range(5), key=lambda i: jsd[i]) == 2


def _dicts(tmp_path, version="v1"):
    atoms = torch.nn.functional.normalize(torch.randn(2, 1, 16, 8), dim=-1)
    cfg = DictConfig(n_atoms=16, s=2, steps=0)
    d = CSRDictionaries(atoms, atoms.clone(), cfg, cfg, "model-a", True, {"keys": [0, 0, 1], "values": [0, 1, 1]},
                        {"version": version, "command": "python bench/csr.py"})
    path = tmp_path / "d.safetensors"
    d.save(path)
    return path


def test_dictionary_file_refused_when_foreign_corrupt_or_stale(tmp_path):
    path = _dicts(tmp_path)
    ok = CSRDictionaries.load(path, "model-a", n_layers=3, head_dim=8, version="v1")
    assert ok.groups["values"] == [0, 1, 1] and ok.meta["command"] == "python bench/csr.py"
    assert torch.equal(ok.for_layer("keys", 1), ok.keys[0]) and torch.equal(ok.for_layer("values", 1), ok.values[1])
    for kw, msg in ((dict(fingerprint="model-b"), "learned for model"), (dict(head_dim=64), "head dimension"),
                    (dict(n_layers=30), "layers"), (dict(version="v2"), "stale")):
        with pytest.raises(UserError, match=msg):
            CSRDictionaries.load(path, **kw)
    data = path.read_bytes()
    for bad in (data[: len(data) // 2], b"\x00" * 64, b""):
        path.write_bytes(bad)
        with pytest.raises(UserError, match="corrupt"):
            CSRDictionaries.load(path)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(path), metadata={"fingerprint": "model-a"})
    with pytest.raises(UserError, match="not a CSR dictionary"):
        CSRDictionaries.load(path)


def test_bit_budget():
    from edgecloud.kvcache.csr.bench import BenchConfig, budget

    cfg = BenchConfig()
    assert budget(cfg, 4096) == (4, 8)  # 2 bits x 128 channels (k+v) / 20 bits an atom = 12 atoms
    assert budget(cfg, 16384) == (4, 7)  # 14-bit indices: 22 bits an atom
    assert budget(cfg, 4096, bits=2.0, coef="fp16", packed=False) == (3, 5)
    for n in (4096, 8192, 16384):
        k, v = budget(cfg, n)
        assert (k + v) * (index_bits(n) + 8) / (2 * cfg.chunk_dim) <= cfg.bits
    with pytest.raises(UserError, match="--bits"):
        budget(cfg, 4096, bits=0.2)
    with pytest.raises(UserError, match="bits"):
        BenchConfig(bits=0)
    # the default fp16 sinks fit the budget at the default length: codes (1.875) + 4 x 16 bits over 512 tokens
    k, v = budget(cfg, 4096)
    codes = (k + v) * (index_bits(4096) + 8) / (2 * cfg.chunk_dim)
    assert codes * (cfg.seq_len - cfg.sink) / cfg.seq_len + 16 * cfg.sink / cfg.seq_len <= cfg.bits
    with pytest.raises(UserError, match="sink"):
        BenchConfig(sink=512)


def test_per_layer_rope_and_calibration_on_tiny_gemma3():
    """Gemma 3 has QK-norm and two RoPE bases (local/global layers): the calibrated pre-RoPE keys must equal the
    k_norm output, and un-rotation must invert the engine's rotation per layer."""
    from pathlib import Path

    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from edgecloud.kvcache.csr.bench import calibrate
    from edgecloud.llm.engine import Engine
    from edgecloud.llm.models import LoadedModel

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=8,
                           layer_types=["sliding_attention", "full_attention"], max_position_embeddings=64)
    model = Gemma3ForCausalLM(cfg).eval()
    e = Engine(LoadedModel(model, None, "tiny-gemma", "tiny-gemma", Path(".")), threads=1)
    got = {}
    hooks = [model.model.layers[i].self_attn.k_norm.register_forward_hook(
        lambda m, i, o, li=i: got.__setitem__(li, o.detach())) for i in range(2)]
    ids = torch.randint(0, 64, (1, 20))
    kv = calibrate(e, ids)
    for h in hooks:
        h.remove()
    for li in range(2):
        assert torch.allclose(kv["keys"][li], got[li][0].reshape(-1, 16), atol=1e-5)
    x = torch.randn(1, 1, 20, 16)
    pos = torch.arange(20)
    a, b = e.rotate(x, pos, 0), e.rotate(x, pos, 1)
    assert not torch.allclose(a, b)  # the two layer types really rotate differently
    for li in range(2):
        assert torch.allclose(e.pre_rope_keys(e.rotate(x, pos, li), pos, li), x, atol=1e-5)
    with pytest.raises(UserError, match="per-layer RoPE"):
        e.cos_sin(pos)


def test_fanoutqa_dev_set_reads_in_place():
    import importlib.util

    if importlib.util.find_spec("fanoutqa") is None:  # installed by scripts/setup.sh (requirements-nodeps.txt)
        pytest.skip("fanoutqa not installed")
    from edgecloud.kvcache.csr.qa import fanoutqa_items

    items = fanoutqa_items()
    assert len(items) == 310 and all(it.question and it.answers[0] for it in items)
    assert items[0].source == "fanoutqa" and not items[0].gold  # closed-book: no evidence text ships


def test_fanoutqa_bad_file_is_one_error(tmp_path):
    from edgecloud.kvcache.csr.qa import fanoutqa_items

    p = tmp_path / "x.json"
    p.write_text(json.dumps([{"question": "q"}]))
    with pytest.raises(UserError, match="not a FanOutQA"):
        fanoutqa_items(p)


def test_cli_refuses_an_unmeetable_budget_and_a_missing_dictionary_file(tmp_path):
    import typer
    from typer.testing import CliRunner

    from edgecloud.kvcache.csr.cli import register

    app = typer.Typer()
    app.callback()(lambda: None)
    register(app)
    res = CliRunner().invoke(app, ["csr-bench", "--quick", "--bits", "0.1"])
    assert isinstance(res.exception, UserError) and "--bits" in str(res.exception)  # before any model loads
    res = CliRunner().invoke(app, ["csr-bench", "--quick", "--dictionaries", str(tmp_path / "none.safetensors")])
    assert isinstance(res.exception, UserError) and "no such file" in str(res.exception)


def test_qa_compare_scores_per_question_and_pairs_the_difference(monkeypatch):
    """Scores every question, method by method, and the paired CSR - KIVI-2 difference is the mean of the per-question
    differences (an exact oracle), its interval seeded and around it; answers come from a stub, not a model."""
    import edgecloud.kvcache.csr.cache as cache_mod
    import edgecloud.kvcache.csr.qa as qa
    from edgecloud.kvcache.qa import QAItem

    items = [QAItem(f"q{i}", [gold], "passage", [], "g", "squad")
             for i, gold in enumerate(["red apple", "blue sky", "green tree"])]
    said = {"fp16": ["red apple", "blue", "green tree"], "kivi2": ["red", "blue sky", "tree"],
            "csr": ["apple", "sky", "green tree"]}
    calls = {m: 0 for m in said}

    class Engine:
        n_layers = 1

        def chat_prompt(self, system, user):
            return user

        def encode_prompt(self, text):
            return [1, 2, 3]

    def answer(engine, ids, cache, cfg):
        calls[cache] += 1
        return said[cache][calls[cache] - 1]

    monkeypatch.setattr(qa, "load_sets", lambda cfg, seed: {"squad": items})
    monkeypatch.setattr(qa, "answer", answer)
    monkeypatch.setattr(cache_mod, "make_cache", lambda spec, n, dicts, engine, seed: spec)
    monkeypatch.setattr(cache_mod, "cache_bits_per_element", lambda c: {"fp16": 16.0, "kivi2": 4.0, "csr": 2.0}[c])
    specs = {m: (m, None) for m in said}
    out = qa.qa_compare(Engine(), specs, qa.QAConfig(squad=3, fanoutqa=0), seed=0, log=lambda m: None)
    pq = out["per_question"]["squad"]
    assert pq["fp16"]["f1_vs_fp16"] == [1.0, 1.0, 1.0]
    assert pq["kivi2"]["f1"] == pytest.approx([2 / 3, 1.0, 2 / 3])
    assert pq["csr"]["f1"] == pytest.approx([2 / 3, 2 / 3, 1.0])
    d = out["paired"]["squad"]["csr-kivi2"]["f1"]
    assert d["mean"] == pytest.approx(sum(c - k for c, k in zip(pq["csr"]["f1"], pq["kivi2"]["f1"])) / 3)
    assert d["n"] == 3 and d["ci"][0] <= d["mean"] <= d["ci"][1]
    assert out["summary"]["squad"]["csr"]["bits_per_element"] == 2.0
    assert out["summary"]["squad"]["kivi2"]["f1"] == pytest.approx(7 / 9)
    assert qa.paired_difference([0.5, 0.5], [0.5, 0.5])["ci"] == (0.0, 0.0)
    with pytest.raises(ValueError):
        qa.paired_difference([1.0], [1.0, 0.0])
