"""Where CSR loses quality on a model: per-layer MP error of the first token vs the rest (keys and values), and
perplexity with only keys / only values coded, or with the first tokens kept in fp16 (attention sinks).

    python bench/csr_diagnose.py --model gemma3-270m --runs err,sink1,keysonly,valuesonly

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

RUNS = ("err", "sink1", "sink4", "keysonly", "valuesonly")


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


if __name__ == "__main__":
    main()
