"""CSR vs KIVI at equal memory on SmolLM2-135M: one run, then the docs table and the memory–quality frontier.

Runs fp16, KIVI-2/4 (residual of recent tokens in fp16) and CSR (NeuralDict vs k-means, MP vs OMP, 1–4 bits,
dense-residual and online-atom variants) over held-out pydoc text, and writes
``docs/results/csr.json`` (raw, with provenance), ``docs/results/csr.md`` (table) and ``docs/results/csr.png``
(frontier), together through ``edgecloud.results``.

    python bench/csr.py                      # full run (4 x 1024 tokens, 1024 atoms); ~15-25 min on one core
    python bench/csr.py --quick              # the CLI's --quick preset
    python bench/csr.py --from-json docs/results/csr.json   # re-render table + plot only
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from edgecloud.paths import REPO_ROOT
from edgecloud.results import Result, check_out_dir

OUT = REPO_ROOT / "docs" / "results"


def result_name(model: str) -> str:
    """docs/results/csr.* for SmolLM2 (the first model), csr_<model>.* for any other."""
    return "csr" if model == "smollm2-135m" else "csr_" + model.replace("-", "_").replace(".", "_")


def apply_overrides(cfg, sets: list[str]):
    from edgecloud.errors import UserError

    for kv in sets:
        k, _, v = kv.partition("=")
        if k not in cfg.__dataclass_fields__ or not v:
            raise UserError(f"--set {kv}: use KEY=VALUE with a BenchConfig field")
        cur = getattr(cfg, k)
        cfg = replace(cfg, **{k: type(cur)(v) if isinstance(cur, int | float | str) else json.loads(v)})
    return cfg


def table(res: dict) -> str:
    cfg = res["config"]
    lines = [
        f"SmolLM2-135M-Instruct (`{res['model']}`), {cfg['eval_seqs']} held-out pydoc sequences x "
        f"{cfg['seq_len']} tokens ({res['eval_tokens']} tokens), fed {cfg['chunk']} tokens at a time; "
        f"dictionaries: N={cfg['atoms']} atoms per layer, {cfg['steps']} NeuralDict steps, seed {cfg['seed']}.",
        "",
        "| method | bits/element | ppl | ppl / fp16 | top-1 agreement vs fp16 | encode µs/token | decode µs/token |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    fp = next(r for r in res["rows"] if r["method"] == "fp16")["ppl"]
    for r in res["rows"]:
        lines.append(f"| {r['method']} | {r['bits_per_element']:.3f} | {r['ppl']:.3f} | {r['ppl'] / fp:.3f} | "
                     f"{r['top1_agreement']:.4f} | {r['encode_us_per_token']:.0f} | {r['decode_us_per_token']:.0f} |")
    by = {r["method"]: r for r in res["rows"]}
    if "csr-3bit+res" in by:
        eq, kv = by["csr-3bit+res"], by["kivi2"]
        lines += ["", f"Equal memory: csr-3bit+res {eq['bits_per_element']:.3f} vs kivi2 {kv['bits_per_element']:.3f} "
                  f"bits/element: perplexity x{eq['ppl'] / kv['ppl']:.3f}, top-1 agreement "
                  f"{eq['top1_agreement']:.4f} vs {kv['top1_agreement']:.4f}."]
    lines += ["", f"At 2 bits: CSR / KIVI-2: memory x{res['memory_ratio_csr_over_kivi2']:.3f}, "
              f"perplexity x{res['ppl_ratio_csr_over_kivi2']:.3f}; NeuralDict / k-means perplexity "
              f"x{res['ppl_ratio_neuraldict_over_kmeans']:.3f}.", "",
              "Coders on held-out calibration vectors (relative squared error, µs per vector per layer, 1 thread):",
              "", "| dictionary | kind | coder | s x s_n | rel. error | µs/vector |", "|---|---|---|---|---:|---:|"]
    for c in res["coders"]:
        lines.append(f"| {c['dictionary']} | {c['kind']} | {c['coder']} | {c['s']} x {c['s_n']} | "
                     f"{c['rel_err']:.4f} | {c['us_per_vector']:.1f} |")
    lines.append("")
    lines.append("Bits count every stored byte per prompt: indices (int16), weights (fp16), KIVI scales and zero "
                 "points (fp16), the dense fp16 residual, per-prompt online atoms. The shared per-layer dictionaries "
                 f"({res['dictionary_bytes'] / 2**20:.1f} MiB fp16, model-side like weights) are not per-prompt.")
    return "\n".join(lines) + "\n"


def plot(res: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in res["rows"]:
        m = r["method"]
        color = "k" if m == "fp16" else ("tab:red" if m.startswith("kivi") else "tab:blue")
        marker = "s" if m.startswith("kivi") else ("*" if m == "fp16" else "o")
        ax.scatter(r["bits_per_element"], r["ppl"], c=color, marker=marker, s=60 if m != "fp16" else 140)
        ax.annotate(m, (r["bits_per_element"], r["ppl"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    series = {"CSR (NeuralDict, MP), s varied": ("csr-1bit", "csr", "csr-3bit", "csr-4bit"),
              "CSR + 32 dense recent tokens": ("csr-1bit+res", "csr+res", "csr-3bit+res")}
    for (label, names), style in zip(series.items(), ("-", "--")):
        line = sorted((r for r in res["rows"] if r["method"] in names), key=lambda r: r["bits_per_element"])
        ax.plot([r["bits_per_element"] for r in line], [r["ppl"] for r in line], style, c="tab:blue", alpha=0.5,
                label=label)
    ax.axvline(2.0, ls=":", c="gray", label="2 bits = fp16/8")
    ax.set_xlabel("bits per KV element (all overheads)")
    ax.set_ylabel("perplexity (held-out pydoc)")
    ax.set_yscale("log")
    ax.set_xscale("log", base=2)
    ax.set_title("KV-cache memory vs quality, SmolLM2-135M")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--from-json", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--group", type=int, default=0, help="layers per shared dictionary (0: the preset's)")
    ap.add_argument("--qa", type=int, default=0, help="SQuAD and FanOutQA questions each (0: no QA)")
    ap.add_argument("--dicts-only", action="store_true", help="train (or find) the dictionaries, then stop")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a BenchConfig field (ints/floats), e.g. --set seq_len=1024")
    a = ap.parse_args()
    check_out_dir(a.out)
    if a.from_json:
        res = json.loads(a.from_json.read_text())
        res.pop("provenance", None)  # re-rendering keeps the numbers; the new provenance says it was re-rendered
    else:
        from edgecloud.kvcache.csr.bench import BenchConfig, run
        from edgecloud.llm.engine import Engine
        from edgecloud.llm.models import load_model

        from edgecloud.kvcache.csr.bench import prepare
        from edgecloud.kvcache.csr.qa import QAConfig

        cfg = BenchConfig.quick(a.seed) if a.quick else BenchConfig(seed=a.seed)
        if a.group:
            cfg = replace(cfg, group=a.group)
        cfg = apply_overrides(cfg, a.set)
        engine = Engine(load_model(a.model), threads=a.threads)
        log = (lambda m: print(m, file=sys.stderr, flush=True))
        if a.dicts_only:
            _, info, _ = prepare(engine, cfg, log)
            print(json.dumps(info, indent=1))
            return
        res = run(cfg, engine, log=log, qa=QAConfig(squad=a.qa, fanoutqa=a.qa) if a.qa else None)
    out = Result(result_name(res["model_name"]), res, seed=a.seed, title=f"CSR vs KIVI on {res['model_name']}")
    out.markdown = table(res)
    out.figure = plot(res)
    out.write(a.out)
    print(out.markdown)


if __name__ == "__main__":
    main()
