"""SPANE-NUMA fine-tuned per cluster size: for each N, pick on validation and the ``select`` split, ship, report.

Reads per-N training runs (``--runs DIR``: one sub-dir per run, each written by `edgecloud vmsched train --pms N
--set init_from=edgecloud/vmsched/models/spane-numa ...`, so its checkpoint 0 is the shipped N=5 SPANE-NUMA and
every checkpoint was validated at N on the 150 valid starts; a run trained from scratch at N may join). For each N:

1. selection, never on the test split: the candidates are the starting model (SPANE-NUMA) and the ``--top`` best
   checkpoints of each run by validation; each is scored on the ``select`` split (600 starts in [50000, 70000), none
   a public start) at N and the lowest trimmed mean is the pick (a tie keeps SPANE-NUMA);
2. ``--ship`` writes the pick to ``edgecloud/vmsched/models/spane-numa-n<N>`` (supported_pms [N, N], with its run,
   episode, validation and select scores and its test score) when it is not SPANE-NUMA itself, and removes a
   stale per-N model when SPANE-NUMA wins; ``--policy spane`` then resolves to it at that N;
3. reports, never used to choose: the pick, SPANE-NUMA and First-Fit / Balance-Fit on the test split at N, the
   median over runs of each run's best-by-validation checkpoint on test, and the same on the ``outside`` split
   (300 starts in [110000, 113000)).

Writes docs/results/spane_pern.{json,md,png} through the results layer.

    python bench/spane_pern.py --runs /tmp/spane/pern --ship
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import time
from pathlib import Path

import numpy as np

from edgecloud.paths import REPO_ROOT
from edgecloud.results import Result, check_out_dir
from edgecloud.vmsched.agents.policy import QPolicy
from edgecloud.vmsched.agents.select import ranked_checkpoints
from edgecloud.vmsched.agents.train import training_command
from edgecloud.vmsched.checkpoint import MODELS_DIR, PER_N, load_model, save_model
from edgecloud.vmsched.cluster import ClusterConfig
from edgecloud.vmsched.evaluate import evaluate, trimmed_mean
from edgecloud.vmsched.flex import plot_by_n
from edgecloud.vmsched.policies import make_policy
from edgecloud.vmsched.trace import load_starts, load_trace

BASE = MODELS_DIR / "spane-numa"
SPLITS = ("valid", "select", "test", "outside")


def tm(tr, policy, n: int, starts) -> float:
    return round(trimmed_mean(evaluate(tr, ClusterConfig(n_pms=n), policy, starts).totals), 4)


def runs_at(roots: list[Path], n: int) -> list[Path]:
    out = []
    for d in sorted(d for root in roots for d in root.iterdir()):
        f = d / "summary.json"
        if f.exists() and json.loads(f.read_text())["config"]["n_pms"] == n:  # a run stopped early counts too
            out.append(d)
    return out


def one_size(tr, starts: dict, roots: list[Path], n: int, top: int) -> dict:
    """Selection and reports at one N (see the module docstring)."""
    heur = {h: {sp: tm(tr, make_policy(h), n, starts[sp]) for sp in SPLITS} for h in ("first-fit", "balance-fit")}
    base_net, _, _ = load_model(BASE)
    cands = {"spane-numa": (None, BASE)}
    runs = []
    for run in runs_at(roots, n):
        ranked = [r for r in ranked_checkpoints(run) if r[1] > 0]  # ep000000 is SPANE-NUMA itself
        for v, ep, d in ranked[:top]:
            cands[f"{run.name} ep{ep}"] = (v, d)
        net, cfg, _ = load_model(ranked[0][2])
        s = json.loads((run / "summary.json").read_text())
        runs.append({"run": run.name, "seed": cfg.seed, "init": "spane-numa" if cfg.init_from else "scratch",
                     "lr": cfg.lr, "episodes": s["episodes"], "wall_s": s["wall_s"], "checkpoints": len(ranked),
                     "best_episode": ranked[0][1], "best_valid": ranked[0][0],
                     "test": tm(tr, QPolicy(net, "spane-numa"), n, starts["test"]),
                     "command": shlex.join(training_command(cfg, f"out/spane-runs/{run.name}"))} | drift(s))
    scored = {}
    for name, (v, d) in cands.items():
        net, cfg, _ = load_model(d)
        scored[name] = {"valid": v if v is not None else tm(tr, QPolicy(net, "spane-numa"), n, starts["valid"]),
                        "select": tm(tr, QPolicy(net, "spane-numa"), n, starts["select"]), "dir": d, "cfg": cfg}
        print(f"N={n} {name}: valid {scored[name]['valid']:,.0f} select {scored[name]['select']:,.0f}", flush=True)
    pick = min(scored, key=lambda k: (scored[k]["select"], k != "spane-numa"))
    p = scored[pick]
    pick_net, _, _ = load_model(p["dir"])
    row = {"n_pms": n, "pick": pick, "candidates": len(scored), "runs": len(runs)}
    for who, net in (("pick", pick_net), ("spane_numa", base_net)):
        for sp in ("valid", "select", "test", "outside"):
            row[f"{who}_{sp}"] = (scored[pick if who == "pick" else "spane-numa"][sp] if sp in ("valid", "select")
                                  else tm(tr, QPolicy(net, "spane-numa"), n, starts[sp]))
    for sp in SPLITS:
        row[f"bf_{sp}"], row[f"ff_{sp}"] = heur["balance-fit"][sp], heur["first-fit"][sp]
    row["pick_test_vs_bf"] = round(row["pick_test"] / row["bf_test"], 4)
    row["pick_outside_vs_bf"] = round(row["pick_outside"] / row["bf_outside"], 4)
    row["median_test_best_by_valid"] = float(np.median([r["test"] for r in runs])) if runs else None
    print(f"N={n}: pick {pick} select {p['select']:,.0f} test {row['pick_test']:,.0f} (BF {row['bf_test']:,.0f}, "
          f"SPANE-NUMA {row['spane_numa_test']:,.0f}) outside {row['pick_outside']:,.0f} (BF "
          f"{row['bf_outside']:,.0f})", flush=True)
    return {"row": row, "runs": runs, "pick": p, "pick_name": pick}


def drift(summary: dict) -> dict:
    """How a fine-tune's validation moved from its starting model (checkpoint 0): the ratio of its first trained
    checkpoint, the median ratio, and how many trained checkpoints beat the start (docs/spane.md: why the
    fine-tunes rarely beat the N=5 model)."""
    h = summary["history"]
    if not h or h[0]["episode"] != 0:
        return {"first_vs_start": None, "median_vs_start": None, "better_than_start": None}
    r = [x["valid_trimmed_mean"] / h[0]["valid_trimmed_mean"] for x in h[1:] if x["grad_steps"] > 0]
    return {"first_vs_start": round(r[0], 3) if r else None, "median_vs_start": round(float(np.median(r)), 3)
            if r else None, "better_than_start": sum(x < 1 for x in r)}


def ship(n: int, res: dict) -> str:
    """Write (or, when SPANE-NUMA won, remove) models/spane-numa-n<N>."""
    dest = MODELS_DIR / PER_N.format(n=n)
    if res["pick_name"] == "spane-numa":
        if dest.exists():
            shutil.rmtree(dest)
        return "SPANE-NUMA kept (no per-N model)"
    p, row = res["pick"], res["row"]
    net, cfg, meta = load_model(p["dir"])
    run, ep = res["pick_name"].split(" ep")
    meta = {"valid_trimmed_mean": p["valid"], "episode": int(ep), "env_steps": meta.get("env_steps"),
            "grad_steps": meta.get("grad_steps"), "valid_starts": meta.get("valid_starts"), "run": run,
            "select_trimmed_mean": p["select"], "select_spane_numa": row["spane_numa_select"],
            "test_trimmed_mean": row["pick_test"], "test_n_pms": n,
            "selected_by": f"lowest trimmed mean on the select split at N={n} among SPANE-NUMA and the best "
                           "validated checkpoints of the per-N fine-tunes (bench/spane_pern.py)"}
    save_model(dest, net, cfg, meta, pms=(n, n))
    return f"shipped {dest.name} ({res['pick_name']})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, action="append", required=True,
                    help="dir of per-N run dirs (each with summary.json); repeatable")
    ap.add_argument("--sizes", default="2,3,4,5,6,7,8,9")
    ap.add_argument("--top", type=int, default=3, help="checkpoints per run re-scored on the select split")
    ap.add_argument("--ship", action="store_true", help="write the picks to edgecloud/vmsched/models/")
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "results")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    check_out_dir(args.out)
    t0 = time.perf_counter()
    tr = load_trace()
    starts = {sp: load_starts(sp, len(tr)) for sp in SPLITS}
    rows, runs, shipped = [], [], {}
    for n in (int(x) for x in args.sizes.split(",")):
        r = one_size(tr, starts, args.runs, n, args.top)
        rows.append(r["row"])
        runs += [{"n_pms": n} | x for x in r["runs"]]
        if args.ship:
            shipped[n] = ship(n, r)
    res = Result("spane_pern", {"rows": rows, "runs": runs, "shipped": shipped}, seed=0,
                 title="SPANE-NUMA fine-tuned per cluster size, chosen on validation "
                       "(generated by `bench/spane_pern.py`)")
    res.markdown = (
        f"Runs: {', '.join(f'`{r}`' for r in args.runs)}. Trimmed mean of the total wait per episode (s), "
        "Huawei-East-1. For each N the "
        "candidates are SPANE-NUMA (trained at N=5, the starting point of every fine-tune) and the "
        f"{args.top} best checkpoints by validation (150 valid starts at N) of each run at N; the pick has the lowest "
        "trimmed mean on the `select` split (600 starts in [50000, 70000)). Test (1000 starts) and `outside` (300 "
        "starts in [110000, 113000)) are reported, never used to choose. `median_test_best_by_valid`: median over "
        "the runs at N of each run's best-by-validation checkpoint on test.\n\n")
    cols = ["n_pms", "pick", "pick_select", "spane_numa_select", "bf_select", "pick_test", "spane_numa_test",
            "bf_test", "ff_test", "pick_test_vs_bf", "median_test_best_by_valid", "pick_outside", "bf_outside",
            "pick_outside_vs_bf"]
    res.table(rows, cols)
    res.markdown += "\n### Runs (best checkpoint by validation of each)\n"
    rcols = [k for k in (runs[0] if runs else {"n_pms": 0}) if k != "command"]
    res.table(runs, rcols)
    res.markdown += "\nTraining commands (`--out` renamed; run folders are not in the repository):\n\n" + "".join(
        f"- N={r['n_pms']} `{r['run']}`: `{r['command']}`\n" for r in runs)
    if shipped:
        res.markdown += "\n" + "\n".join(f"- N={n}: {s}" for n, s in shipped.items()) + "\n"
    res.figure = plot(rows)
    paths = res.write(args.out)
    print(res.markdown)
    print(f"wrote {paths['md']} ({time.perf_counter() - t0:.0f} s)")


def plot(rows):
    ns = [r["n_pms"] for r in rows]
    series = {label: [r[key] / r["bf_test"] for r in rows] for key, label in (
        ("pick_test", "per-N pick"), ("spane_numa_test", "SPANE-NUMA (N=5 model)"), ("ff_test", "First-Fit"))}
    return plot_by_n(ns, series, "test trimmed mean / Balance-Fit",
                     "Per-N SPANE-NUMA on the test split (chosen on validation)", ref=1.0, ref_label="Balance-Fit",
                     legend_size=8)


if __name__ == "__main__":
    main()
