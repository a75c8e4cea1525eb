"""Why MPIC-32 misses first tokens on passkey prompts; linker variants that keep MPIC's shape, against full prefill.

    python bench/mpic_diagnose.py --rows /tmp/mpic/fid_rows3.json --passkey 40 --squad 20   # run it under `low`

``--rows``: a fidelity study's dump (``bench/mpic.py --fidelity --dump``): its reference first tokens are classified
(no model runs for that part). ``--passkey/--squad``: how many requests of the study's workload (same seed, same
order) run every variant of :mod:`edgecloud.kvcache.diagnose` beside full prefill (~6 linker passes a request).
Writes docs/results/mpic_diagnose.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgecloud.errors import UserError
from edgecloud.results import Result, check_out_dir

OUT = Path(__file__).resolve().parent.parent / "docs" / "results"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default=None, help="a fidelity study's --dump (classified, not re-run)")
    ap.add_argument("--passkey", type=int, default=40)
    ap.add_argument("--squad", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--answers", action="store_true", help="instead of the variants: full prefill's and MPIC-k's "
                    "greedy answers on the --rows study's disagreements, against gold -> mpic_diagnose_answers.*")
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args()
    from edgecloud.kvcache.bench import make_workload
    from edgecloud.kvcache.diagnose import answers_on_misses, classify, sample, summarize_variants, variants
    from edgecloud.kvcache.fidelity import FidelityConfig, load_rows
    from edgecloud.llm.engine import Engine
    from edgecloud.llm.models import load_model

    try:
        check_out_dir(a.out)
        if a.passkey < 0 or a.squad < 0:
            raise UserError("--passkey and --squad must be >= 0")
        if a.answers and not a.rows:
            raise UserError("--answers re-decodes a study's disagreements: give --rows DUMP.json")
        engine = Engine(load_model(a.model), threads=a.threads)
        cfg = FidelityConfig(seed=a.seed)
        reqs = make_workload(engine, cfg.bench_config())
        out = {"model": engine.lm.name, "threads": engine.threads, "seed": a.seed, "k": cfg.k}
        if a.rows:
            import random

            order = list(reqs)
            random.Random(cfg.seed).shuffle(order)
            rows, _ = load_rows(a.rows, order, [f"mpic-{k}" for k in cfg.ks])
            out["classified"] = {"file": Path(a.rows).name, "requests": len(rows),
                                 "by_class": classify(rows, order, cfg.k)}
        if a.answers:
            return write_answers(out, answers_on_misses(engine, rows, order, cfg.k), a)
        progress = lambda i, n: print(f"request {i}/{n}", file=sys.stderr, flush=True)  # noqa: E731
        vrows = variants(engine, sample(reqs, a.passkey, a.squad, cfg.seed), cfg.k, progress)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    out["variants"] = summarize_variants(vrows)
    out["variant_rows"] = vrows
    res = Result("mpic_diagnose", out, seed=a.seed, title="MPIC: why first tokens miss, and linker variants")
    res.markdown = format_md(out, engine)
    res.write(a.out)
    print(res.markdown)


def write_answers(out: dict, rows: list[dict], a) -> None:
    out = {**out, "answers": rows}
    lines = [f"Greedy answers (14 tokens, first line) where MPIC-{out['k']}'s first token differs from full prefill's "
             f"in the study `{out['classified']['file']}` ({out['classified']['requests']} requests), scored "
             "against gold (a gold answer occurs in the answer):", "",
             "| source | disagreements | reference opens with the first passage's first token | full prefill correct | "
             f"MPIC-{out['k']} correct |", "|---|---|---|---|---|"]
    for src in sorted({r["source"] for r in rows}):
        rs = [r for r in rows if r["source"] == src]
        lines.append(f"| {src} | {len(rs)} | {sum(r['ref_opens_first_passage'] for r in rs)} | "
                     f"{sum(r['full_correct'] for r in rs)} | {sum(r['mpic_correct'] for r in rs)} |")
    lines += ["", "| source | gold | full prefill | MPIC |", "|---|---|---|---|"]
    head = f"mpic-{out['k']}"
    cell = lambda t: str(t).replace("|", "\\|")  # noqa: E731
    lines += [f"| {r['source']} | {cell(r['gold'][0])} | {cell(r['full'])} | {cell(r[head])} |" for r in rows]
    res = Result("mpic_diagnose_answers", out, seed=a.seed, title="MPIC: the answers behind the first-token misses")
    res.markdown = "\n".join(lines)
    res.write(a.out)
    print(res.markdown)


def format_md(out: dict, engine) -> str:
    lines = []
    if "classified" in out:
        c = out["classified"]
        lines += [f"Reference first tokens of the fidelity study ({c['requests']} requests, `{c['file']}`), by whether "
                  "full prefill starts by copying a passage's opening (its first token is a passage's first token):",
                  "", f"| class | requests | MPIC-{out['k']} agrees |", "|---|---|---|"]
        lines += [f"| {k} | {v['n']} | {v['agree']} ({v['agreement']:.3f}) |" for k, v in c["by_class"].items()]
        lines.append("")
    rows = out["variant_rows"]
    lines += [f"Variants on {len(rows)} requests of the same workload, against full prefill (fp32):", "",
              "| variant | first-token agreement [95% Wilson CI] | passkey | SQuAD | KL (first token) |",
              "|---|---|---|---|---|"]
    for name, v in out["variants"].items():
        lo, hi = v["agreement_ci"]
        src = {s: f"{b['agree']}/{b['n']}" for s, b in v["by_source"].items()}
        lines.append(f"| {name} | {v['agreement']:.3f} [{lo:.3f}, {hi:.3f}] | {src.get('passkey', '-')} | "
                     f"{src.get('squad', '-')} | {v['kl_first']:.4f} |")
    head = f"mpic-{out['k']}"
    miss = [r for r in rows if not r["methods"][head]["agree"]]
    if miss:
        lines += ["", f"{head} disagreements (reference -> {head}; copies = the reference copies a passage opening): "
                  + "; ".join(f"{r['source']} {engine.decode_text([r['ref_token']])!r}->"
                              f"{engine.decode_text([r['methods'][head]['token']])!r}"
                              f"{' (copies)' if r['copies_opening'] else ''}" for r in miss)]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
