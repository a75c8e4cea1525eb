"""CSR vs KIVI at <= 2 bits per element, per model: one run, then the docs table and the memory–quality frontier.

Runs fp16, KIVI-2/4 (recent tokens in fp16) and CSR (NeuralDict vs k-means, MP vs OMP, 1–4 bits, the former int16 +
fp16 storage, dictionary sizes 4,096 / 8,192 / 16,384) over held-out pydoc text, optionally answer F1 on SQuAD and
FanOutQA, and writes ``docs/results/csr.{json,md,png}`` (SmolLM2) or ``csr_<model>.*`` through ``edgecloud.results``.

    python bench/csr.py --dicts-only [--model M]       # train (or find) the dictionaries: long, once per model
    python bench/csr.py --qa 50                         # SmolLM2-135M, with 50 SQuAD + 50 FanOutQA questions
    python bench/csr.py --model gemma3-270m --qa 50     # its preset: group 6, keyprep center+qscale, 3 sinks
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
KEYPREP = {"": "as they are", "center": "minus their per-layer, per-KV-head channel mean (fp16, counted)",
           "center+qscale": "minus their channel mean and scaled by the queries' RMS per RoPE pair (fp16 mean and "
                            "pair scales counted per prompt)"}


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
        scalar = isinstance(cur, int | float | str) and not isinstance(cur, bool)
        cfg = replace(cfg, **{k: type(cur)(v) if scalar else json.loads(v)})
    return cfg


def table(res: dict) -> str:
    cfg = res["config"]
    fp = next(r for r in res["rows"] if r["method"] == "fp16")["ppl"]
    by = {r["method"]: r for r in res["rows"]}
    lines = [
        f"{res['model_name']} (`{res['model']}`; {res['layers']} layers, {res['kv_heads']} KV heads, head_dim "
        f"{res['head_dim']}), {cfg['eval_seqs']} held-out pydoc sequence(s) x {cfg['seq_len']} tokens "
        f"({res['eval_tokens']} tokens), fed {cfg['chunk']} tokens at a time, every token outside the fp16 "
        f"sink / recent window coded before it is attended to (CSR keeps the first {cfg.get('sink', 0)} tokens in "
        f"fp16, counted). Dictionaries: N={cfg['atoms']} atoms per layer group (groups of ~{cfg['group']} adjacent "
        f"layers cut by JSD: keys {res['layer_groups']['keys']}), {cfg['calib_seqs']} x {cfg['calib_len']} "
        f"calibration tokens, early-stopped on {cfg['val_seqs']} held-out windows; main CSR setting: "
        f"{cfg['coef']} weights, {'bit-packed' if cfg['packed'] else 'int16'} indices, budget {cfg['bits']} "
        f"bits/element; keys coded pre-RoPE, {KEYPREP[cfg.get('keyprep', '')]}; seed {cfg['seed']}.",
        "",
        "| method | atoms | s keys / values per 64 ch | fp16 sink / recent tokens | bits/element | ppl | ppl / fp16 "
        "| top-1 vs fp16 | encode µs/token | decode µs/token |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        sv = f"{r['s_keys']} / {r['s_values']}" if r.get("s_keys") else ""
        win = f"{r.get('sink', 0)} / {r.get('residual', 0)}" if "residual" in r else ""
        lines.append(f"| {r['method']} | {r.get('atoms') or ''} | {sv} | {win} | {r['bits_per_element']:.3f} | "
                     f"{r['ppl']:.3f} | {r['ppl'] / fp:.3f} | {r['top1_agreement']:.4f} | "
                     f"{r['encode_us_per_token']:.0f} | {r['decode_us_per_token']:.0f} |")
    c, k2 = by["csr"], by["kivi2"]
    verdict = "met" if c["ppl"] <= k2["ppl"] and c["bits_per_element"] <= 2.0 else "missed"
    lines += ["", f"**Goal (CSR at <= 2.0 bits/element with perplexity <= KIVI-2's): {verdict}.** CSR "
              f"{c['bits_per_element']:.3f} bits, perplexity {c['ppl']:.3f}; KIVI-2 {k2['bits_per_element']:.3f} "
              f"bits, perplexity {k2['ppl']:.3f}: CSR / KIVI-2 memory x{res['memory_ratio_csr_over_kivi2']:.3f}, "
              f"perplexity x{res['ppl_ratio_csr_over_kivi2']:.3f}; NeuralDict / k-means perplexity "
              f"x{res['ppl_ratio_neuraldict_over_kmeans']:.3f}.", ""]
    if "qa" in res:
        q = res["qa"]
        lines += ["Answer F1 with the compressed cache (SQuAD token F1 vs gold, 95% bootstrap interval; "
                  "F1 vs fp16 = agreement with the fp16 cache's own answer; bits/element of each prompt + answer's "
                  "cache, every byte counted, mean over the questions). FanOutQA is closed-book (see docs).", "",
                  "| set | n | method | bits/element | F1 vs gold | 95% CI | F1 vs fp16 answer |",
                  "|---|---:|---|---:|---:|---|---:|"]
        for src, rows in q["summary"].items():
            for m, v in rows.items():
                b = f"{v['bits_per_element']:.2f}" if "bits_per_element" in v else ""
                lines.append(f"| {src} | {v['n']} | {m} | {b} | {100 * v['f1']:.1f} | "
                             f"[{100 * v['f1_ci'][0]:.1f}, {100 * v['f1_ci'][1]:.1f}] | {100 * v['f1_vs_fp16']:.1f} |")
        lines.append("")
    if res["coders"]:
        lines += ["Coders on held-out calibration vectors (relative squared error; encode µs per vector per layer, "
                  "all chunks, one thread, busy shared machine):", "",
                  "| dictionary | atoms | kind | coder | s x s_n | rel. error | µs/vector |",
                  "|---|---:|---|---|---|---:|---:|"]
    for c in res["coders"]:
        lines.append(f"| {c['dictionary']} | {c['atoms']} | {c['kind']} | {c['coder']} | {c['s']} x {c['s_n']} | "
                     f"{c['rel_err']:.4f} | {c['us_per_vector']:.1f} |")
    if res.get("sizes"):
        lines += ["", f"Dictionary sizes on one layer group (layers {res['sizes'][0]['layers']}), each at its own "
                  f"<= {cfg['bits']}-bit budget (⌈log2 N⌉-bit indices): held-out relative MP error of the k-means "
                  f"start and after {cfg['sweep_steps']} NeuralDict steps, MP encode time (µs/token = µs/vector x "
                  "layers x KV heads; busy shared machine):", "",
                  "| atoms | kind | s | bits/element | training vectors | k-means error | NeuralDict error "
                  "| µs/vector | encode ms/token |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in res["sizes"]:
            lines.append(f"| {r['atoms']} | {r['kind']} | {r['s']} x {r['s_n']} | {r['bits_per_element']:.3f} | "
                         f"{r['train_vectors']} | {r['rel_err_kmeans']:.4f} | {r['rel_err']:.4f} | "
                         f"{r['us_per_vector']:.0f} | {r['encode_us_per_token'] / 1000:.1f} |")
    lines += ["", "Dictionary training (held-out relative MP error, every evaluation; training stops when it has not "
              "fallen by 0.2% for 3 evaluations, or at the step cap; the best is kept):", ""]
    for name, info in res["dictionary_training"].items():
        for kind, curve in (info.get("curves") or {}).items():
            pts = ", ".join(f"{p['step']}: {p['heldout']:.4f}" for p in curve)
            lines.append(f"- {name} {kind}: {pts}")
        if info.get("command"):
            lines.append(f"  - trained by `{info['command']}` in {info.get('train_s') or 0:.0f} s")
    lines.append("")
    lines.append("Bits count every stored byte per prompt: indices (bit-packed or int16), weights (fp8/fp16), KIVI "
                 "codes and fp16 scales/zero points, the dense fp16 residual. The shared dictionaries are model-side "
                 "like weights (fp16 bytes: " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in
                                                           res["dictionary_bytes"].items()) + ").")
    return "\n".join(lines) + "\n"


def plot(res: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})
    style = {"fp16": ("k", "*"), "kivi": ("tab:red", "s"), "csr-kmeans": ("tab:orange", "D"),
             "csr-omp": ("tab:green", "^"), "csr-N": ("tab:purple", "P"), "csr-int16": ("tab:gray", "v")}
    for r in res["rows"]:
        m = r["method"]
        c, mk = next((v for k, v in style.items() if m.startswith(k)), ("tab:blue", "o"))
        ax.scatter(r["bits_per_element"], r["ppl"], c=c, marker=mk, s=140 if m == "fp16" else 60)
        ax.annotate(m, (r["bits_per_element"], r["ppl"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    line = sorted((r for r in res["rows"] if r["method"] in ("csr-1bit", "csr", "csr-3bit", "csr-4bit")),
                  key=lambda r: r["bits_per_element"])
    ax.plot([r["bits_per_element"] for r in line], [r["ppl"] for r in line], "-", c="tab:blue", alpha=0.5,
            label="CSR (NeuralDict, MP), 1-4 bits")
    kv = sorted((r for r in res["rows"] if r["method"].startswith("kivi")), key=lambda r: r["bits_per_element"])
    ax.plot([r["bits_per_element"] for r in kv], [r["ppl"] for r in kv], "--", c="tab:red", alpha=0.5,
            label="KIVI-2/4 (+32 fp16 recent tokens)")
    ax.axvline(2.0, ls=":", c="gray", label="2 bits/element")
    ax.set_xlabel("bits per KV element (every stored byte)")
    ax.set_ylabel("perplexity (held-out pydoc)")
    ax.set_yscale("log")
    ax.set_xscale("log", base=2)
    ax.set_title(f"KV-cache memory vs quality, {res['model_name']}")
    ax.legend(fontsize=8)
    for name, info in res["dictionary_training"].items():
        for kind, curve in (info.get("curves") or {}).items():
            ax2.plot([p["step"] for p in curve], [p["heldout"] for p in curve], "-o" if kind == "keys" else "--s",
                     ms=3, label=f"{name} {kind}")
    ax2.set_xlabel("NeuralDict step (0 = k-means start)")
    ax2.set_ylabel("held-out relative MP error")
    ax2.set_yscale("log")
    ax2.set_title("dictionary training, early-stopped")
    ax2.legend(fontsize=7)
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
    ap.add_argument("--qa", type=int, default=0, help="SQuAD questions, and FanOutQA ones unless --fanoutqa (0: no QA)")
    ap.add_argument("--fanoutqa", type=int, default=-1, help="FanOutQA questions (-1: as many as --qa)")
    ap.add_argument("--dicts-only", action="store_true", help="train (or find) the dictionaries, then stop")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a BenchConfig field (ints/floats), e.g. --set seq_len=1024")
    a = ap.parse_args()
    check_out_dir(a.out)
    if a.from_json:
        res = json.loads(a.from_json.read_text())
        render = res.pop("provenance", None)  # a re-render keeps the measuring run's provenance beside its own
        res["measured_provenance"] = res.get("measured_provenance") or render
    else:
        from edgecloud.kvcache.csr.bench import BenchConfig, prepare, preset, run
        from edgecloud.kvcache.csr.qa import QAConfig
        from edgecloud.llm.engine import Engine
        from edgecloud.llm.models import load_model

        cfg = preset(BenchConfig.quick(a.seed) if a.quick else BenchConfig(seed=a.seed), a.model)
        if a.group:
            cfg = replace(cfg, group=a.group)
        cfg = apply_overrides(cfg, a.set)
        engine = Engine(load_model(a.model), threads=a.threads)

        def log(m):
            print(m, file=sys.stderr, flush=True)

        if a.dicts_only:
            _, info, _ = prepare(engine, cfg, log)
            print(json.dumps(info, indent=1))
            return
        fan = a.qa if a.fanoutqa < 0 else a.fanoutqa
        res = run(cfg, engine, log=log, qa=QAConfig(squad=a.qa, fanoutqa=fan) if a.qa or fan else None)
    out = Result(result_name(res["model_name"]), res, seed=a.seed, title=f"CSR vs KIVI on {res['model_name']}")
    out.markdown = table(res)
    out.figure = plot(res)
    out.write(a.out)
    print(out.markdown)


if __name__ == "__main__":
    main()
