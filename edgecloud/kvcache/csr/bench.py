"""The CSR comparison in one run: fp16, KIVI-2/4 and CSR (k-means vs NeuralDict, MP vs OMP, several sparsities)
on SmolLM2-135M over held-out pydoc text — bits per element, perplexity, top-1 agreement with fp16, codec time."""

from __future__ import annotations

import inspect
import time
from dataclasses import asdict, dataclass, replace

import torch

from edgecloud.kvcache.csr import coding, dictionary
from edgecloud.kvcache.csr.cache import CacheSpec, cache_bits_per_element, cache_timing, make_cache
from edgecloud.kvcache.csr.coding import CODERS, reconstruct
from edgecloud.kvcache.csr.dictionary import CSRDictionaries, DictConfig, chunk, learn_dictionaries
from edgecloud.llm.corpus import token_windows, topic_split
from edgecloud.llm.engine import Engine
from edgecloud.paths import cache_root
from edgecloud.results import code_key


@dataclass(frozen=True)
class BenchConfig:
    seq_len: int = 1024  # held-out context per sequence
    eval_seqs: int = 4
    chunk: int = 64  # tokens per forward: prefill arrives in chunks, each encoded as it arrives
    calib_seqs: int = 6  # dictionary settings equal the quick preset's, so both share the cached dictionaries
    calib_len: int = 512
    atoms: int = 512
    steps: int = 60  # NeuralDict steps
    batch: int = 512
    s_keys: int = 4  # main CSR setting: keys 4 atoms x 1 chunk, values 2 atoms x 2 chunks = 2 bits/element
    s_values: int = 2
    s_n_values: int = 2
    residual: int = 32  # dense recent tokens for KIVI (its paper's design) and the CSR "+res" variant
    group: int = 32  # KIVI group
    online: int = 64
    seed: int = 0

    @classmethod
    def quick(cls, seed: int = 0) -> BenchConfig:
        return cls(seq_len=512, eval_seqs=2, online=32, seed=seed)


def calibrate(engine: Engine, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Pre-RoPE keys and values per layer, captured at k_proj / v_proj outputs: (L, tokens·kv_heads, d)."""
    cfg = engine.config
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    store: dict[str, list[list[torch.Tensor]]] = {"keys": [[] for _ in range(cfg.num_hidden_layers)],
                                                  "values": [[] for _ in range(cfg.num_hidden_layers)]}
    hooks = []
    for li, layer in enumerate(engine.decoder.layers):
        for kind, mod in (("keys", layer.self_attn.k_proj), ("values", layer.self_attn.v_proj)):
            hooks.append(mod.register_forward_hook(
                lambda _m, _i, out, kind=kind, li=li: store[kind][li].append(out.detach().reshape(-1, d))))
    try:
        with torch.no_grad():
            for row in ids:
                engine.model(row[None])
    finally:
        for h in hooks:
            h.remove()
    return {k: torch.stack([torch.cat(v) for v in store[k]]) for k in store}


def dictionary_code_version() -> str:
    """The source of everything that computes a dictionary (calibration, k-means/NeuralDict, coders): a change to
    any of it changes the cache key, so an edit never serves a dictionary the new code would not learn."""
    return code_key(inspect.getsource(calibrate), inspect.getsource(dictionary), inspect.getsource(coding))


def get_dictionaries(engine: Engine, kv: dict, cfg: BenchConfig, steps: int) -> tuple[CSRDictionaries, dict]:
    """Learned (or k-means when steps=0) dictionaries, cached as safetensors keyed by code version + config + model
    fingerprint (:func:`edgecloud.results.code_key`)."""
    fp = engine.lm.fingerprint
    ck = DictConfig(n_atoms=cfg.atoms, s=cfg.s_keys, s_n=1, steps=steps, batch=cfg.batch, seed=cfg.seed)
    cv = DictConfig(n_atoms=cfg.atoms, s=cfg.s_values, s_n=cfg.s_n_values, steps=steps, batch=cfg.batch,
                    seed=cfg.seed)
    key = code_key(fp, asdict(ck), asdict(cv), cfg.calib_seqs, cfg.calib_len, version=dictionary_code_version())
    path = cache_root() / "csr" / f"dict-{key}.safetensors"
    if path.exists():
        return CSRDictionaries.load(path, fp), {}
    t0 = time.perf_counter()
    dicts, curves = learn_dictionaries(kv, ck, cv, fp, pre_rope=True)
    dicts.save(path)
    return dicts, {"train_s": time.perf_counter() - t0, "loss_first": {k: v[0] for k, v in curves.items() if v},
                   "loss_last": {k: v[-1] for k, v in curves.items() if v}}


def coder_comparison(dicts: dict[str, CSRDictionaries], kv_test: dict, cfg: BenchConfig) -> list[dict]:
    """Relative reconstruction error and µs per vector for MP / OMP on held-out KV vectors, per dictionary."""
    rows = []
    for dname, dct in dicts.items():
        for kind, s in (("keys", cfg.s_keys), ("values", cfg.s_values)):
            D = getattr(dct, kind)[:, :]  # (L, s_n, N, dc)
            L, s_n, N, dc = D.shape
            x = torch.stack([chunk(v, s_n) for v in kv_test[kind]]).reshape(L * s_n, -1, dc)
            Dk = D.reshape(L * s_n, N, dc)
            for coder, fn in CODERS.items():
                t0 = time.perf_counter()
                idx, coef = fn(x, Dk, s)
                dt = time.perf_counter() - t0
                err = float((reconstruct(Dk, idx, coef) - x).pow(2).sum() / x.pow(2).sum())
                rows.append({"dictionary": dname, "kind": kind, "coder": coder, "s": s, "s_n": s_n,
                             "rel_err": err, "us_per_vector": 1e6 * dt * s_n / x[0].numel() * dc / L})
    return rows


def evaluate(engine: Engine, windows: torch.Tensor, spec: CacheSpec, dicts, cfg: BenchConfig,
             ref_top1: torch.Tensor | None) -> tuple[dict, torch.Tensor]:
    """Perplexity / agreement / bits for one cache setting; the context is fed in ``cfg.chunk``-token pieces."""
    nll, n, bits, enc, dec = 0.0, 0, [], [], []
    tops = []
    for w in windows:
        cache = make_cache(spec, engine.n_layers, dicts, engine, seed=cfg.seed)
        logits = []
        with torch.no_grad():
            for i in range(0, len(w), cfg.chunk):
                logits.append(engine.model(w[None, i:i + cfg.chunk], cache=cache, use_cache=True).logits[0])
        logits = torch.cat(logits)
        nll += float(torch.nn.functional.cross_entropy(logits[:-1], w[1:], reduction="sum"))
        n += len(w) - 1
        tops.append(logits.argmax(-1))
        bits.append(cache_bits_per_element(cache))
        t = cache_timing(cache)
        enc.append(t["encode_s"])
        dec.append(t["decode_s"])
    top = torch.stack(tops)
    row = {"method": spec.label, "bits_per_element": sum(bits) / len(bits), "ppl": float(torch.exp(torch.tensor(
        nll / n))), "top1_agreement": 1.0 if ref_top1 is None else float((top == ref_top1).float().mean()),
        "encode_us_per_token": 1e6 * sum(enc) / len(enc), "decode_us_per_token": 1e6 * sum(dec) / len(dec)}
    return row, top


def run(cfg: BenchConfig, engine: Engine, log=print) -> dict:
    """The whole comparison on ``engine`` (the shared substrate's SmolLM2 in the CLI and bench/csr.py)."""
    torch.manual_seed(cfg.seed)
    lm = engine.lm
    calib_text, held_text = topic_split()
    calib_ids = token_windows(lm.tokenizer, calib_text, cfg.calib_len, cfg.calib_seqs + 1)
    t0 = time.perf_counter()
    kv_all = calibrate(engine, calib_ids)
    n_test = cfg.calib_len * engine.config.num_key_value_heads  # last window held out for coder comparison
    kv = {k: v[:, :-n_test] for k, v in kv_all.items()}
    kv_test = {k: v[:, -n_test:] for k, v in kv_all.items()}
    log(f"calibrated {kv['keys'].shape[1]} vectors/layer in {time.perf_counter() - t0:.1f}s")
    neural, train_info = get_dictionaries(engine, kv, cfg, cfg.steps)
    kmeans, _ = get_dictionaries(engine, kv, cfg, 0)
    log(f"dictionaries ready {train_info}")
    coders = coder_comparison({"kmeans": kmeans, "neuraldict": neural}, kv_test, cfg)

    base = CacheSpec("csr", s_keys=cfg.s_keys, s_values=cfg.s_values)
    settings: list[tuple[CacheSpec, CSRDictionaries | None]] = [
        (CacheSpec("fp16"), None),
        (CacheSpec("kivi", bits=2, group=cfg.group, residual=cfg.residual, name="kivi2"), None),
        (CacheSpec("kivi", bits=4, group=cfg.group, residual=cfg.residual, name="kivi4"), None),
        (replace(base, name="csr"), neural),
        (replace(base, name="csr-kmeans"), kmeans),
        (replace(base, coder="omp", name="csr-omp"), neural),
        (replace(base, residual=cfg.residual, name="csr+res"), neural),
        (replace(base, online=cfg.online, name="csr+online"), neural),
        # same 2 bits, moved from keys (low error) to values (high error): keys 1 bit, values 3 bits
        (replace(base, s_keys=cfg.s_keys // 2, s_values=cfg.s_values * 3 // 2, name="csr-k1v3"), neural),
        (replace(base, s_keys=cfg.s_keys // 2, s_values=max(1, cfg.s_values // 2), name="csr-1bit"), neural),
        (replace(base, s_keys=cfg.s_keys * 3 // 2, s_values=cfg.s_values * 3 // 2, name="csr-3bit"), neural),
        (replace(base, s_keys=cfg.s_keys * 2, s_values=cfg.s_values * 2, name="csr-4bit"), neural),
        # the same sparsities with KIVI's dense window of recent tokens: the equal-memory comparison with KIVI-2
        (replace(base, s_keys=cfg.s_keys // 2, s_values=max(1, cfg.s_values // 2), residual=cfg.residual,
                 name="csr-1bit+res"), neural),
        (replace(base, s_keys=cfg.s_keys * 3 // 2, s_values=cfg.s_values * 3 // 2, residual=cfg.residual,
                 name="csr-3bit+res"), neural),
    ]
    windows = token_windows(lm.tokenizer, held_text, cfg.seq_len, cfg.eval_seqs)
    rows, ref = [], None
    for spec, dicts in settings:
        t0 = time.perf_counter()
        row, top = evaluate(engine, windows, spec, dicts, cfg, ref)
        if ref is None:
            ref = top
        row["wall_s"] = time.perf_counter() - t0
        rows.append(row)
        log(f"{row['method']:>12}: {row['bits_per_element']:.3f} bits  ppl {row['ppl']:.3f}  "
            f"top1 {row['top1_agreement']:.4f}  ({row['wall_s']:.0f}s)")
    by = {r["method"]: r for r in rows}
    return {
        "bits_per_element_csr": by["csr"]["bits_per_element"],
        "bits_per_element_kivi2": by["kivi2"]["bits_per_element"],
        "ppl_fp16": by["fp16"]["ppl"], "ppl_csr": by["csr"]["ppl"], "ppl_kivi2": by["kivi2"]["ppl"],
        "top1_agreement_csr": by["csr"]["top1_agreement"], "top1_agreement_kivi2": by["kivi2"]["top1_agreement"],
        "ppl_ratio_csr_over_kivi2": by["csr"]["ppl"] / by["kivi2"]["ppl"],
        "memory_ratio_csr_over_kivi2": by["csr"]["bits_per_element"] / by["kivi2"]["bits_per_element"],
        "ppl_ratio_neuraldict_over_kmeans": by["csr"]["ppl"] / by["csr-kmeans"]["ppl"],
        "bits_per_element_csr_equal_memory": by["csr-3bit+res"]["bits_per_element"],
        "ppl_ratio_csr_equal_memory_over_kivi2": by["csr-3bit+res"]["ppl"] / by["kivi2"]["ppl"],
        "rows": rows, "coders": coders, "dictionary_training": train_info,
        "dictionary_bytes": int((neural.keys.numel() + neural.values.numel()) * 2),
        "model": lm.fingerprint, "atoms": cfg.atoms, "config": asdict(cfg),
        "eval_tokens": int(windows.numel()),
    }
