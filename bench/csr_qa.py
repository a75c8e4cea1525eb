"""Answer F1 with the KV cache compressed (fp16, KIVI-2/4, CSR at the contract setting), QA only: no perplexity rerun.

Uses the cached dictionaries of the perplexity run (``bench/csr.py``; trains them only if missing) and the same four
settings (``contract_specs``: CSR at <= 2 bits with the model preset's fp16 sinks), answers a seeded sample of SQuAD
v1.1 dev (and optionally FanOutQA dev, closed-book) and writes ``docs/results/csr_qa[_<model>].{json,md,png}``:
F1 vs gold and vs the fp16 answer with bootstrap intervals, and the paired difference CSR - KIVI-2.

    python bench/csr_qa.py --squad 36                       # SmolLM2-135M
    python bench/csr_qa.py --model gemma3-270m --squad 12   # its preset (keyprep, 3 sinks)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgecloud.paths import REPO_ROOT
from edgecloud.results import Result, check_out_dir

OUT = REPO_ROOT / "docs" / "results"


def result_name(model: str) -> str:
    return "csr_qa" if model == "smollm2-135m" else "csr_qa_" + model.replace("-", "_").replace(".", "_")


def table(res: dict) -> str:
    q, cfg = res["qa"], res["config"]
    lines = [f"{res['model_name']}: answer F1 with the compressed KV cache, a seeded sample (seed {cfg['seed']}) of "
             f"each set; the prompt is fed {res['qa']['config'].get('chunk', 64)} tokens at a time through the cache, "
             f"the answer decoded greedily (at most {q['config']['max_new_tokens']} tokens) from it. CSR: N="
             f"{cfg['atoms']} atoms, budget {cfg['bits']} bits, {cfg['sink']} fp16 sink tokens (counted), keys "
             f"{cfg['keyprep'] or 'raw'} pre-RoPE; KIVI keeps {cfg['residual']} fp16 recent tokens (counted). "
             "Bits/element: each prompt + answer's cache, every byte counted, mean over the questions. F1 = SQuAD "
             "token F1 (x100) with a 95% bootstrap interval over questions; F1 vs fp16 = agreement with the fp16 "
             "cache's own answer.", "",
             "| set | n | method | bits/element | F1 vs gold | 95% CI | F1 vs fp16 answer | 95% CI |",
             "|---|---:|---|---:|---:|---|---:|---|"]
    for src, rows in q["summary"].items():
        for m, v in rows.items():
            lo, hi = v["f1_ci"]
            vlo, vhi = v["f1_vs_fp16_ci"]
            lines.append(f"| {src} | {v['n']} | {m} | {v['bits_per_element']:.2f} | {100 * v['f1']:.1f} | "
                         f"[{100 * lo:.1f}, {100 * hi:.1f}] | {100 * v['f1_vs_fp16']:.1f} | "
                         f"[{100 * vlo:.1f}, {100 * vhi:.1f}] |")
    lines += ["", "Paired differences (same questions; mean and 95% bootstrap interval, x100):", "",
              "| set | pair | F1 vs gold | 95% CI | F1 vs fp16 answer | 95% CI |", "|---|---|---:|---|---:|---|"]
    for src, pairs in q["paired"].items():
        for name, d in pairs.items():
            g, a = d["f1"], d["f1_vs_fp16"]
            lines.append(f"| {src} | {name} | {100 * g['mean']:+.1f} | [{100 * g['ci'][0]:+.1f}, "
                         f"{100 * g['ci'][1]:+.1f}] | {100 * a['mean']:+.1f} | [{100 * a['ci'][0]:+.1f}, "
                         f"{100 * a['ci'][1]:+.1f}] |")
    if "squad" in q["paired"] and "csr-kivi2" in q["paired"]["squad"]:
        d = q["paired"]["squad"]["csr-kivi2"]["f1"]
        verdict = "met" if d["mean"] >= -0.01 else "missed"
        sure = " (the interval excludes -1 point)" if d["ci"][0] > -0.01 else \
            (" (the interval excludes the goal)" if d["ci"][1] < -0.01 else " (the interval straddles -1 point)")
        lines += ["", f"**Goal (CSR's SQuAD F1 within 1 point of KIVI-2's): {verdict}{sure}.** CSR - KIVI-2 = "
                  f"{100 * d['mean']:+.1f} F1 [{100 * d['ci'][0]:+.1f}, {100 * d['ci'][1]:+.1f}] over {d['n']} "
                  "questions."]
    lines += ["", "Examples (first questions of each set):", ""]
    for src, ex in q["examples"].items():
        for e in ex[:3]:
            lines.append(f"- {src}: {e['question']!r} gold {e['gold']!r}: "
                         + "; ".join(f"{m} {e[m]!r}" for m in q["summary"][src]))
    return "\n".join(lines) + "\n"


def plot(res: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    q = res["qa"]
    sets = list(q["summary"])
    fig, axes = plt.subplots(1, len(sets), figsize=(6 * len(sets), 4.5), squeeze=False)
    for ax, src in zip(axes[0], sets):
        rows = q["summary"][src]
        x = np.arange(len(rows))
        for off, key, lab in ((-0.2, "f1", "F1 vs gold"), (0.2, "f1_vs_fp16", "F1 vs fp16 answer")):
            mean = np.array([100 * v[key] for v in rows.values()])
            ci = np.array([[100 * c for c in v[key + "_ci"]] for v in rows.values()])
            ax.bar(x + off, mean, 0.4, yerr=[mean - ci[:, 0], ci[:, 1] - mean], capsize=3, label=lab)
        ax.set_xticks(x, [f"{m}\n{v['bits_per_element']:.2f} b" for m, v in rows.items()])
        ax.set_ylabel("token F1 (x100), 95% bootstrap CI")
        ax.set_title(f"{res['model_name']}: {src} (n={next(iter(rows.values()))['n']})")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--squad", type=int, default=36, help="SQuAD v1.1 dev questions (seeded sample)")
    ap.add_argument("--fanoutqa", type=int, default=0, help="FanOutQA dev questions (closed-book; 0: skip)")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args()
    check_out_dir(a.out)
    from dataclasses import asdict

    from edgecloud.kvcache.csr.bench import BenchConfig, contract_specs, prepare, preset
    from edgecloud.kvcache.csr.qa import QAConfig, qa_compare
    from edgecloud.llm.engine import Engine
    from edgecloud.llm.models import load_model

    qcfg = QAConfig(squad=a.squad, fanoutqa=a.fanoutqa, max_new_tokens=a.max_new_tokens)
    cfg = preset(BenchConfig(seed=a.seed, sizes=()), a.model)
    engine = Engine(load_model(a.model), threads=a.threads)

    def log(m):
        print(m, file=sys.stderr, flush=True)

    dicts, info, _ = prepare(engine, cfg, log)
    qa = qa_compare(engine, contract_specs(cfg, dicts["neuraldict"]), qcfg, a.seed, log)
    qa["config"]["chunk"] = qcfg.chunk
    res = {"model": engine.lm.fingerprint, "model_name": engine.lm.name, "config": asdict(cfg), "qa": qa,
           "dictionary": {k: {"command": v.get("command"), "file": v.get("cached") or v.get("trained")}
                          for k, v in info.items()}}
    for src, rows in qa["summary"].items():
        for m, v in rows.items():
            res[f"f1_{src}_{m}"] = v["f1"]
        if "csr-kivi2" in qa["paired"][src]:
            res[f"f1_{src}_csr_minus_kivi2"] = qa["paired"][src]["csr-kivi2"]["f1"]["mean"]
    out = Result(result_name(a.model), res, seed=a.seed, title=f"CSR vs KIVI: answer F1 on {engine.lm.name}")
    out.markdown = table(res)
    out.figure = plot(res)
    out.write(a.out)
    print(out.markdown)


if __name__ == "__main__":
    main()
