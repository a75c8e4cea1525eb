"""SPANE at every cluster size: multi-N training runs, selection on validation only, and the shipped ``spane``.

Reads multi-N training runs (``--runs DIR``, one sub-dir per seed, as `edgecloud vmsched train --out` writes them
with ``--set train_pms=2,...,9 --set valid_pms=2,...,9``) and:

1. per seed, takes the ``--top`` checkpoints with the best in-training validation score (150 valid starts, every N);
2. scores every candidate on the ``select`` split (600 starts in [50000, 70000), none a public validation start)
   at N = 2..9: the geometric mean over N of trimmed mean / Balance-Fit's; each seed's model is its best candidate,
   and the shipped model the best over all seeds (the test split is never used to choose);
3. evaluates each seed's model and the N=5-only SPANE-NUMA on the test split at every N (median over seeds, and
   the validation-picked model), and both on the ``outside`` split (300 starts in [110000, 113000), only reported);
4. with ``--ship``, copies the picked model to edgecloud/vmsched/models/spane-multi with its scores in meta.

Writes docs/results/spane_multi.{json,md,png} through the results layer.

    nice -n 10 .venv/bin/python bench/spane_multi.py --runs /tmp/spane/runs --ship
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from edgecloud.paths import REPO_ROOT
from edgecloud.results import Result, check_out_dir
from edgecloud.vmsched.agents.policy import QPolicy
from edgecloud.vmsched.agents.select import balance_fit_scores, ranked_checkpoints, valid_score
from edgecloud.vmsched.checkpoint import MODELS_DIR, load_model, save_model
from edgecloud.vmsched.cluster import ClusterConfig
from edgecloud.vmsched.evaluate import evaluate, trimmed_mean
from edgecloud.vmsched.policies import make_policy
from edgecloud.vmsched.trace import load_starts, load_trace

SIZES = tuple(range(2, 10))
SHIP = MODELS_DIR / "spane-multi"


def test_by_n(tr, net, agent: str, starts, sizes=SIZES) -> dict[int, float]:
    return {n: trimmed_mean(evaluate(tr, ClusterConfig(n_pms=n), QPolicy(net, agent), starts).totals) for n in sizes}


def heuristic_by_n(tr, name: str, starts, sizes=SIZES) -> dict[int, float]:
    return {n: trimmed_mean(evaluate(tr, ClusterConfig(n_pms=n), make_policy(name), starts).totals) for n in sizes}


def geo_ratio(by_n: dict[int, float], ref: dict[int, float]) -> float:
    return float(np.exp(np.mean([np.log(by_n[n] / ref[n]) for n in by_n])))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, required=True, help="dir of multi-N run dirs (each with checkpoints/)")
    ap.add_argument("--top", type=int, default=3, help="candidates per seed, by in-training validation score")
    ap.add_argument("--ship", action="store_true", help="copy the picked model to models/spane-multi")
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "results")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    check_out_dir(args.out)
    t0 = time.perf_counter()
    tr = load_trace()
    sel_starts, test, outside = (load_starts(s, len(tr)) for s in ("select", "test", "outside"))
    runs = sorted(d for d in args.runs.iterdir() if (d / "checkpoints").is_dir())
    if not runs:
        raise SystemExit(f"no run dirs with checkpoints/ in {args.runs}")
    bf_sel = balance_fit_scores(tr, SIZES, sel_starts)
    heur_test = {h: heuristic_by_n(tr, h, test) for h in ("first-fit", "balance-fit")}
    heur_out = {h: heuristic_by_n(tr, h, outside) for h in ("first-fit", "balance-fit")}

    seeds = []
    for run in runs:
        summ = json.loads((run / "summary.json").read_text())
        cands = ranked_checkpoints(run)[: args.top]
        scored = []
        for v, ep, d in cands:
            net, cfg, _ = load_model(d)
            s, by_n = valid_score(tr, net, cfg.agent, SIZES, sel_starts, bf_sel)
            scored.append({"episode": ep, "dir": str(d), "valid_score": v, "select_score": s,
                           "select_by_n": by_n})
            print(f"{run.name} ep{ep}: valid {v:.4f} select {s:.4f}", flush=True)
        pick = min(scored, key=lambda c: (c["select_score"], c["episode"]))
        net, cfg, _ = load_model(pick["dir"])
        t = test_by_n(tr, net, cfg.agent, test)
        print(f"{run.name}: picked ep{pick['episode']} -> test N=5 {t[5]:.0f}", flush=True)
        seeds.append({"run": run.name, "seed": cfg.seed, "candidates": scored, "pick": pick, "test_by_n": t,
                      "wall_s": summ.get("wall_s"), "env_steps": summ.get("env_steps"),
                      "episodes": summ.get("episodes")})
    best = min(seeds, key=lambda s: (s["pick"]["select_score"], s["seed"]))
    net, cfg, meta = load_model(best["pick"]["dir"])
    best_outside = test_by_n(tr, net, cfg.agent, outside)

    # the N=5-only SPANE-NUMA (shipped before this change) and the published architecture, for comparison
    base = {}
    for name in ("spane-numa", "spane-paper"):
        bnet, bcfg, _ = load_model(MODELS_DIR / name)
        base[name] = {"test": test_by_n(tr, bnet, bcfg.agent, test),
                      "outside": test_by_n(tr, bnet, bcfg.agent, outside),
                      "select": valid_score(tr, bnet, bcfg.agent, SIZES, sel_starts, bf_sel)[0]}

    bf, ff = heur_test["balance-fit"], heur_test["first-fit"]
    med = {n: float(np.median([s["test_by_n"][n] for s in seeds])) for n in SIZES}
    rows = []
    for n in SIZES:
        rows.append({"n_pms": n, "first_fit": ff[n], "balance_fit": bf[n], "spane_multi_picked": best["test_by_n"][n],
                     "spane_multi_median": med[n], "spane_numa_n5": base["spane-numa"]["test"][n],
                     "spane_paper": base["spane-paper"]["test"][n],
                     "picked_vs_bf": round(best["test_by_n"][n] / bf[n], 4),
                     "median_vs_bf": round(med[n] / bf[n], 4),
                     "numa_n5_vs_bf": round(base["spane-numa"]["test"][n] / bf[n], 4)})
    out_rows = []
    for n in SIZES:
        obf = heur_out["balance-fit"][n]
        out_rows.append({"n_pms": n, "first_fit": heur_out["first-fit"][n], "balance_fit": obf,
                         "spane_multi_picked": best_outside[n], "spane_numa_n5": base["spane-numa"]["outside"][n],
                         "spane_paper": base["spane-paper"]["outside"][n],
                         "picked_vs_bf": round(best_outside[n] / obf, 4),
                         "numa_n5_vs_bf": round(base["spane-numa"]["outside"][n] / obf, 4),
                         "paper_vs_bf": round(base["spane-paper"]["outside"][n] / obf, 4)})
    seed_rows = [{"run": s["run"], "seed": s["seed"], "picked_episode": s["pick"]["episode"],
                  "valid_score": round(s["pick"]["valid_score"], 4),
                  "select_score": round(s["pick"]["select_score"], 4),
                  "test_n5": s["test_by_n"][5], "test_geo_vs_bf": round(geo_ratio(s["test_by_n"], bf), 4),
                  "max_vs_bf": round(max(s["test_by_n"][n] / bf[n] for n in SIZES), 4),
                  "wall_s": s["wall_s"], "env_steps": s["env_steps"], "episodes": s["episodes"]} for s in seeds]
    summary = {
        "picked": {"run": best["run"], "episode": best["pick"]["episode"], "select_score": best["pick"]["select_score"],
                   "test_n5": best["test_by_n"][5], "test_by_n": best["test_by_n"], "outside_by_n": best_outside,
                   "below_bf_every_n_test": all(best["test_by_n"][n] < bf[n] for n in SIZES),
                   "below_bf_every_n_outside": all(best_outside[n] < heur_out["balance-fit"][n] for n in SIZES)},
        "median_test_n5": med[5], "seeds": len(seeds),
        "spane_numa_n5": {"select_score": base["spane-numa"]["select"], "test_n5": base["spane-numa"]["test"][5]},
        "select_bf_by_n": bf_sel,
    }
    res = Result("spane_multi", {"summary": summary, "test_by_n": rows, "outside_by_n": out_rows, "seeds": seed_rows,
                                 "candidates": [{"run": s["run"], **{k: v for k, v in c.items() if k != "dir"}}
                                                for s in seeds for c in s["candidates"]]},
                 seed=0, title="SPANE-NUMA trained on N = 2..9 (generated by `bench/spane_multi.py`)")
    res.markdown = (
        f"Runs: {args.runs} ({len(seeds)} seeds). Selection on validation only: per seed the {args.top} checkpoints "
        "with the best in-training score (150 valid starts, N=2..9), then the `select` split (600 starts in "
        "[50000, 70000), none a public validation start) at N=2..9, score = geometric mean over N of trimmed mean / "
        "Balance-Fit's. Test = the 1000 public test starts; `outside` = 300 starts in [110000, 113000) (after the "
        "test range; reported, never used to choose). 10% trimmed mean of the total wait per episode (s); lower is "
        f"better.\n\nPicked: {best['run']} episode {best['pick']['episode']} (select score "
        f"{best['pick']['select_score']:.4f}; the N=5-only SPANE-NUMA scores {base['spane-numa']['select']:.4f} on the "
        f"same split). Test N=5: picked {best['test_by_n'][5]:,.0f}, median over seeds {med[5]:,.0f}.\n\n"
        "### Test split, every N\n")
    res.table([{k: (f"{v:,.0f}" if isinstance(v, float) and not k.endswith("bf") else v) for k, v in r.items()}
               for r in rows], list(rows[0]))
    res.markdown += "\n### Outside the public splits (300 starts in [110000, 113000)), every N\n"
    res.table([{k: (f"{v:,.0f}" if isinstance(v, float) and not k.endswith("bf") else v) for k, v in r.items()}
               for r in out_rows], list(out_rows[0]))
    res.markdown += "\n### Seeds (each seed's model picked on the select split)\n"
    res.table([{k: (f"{v:,.0f}" if k == "test_n5" else v) for k, v in r.items()} for r in seed_rows],
              list(seed_rows[0]))
    res.figure = plot(rows)
    paths = res.write(args.out)
    print(res.markdown)
    print(f"wrote {paths['md']} ({time.perf_counter() - t0:.0f} s)")
    if args.ship:
        meta = dict(meta) | {"run": best["run"], "selected_by": "lowest select-split score over seeds and their top "
                             f"{args.top} checkpoints", "select_score": round(best["pick"]["select_score"], 6),
                             "test_trimmed_mean": round(best["test_by_n"][5], 4),
                             "test_by_n": {str(n): round(v, 4) for n, v in best["test_by_n"].items()},
                             "outside_by_n": {str(n): round(v, 4) for n, v in best_outside.items()}}
        save_model(SHIP, net, cfg, meta)
        print(f"shipped {best['pick']['dir']} -> {SHIP}")


def plot(rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4), dpi=120)
    ns = [r["n_pms"] for r in rows]
    for key, label in (("picked_vs_bf", "SPANE-NUMA N=2..9 (picked)"), ("median_vs_bf", "N=2..9, median of seeds"),
                       ("numa_n5_vs_bf", "SPANE-NUMA N=5 only")):
        ax.plot(ns, [r[key] for r in rows], marker="o", label=label)
    ax.plot(ns, [r["first_fit"] / r["balance_fit"] for r in rows], marker="x", ls=":", label="First-Fit")
    ax.axhline(1.0, color="k", lw=0.8, label="Balance-Fit")
    ax.set_xlabel("number of PMs (N)")
    ax.set_ylabel("trimmed mean / Balance-Fit's (test)")
    ax.set_title("Huawei-East-1 test split: learned schedulers vs Balance-Fit")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
