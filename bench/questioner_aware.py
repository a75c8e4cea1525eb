"""Questioner-aware responders (QAR, issue 16): the six arms on held-out plays and chat exchanges.

Writes ``docs/results/questioner_aware.{json,md,png}`` through ``edgecloud.results``. Each corpus's raw run (per-
exchange ROUGE-L per arm, probes, training logs) is also saved under ``--runs`` as it finishes, so a run cut short
still leaves the finished corpora, and ``--combine`` re-summarizes saved runs without recomputing.

    python bench/questioner_aware.py                          # plays then chat, 1 seed (~1 h on a busy 2-core box)
    python bench/questioner_aware.py --quick                  # the CLI's --quick preset
    python bench/questioner_aware.py --combine /tmp/qar/runs/plays.json /tmp/qar/runs/chat.json
    python bench/questioner_aware.py --oracle                 # text-only oracles: is a questioner signal there?
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from edgecloud import atomic
from edgecloud.paths import REPO_ROOT
from edgecloud.results import check_out_dir, dumps

OUT = REPO_ROOT / "docs" / "results"


def load_run(path: Path) -> dict:
    r = json.loads(Path(path).read_text())
    for a in r["arms"].values():
        a["rougeL"] = np.asarray(a["rougeL"])
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--corpus", action="append", choices=["plays", "chat"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--max-train", type=int)
    ap.add_argument("--max-eval", type=int)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--runs", default="/tmp/qar/runs", help="where each corpus's raw run is saved")
    ap.add_argument("--combine", nargs="+", help="summarize saved corpus runs instead of running")
    ap.add_argument("--oracle", action="store_true", help="text-only questioner oracles: questioner_aware_oracle")
    a = ap.parse_args(argv)
    if a.oracle:
        from edgecloud.personal.qar import oracle

        check_out_dir(a.out)
        res = oracle.to_result(oracle.run(a.seed, tuple(a.corpus or ("plays", "chat"))), a.seed)
        print("wrote", ", ".join(str(p) for p in res.write(a.out).values()))
        print(res.markdown)
        return 0
    import torch

    from edgecloud.personal.qar.bench import BenchConfig, run_corpus, summarize, write_results

    check_out_dir(a.out)
    torch.set_num_threads(a.threads)
    kw = {"seeds": tuple(range(a.seed, a.seed + a.seeds))}
    if a.corpus:
        kw["corpora"] = tuple(a.corpus)
    for k in ("steps", "max_train", "max_eval"):
        if getattr(a, k):
            kw[k] = getattr(a, k)
    bc = BenchConfig.quick(**kw) if a.quick else BenchConfig(**kw)
    if a.combine:
        runs = [load_run(Path(p)) for p in a.combine]
        saved = json.loads(Path(a.combine[0]).read_text())["bench_config"]
        bc = BenchConfig(**{**saved, "corpora": tuple(r["corpus"] for r in runs), "seeds": tuple(saved["seeds"])})
    else:
        runs = []
        for c in bc.corpora:
            t0 = time.time()
            r = run_corpus(c, bc, lambda m: print(m, file=sys.stderr, flush=True))
            cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in bc.__dict__.items()}
            atomic.write_text(Path(a.runs) / f"{c}.json", dumps({**r, "bench_config": cfg}) + "\n")
            print(f"[{c}] done in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
            runs.append(r)
    data = summarize(runs, bc)
    paths = write_results(data, a.out, a.seed)
    print(json.dumps({k: data[k] for k in ("rougeL_base", "rougeL_lora", "rougeL_name_prompt", "rougeL_qar_nocon",
                                           "rougeL_qar_nocluster", "rougeL_qar", "rel_gain_vs_lora",
                                           "rel_gain_vs_name_prompt", "p_vs_lora", "p_vs_name_prompt")}, indent=1))
    print("wrote", ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
