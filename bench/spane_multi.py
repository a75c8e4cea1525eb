"""SPANE at every cluster size: multi-N training runs judged on validation only, and the shipped ``spane`` on test
and outside the public splits.

Reads multi-N training runs (``--runs DIR``, one sub-dir per seed, written by `edgecloud vmsched train` with
``--set train_pms=2,...,9 --set valid_pms=2,...,9``; each run validated every checkpoint on the 150 valid starts at
every N, score = geometric mean over N of trimmed mean / Balance-Fit's) and:

1. selection, on validation only: the candidates are every run's starting model (checkpoint 0, when the runs were
   fine-tuned with ``init_from``) and each run's best trained checkpoint; those within ``--margin`` of the best
   in-training score are scored again on the ``select`` split (600 starts in [50000, 70000), none a public
   validation start) at every N, and the lowest score is the pick;
2. reports each run's best trained checkpoint on the test split at N=5 (median over seeds; never used to choose);
3. evaluates the shipped ``spane`` policy against First-Fit and Balance-Fit on the ``outside`` split (300 starts in
   [110000, 113000)) at every N, and ``spane-paper`` at N=5.

Writes docs/results/spane_multi.{json,md,png} through the results layer.

    nice -n 10 .venv/bin/python bench/spane_multi.py --runs /tmp/spane/runs
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from edgecloud.paths import REPO_ROOT
from edgecloud.results import Result, check_out_dir
from edgecloud.vmsched.agents.select import balance_fit_scores, valid_score
from edgecloud.vmsched.checkpoint import load_model
from edgecloud.vmsched.cluster import ClusterConfig
from edgecloud.vmsched.evaluate import evaluate, trimmed_mean
from edgecloud.vmsched.flex import plot_by_n
from edgecloud.vmsched.policies import make_policy
from edgecloud.vmsched.trace import load_starts, load_trace

SIZES = tuple(range(2, 10))


def tm(tr, policy, n: int, starts) -> float:
    return trimmed_mean(evaluate(tr, ClusterConfig(n_pms=n), policy, starts).totals)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, required=True, help="dir of multi-N run dirs (each with summary.json)")
    ap.add_argument("--margin", type=float, default=0.02,
                    help="re-score on the select split the candidates within this fraction of the best valid score")
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "results")
    ap.add_argument("--no-test", action="store_true",
                    help="skip the runs' test scores at N=5 (5 evaluations; report validation only)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    check_out_dir(args.out)
    t0 = time.perf_counter()
    tr = load_trace()
    sel_starts, test, outside = (load_starts(s, len(tr)) for s in ("select", "test", "outside"))
    runs = sorted(d for d in args.runs.iterdir() if (d / "summary.json").exists())
    if not runs:
        raise SystemExit(f"no run dirs with summary.json in {args.runs}")

    seeds, cands = [], {}
    for run in runs:
        s = json.loads((run / "summary.json").read_text())
        hist = s["history"]
        trained = [h for h in hist if h["episode"] > 0]
        best = min(trained, key=lambda h: (h["valid_score"], h["episode"]))
        init = next((h for h in hist if h["episode"] == 0), None)
        if init is not None:
            cands["init: " + s["config"]["init_from"]] = (init["valid_score"], run / "checkpoints" / "ep000000")
        best_dir = run / "checkpoints" / f"ep{best['episode']:06d}"
        cands[f"{run.name} ep{best['episode']}"] = (best["valid_score"], best_dir)
        net, cfg, _ = load_model(best_dir)
        test5 = None if args.no_test else tm(tr, _policy(net, cfg), 5, test)
        print(f"{run.name}: best trained checkpoint ep{best['episode']} valid {best['valid_score']:.4f} "
              f"(start {init['valid_score'] if init else float('nan'):.4f}) test N=5 {test5}", flush=True)
        seeds.append({"run": run.name, "seed": s["seed"], "episodes": s["episodes"], "env_steps": s["env_steps"],
                      "wall_s": s["wall_s"], "start_valid_score": init["valid_score"] if init else None,
                      "best_episode": best["episode"], "best_valid_score": best["valid_score"],
                      "valid_by_n": best["valid_by_n"], "test_n5": test5})

    top = min(v for v, _ in cands.values())
    rescored = {}
    bf_sel = balance_fit_scores(tr, SIZES, sel_starts)
    for name, (v, d) in sorted(cands.items(), key=lambda kv: kv[1][0]):
        if v <= top * (1 + args.margin):
            net, cfg, _ = load_model(d)
            rescored[name] = valid_score(tr, net, cfg.agent, SIZES, sel_starts, bf_sel)[0]
            print(f"select split: {name} {rescored[name]:.4f}", flush=True)
    pick = min(rescored, key=rescored.get)

    spane, paper = make_policy("spane", n_pms=5), make_policy("spane-paper", n_pms=5)
    out_rows = []
    for n in SIZES:
        row = {"n_pms": n, "first_fit": tm(tr, make_policy("first-fit"), n, outside),
               "balance_fit": tm(tr, make_policy("balance-fit"), n, outside), "spane": tm(tr, spane, n, outside)}
        row["spane_vs_bf"] = round(row["spane"] / row["balance_fit"], 4)
        out_rows.append(row)
        print(f"outside N={n}: {row}", flush=True)
    paper5 = tm(tr, paper, 5, outside)
    bf5 = out_rows[3]["balance_fit"]

    summary = {"pick": pick, "pick_select_score": rescored[pick], "rescored_on_select": rescored,
               "valid_scores": {k: v for k, (v, _) in cands.items()},
               "median_test_n5_best_trained": None if args.no_test else float(np.median([s["test_n5"] for s in seeds])),
               "median_valid_score_best_trained": float(np.median([s["best_valid_score"] for s in seeds])),
               "outside_spane_paper_n5": paper5, "outside_spane_paper_n5_vs_bf": round(paper5 / bf5, 4),
               "outside_spane_below_bf_every_n": all(r["spane"] < r["balance_fit"] for r in out_rows)}
    res = Result("spane_multi", {"summary": summary, "seeds": seeds, "outside_by_n": out_rows}, seed=0,
                 title="SPANE-NUMA fine-tuned on N = 2..9, and `spane` outside the public splits "
                       "(generated by `bench/spane_multi.py`)")
    res.markdown = (
        f"Runs: `{args.runs}` ({len(seeds)} seeds). Validation score = geometric mean over N = 2..9 of the trimmed "
        "mean / Balance-Fit's on the same starts (lower is better; < 1 beats Balance-Fit on average). Selection uses "
        "validation only: the 150 valid starts during training, then the `select` split (600 starts in "
        f"[50000, 70000)) for the candidates within {args.margin:.0%} of the best. Test scores are reported, never "
        "used to choose.\n\n"
        f"**Pick: {pick}** (select score {rescored[pick]:.4f}). Median over seeds of each run's best trained "
        f"checkpoint: valid score {summary['median_valid_score_best_trained']:.4f}, test N=5 "
        f"{summary['median_test_n5_best_trained'] or 'not run (--no-test)'}.\n\n### Runs\n")
    res.table([{k: (f"{v:,.0f}" if k == "test_n5" and v is not None else v) for k, v in s.items() if k != "valid_by_n"}
               for s in seeds], [k for k in seeds[0] if k != "valid_by_n"])
    res.markdown += ("\n### `spane` outside the public splits (300 starts in [110000, 113000); reported only)\n")
    res.table([{k: (f"{v:,.0f}" if isinstance(v, float) and k != "spane_vs_bf" else v) for k, v in r.items()}
               for r in out_rows], list(out_rows[0]))
    res.markdown += (f"\n`spane-paper` at N=5 on the same starts: {paper5:,.0f} ({paper5 / bf5:.3f} x Balance-Fit).\n")
    res.figure = plot(seeds)
    paths = res.write(args.out)
    print(res.markdown)
    print(f"wrote {paths['md']} ({time.perf_counter() - t0:.0f} s)")


def _policy(net, cfg):
    from edgecloud.vmsched.agents.policy import QPolicy

    return QPolicy(net, cfg.agent)


def plot(seeds):
    series = {f"{s['run']} ep{s['best_episode']}": [s["valid_by_n"][str(n)] for n in SIZES] for s in seeds}
    return plot_by_n(SIZES, series, "valid trimmed mean (s)",
                     "Best trained checkpoint of each multi-N run (validation)", legend_size=7, alpha=0.6)


if __name__ == "__main__":
    main()
