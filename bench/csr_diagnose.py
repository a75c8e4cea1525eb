"""Where CSR loses quality on a model: per-layer MP error of the first token vs the rest (keys and values), and
perplexity with only keys / only values coded, or with the first tokens kept in fp16 (attention sinks); ``attn``
ranks ways of coding the keys by what attention feels: per layer, the KL divergence between the model's attention
weights and those over the decoded keys (held-out window, the fp16 sinks exact), for k-means dictionaries over raw
keys, centred keys, centred + query-scaled keys (``keyprep``), and raw keys with the global-RoPE layers' own
dictionary.

    python bench/csr_diagnose.py --model gemma3-270m --runs err,sink1,keysonly,valuesonly
    python bench/csr_diagnose.py --model gemma3-270m --runs attn

Uses the cached dictionaries of ``bench/csr.py`` (same preset; Gemma: group 6) and its one 512-token held-out
window; writes ``docs/results/csr_diagnose_<model>.{json,md}`` through ``edgecloud.results``.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

from edgecloud.paths import REPO_ROOT
from edgecloud.results import Result, check_out_dir

RUNS = ("err", "sink1", "sink4", "keysonly", "valuesonly", "attn")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {', '.join(RUNS)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "results")
    a = ap.parse_args()
    check_out_dir(a.out)
    runs = a.runs.split(",")
    import torch

    from edgecloud.errors import UserError
    from edgecloud.kvcache.csr import bench as B
    from edgecloud.kvcache.csr.cache import CacheSpec, FP16Codec
    from edgecloud.kvcache.csr.coding import CODERS, QUANTS, reconstruct
    from edgecloud.kvcache.csr.dictionary import chunk
    from edgecloud.llm.corpus import token_windows, topic_split
    from edgecloud.llm.engine import Engine
    from edgecloud.llm.models import load_model

    if bad := [r for r in runs if r not in RUNS]:
        raise UserError(f"--runs {','.join(bad)}: use a subset of {','.join(RUNS)}")
    torch.manual_seed(a.seed)
    cfg = B.BenchConfig(group=6 if a.model == "gemma3-270m" else 3, sizes=(), seed=a.seed)
    eng = Engine(load_model(a.model), threads=1)
    dicts, _, _ = B.prepare(eng, cfg, lambda m: print(m, file=sys.stderr, flush=True))
    neural = dicts["neuraldict"]
    w = token_windows(eng.lm.tokenizer, topic_split()[1], cfg.seq_len, 1)
    base = CacheSpec("csr", s_keys=neural.cfg_keys.s, s_values=neural.cfg_values.s, coef=cfg.coef,
                     packed=cfg.packed)
    data: dict = {"model": eng.lm.fingerprint, "model_name": eng.lm.name, "first_tokens": w[0, :4].tolist(),
                  "layers": [], "ppl": {}}
    if "err" in runs:
        kv = B.calibrate(eng, w)
        for li in range(eng.n_layers):
            row = {"layer": li}
            for kind in ("keys", "values"):
                dc = getattr(neural, "cfg_" + kind)
                D = neural.for_layer(kind, li)
                x = chunk(kv[kind][li], dc.s_n)
                idx, coef = CODERS["mp"](x, D, dc.s, QUANTS[dc.coef])
                e = (reconstruct(D, idx, coef) - x).pow(2).sum((0, 2)) / x.pow(2).sum((0, 2))
                nrm = kv[kind][li].norm(dim=-1)
                row |= {f"{kind}_err_tok0": float(e[0]), f"{kind}_err_rest": float(e[1:].mean()),
                        f"{kind}_norm_tok0": float(nrm[0]), f"{kind}_norm_rest": float(nrm[1:].mean())}
            data["layers"].append(row)
    if "attn" in runs:
        data["attn"] = attention_kl(eng, B, cfg, w)
    specs = {"sink1": (replace(base, sink=1), None), "sink4": (replace(base, sink=4), None),
             "keysonly": (base, "values"), "valuesonly": (base, "keys")}
    make = B.make_cache
    for name in [r for r in runs if r in specs]:
        spec, dense = specs[name]

        def mk(spec_, n, dd, e, seed=0, dense=dense):  # the named kind left in fp16
            c = make(spec_, n, dd, e, seed)
            for layer in c.layers if dense else []:
                layer.codec[dense] = FP16Codec()
            return c

        B.make_cache = mk
        t0 = time.perf_counter()
        row, _ = B.evaluate(eng, w, spec, neural, cfg, None)
        B.make_cache = make
        data["ppl"][name] = {"bits_per_element": row["bits_per_element"], "ppl": row["ppl"],
                             "wall_s": time.perf_counter() - t0}
        print(f"{name}: {row['bits_per_element']:.3f} bits, ppl {row['ppl']:.3f}", file=sys.stderr, flush=True)
    lines = [f"CSR diagnosis on {data['model_name']} (NeuralDict MP, 1 x {cfg.seq_len} held-out tokens).", ""]
    if data["ppl"]:
        lines += ["| setting | bits/element | ppl |", "|---|---:|---:|"]
        lines += [f"| {k} | {v['bits_per_element']:.3f} | {v['ppl']:.3f} |" for k, v in data["ppl"].items()]
        lines.append("")
    if data.get("attn"):
        at = data["attn"]
        lines += ["Keys coded alone (k-means, N=4,096, s=4 per 64 channels, fp8 weights; values exact): attention KL "
                  f"(nats per query, summed over layers; first {cfg.sink} tokens exact) and relative key error on the "
                  "held-out window:", "", "| key coding | summed KL | mean key rel. error | KL per layer |",
                  "|---|---:|---:|---|"]
        for k, v in at.items():
            lines.append(f"| {k} | {v['kl_sum']:.3f} | {v['err_mean']:.4f} | "
                         + ", ".join(f"{x:.3f}" for x in v["kl"]) + " |")
        lines.append("")
    if data["layers"]:
        lines += ["| layer | key err tok0 | key err rest | key norm tok0 / rest | value err tok0 | value err rest "
                  "| value norm tok0 / rest |", "|---:|---:|---:|---|---:|---:|---|"]
        for r in data["layers"]:
            lines.append(f"| {r['layer']} | {r['keys_err_tok0']:.3f} | {r['keys_err_rest']:.3f} | "
                         f"{r['keys_norm_tok0']:.1f} / {r['keys_norm_rest']:.1f} | {r['values_err_tok0']:.3f} | "
                         f"{r['values_err_rest']:.3f} | {r['values_norm_tok0']:.1f} / {r['values_norm_rest']:.1f} |")
    name = "csr_diagnose_" + a.model.replace("-", "_").replace(".", "_")
    out = Result(name, data, seed=a.seed, title=f"CSR diagnosis on {data['model_name']}")
    out.markdown = "\n".join(lines) + "\n"
    out.write(a.out)
    print(out.markdown)


def attention_kl(eng, B, cfg, w) -> dict:
    """Per key-coding variant: k-means dictionaries fitted on the calibration keys, then per layer the KL between
    the model's attention on the held-out window ``w`` and the attention over the decoded keys."""
    import torch

    from edgecloud.kvcache.csr import keyprep
    from edgecloud.kvcache.csr.coding import QUANTS, matching_pursuit, reconstruct, spherical_kmeans
    from edgecloud.kvcache.csr.dictionary import chunk, layer_groups
    from edgecloud.llm.corpus import token_windows, topic_split

    ids = token_windows(eng.lm.tokenizer, topic_split()[0], cfg.calib_len, cfg.calib_seqs)
    with keyprep.capture_queries(eng) as q_cal:
        keys = B.calibrate(eng, ids)["keys"]
    with keyprep.capture_queries(eng) as q_held:
        held = B.calibrate(eng, w)["keys"]
    L, _, d = keys.shape
    H = eng.config.num_key_value_heads
    ck, _ = B.dict_configs(cfg, d, cfg.atoms, 0)
    ids_jsd, _ = layer_groups(keys, cfg.group, seed=cfg.seed)
    types = list(getattr(eng.config, "layer_types", None) or ["full_attention"] * L)
    glob = [li for li in range(L) if types[li] == "full_attention"]
    by_type = list(ids_jsd) if len(glob) in (0, L) else [max(ids_jsd) + 1 if li in glob else ids_jsd[li]
                                                         for li in range(L)]
    variants = {"raw": ("", ids_jsd), "center": ("center", ids_jsd), "center+qscale": ("center+qscale", ids_jsd),
                "raw, global layers' own dictionary": ("", by_type)}
    T = w.shape[1]
    out = {}
    for name, (mode, groups) in variants.items():
        prep = B.fit_keyprep(keys, q_cal, replace(cfg, keyprep=mode)) if mode else None
        x = B.prep_flat(prep, keys, cfg.calib_len) if prep else keys
        xh = B.prep_flat(prep, held, T) if prep else held
        kl, err = [0.0] * L, [0.0] * L
        for gi in sorted(set(groups)):
            layers = [li for li in range(L) if groups[li] == gi]
            pool = chunk(x[layers].reshape(-1, d), ck.s_n)
            g = torch.Generator().manual_seed(cfg.seed)
            pool = pool[:, torch.randperm(pool.shape[1], generator=g)[: ck.kmeans_sample]]
            D = spherical_kmeans(pool, ck.n_atoms, iters=ck.kmeans_iters, seed=cfg.seed)
            for li in layers:
                c = chunk(xh[li], ck.s_n)
                idx, coef = matching_pursuit(c, D, ck.s, QUANTS[ck.coef])
                rec = reconstruct(D, idx, coef).transpose(0, 1).reshape(H, T, d)
                k = held[li].reshape(H, T, d)
                rec = prep.inverse(rec[None], li)[0] if prep else rec
                rec[:, : cfg.sink] = k[:, : cfg.sink]
                err[li] = float((rec - k)[:, cfg.sink:].pow(2).sum() / k[:, cfg.sink:].pow(2).sum())
                kl[li] = _attention_kl(eng, li, q_held[li][0], k, rec, types[li])
        out[name] = {"kl": kl, "kl_sum": sum(kl), "err": err, "err_mean": sum(err) / L, "groups": groups}
        print(f"attn {name}: summed KL {sum(kl):.3f}, mean key error {sum(err) / L:.4f}", file=sys.stderr, flush=True)
    return out


def _attention_kl(eng, li, q, k, k_hat, layer_type) -> float:
    """Mean over queries and heads of KL(attention over k || attention over k_hat); q (Hq, T, d) and keys
    (H, T, d) pre-RoPE, rotated here with the layer's RoPE; causal, and windowed on sliding-attention layers."""
    import torch

    T = q.shape[1]
    pos = torch.arange(T)
    att = eng.model.model.layers[li].self_attn
    rep = q.shape[0] // k.shape[0]
    mask = torch.ones(T, T).tril().bool()
    if layer_type == "sliding_attention":
        mask &= ~torch.ones(T, T).tril(-eng.config.sliding_window).bool()
    qr = eng.rotate(q, pos, li)

    def logp(keys):
        kr = eng.rotate(keys, pos, li).repeat_interleave(rep, 0)
        return (qr @ kr.transpose(-1, -2) * att.scaling).masked_fill(~mask, float("-inf")).log_softmax(-1)

    a, b = logp(k), logp(k_hat)
    return float((a.exp() * (a - b)).masked_fill(~mask, 0).sum(-1).mean())


if __name__ == "__main__":
    main()
