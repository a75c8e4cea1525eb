"""Where and why `spane` loses to Balance-Fit, and a guard against it chosen on validation only.

For each N it

1. diagnoses the shipped ``spane`` (the model ``--policy spane`` loads at N) against Balance-Fit per episode on
   the ``select``, ``test`` and ``outside`` splits: how much of the trimmed-mean gap the 5 worst episodes carry,
   how many episodes it wins, and how often the network agrees with Balance-Fit;
2. selects a guard, on the ``select`` split only (600 starts in [50000, 70000), none a public start): the
   candidates are each base network (``spane-numa`` and, where one is shipped, the per-N model) × each guard
   margin (``GuardedQPolicy``: Balance-Fit's action wherever the network leads it by less than the margin in Q;
   margin 0 = the plain network, ``inf`` = Balance-Fit itself); the lowest trimmed mean wins (ties: the plain
   network, then the smaller margin);
3. reports the pick on ``test`` and ``outside`` — never used to choose.

Trimmed means are cached per (N, candidate, split) in ``--cache`` (JSON), so sizes can run in separate processes
(``--sizes 2,3`` and ``--sizes 4,5`` ...) and a last run over every size only assembles the tables. ``--ship``
writes the picks to ``edgecloud/vmsched/models/spane-guard.json`` (what ``--policy spane`` runs at each N).

    python bench/spane_guard.py --sizes 2,3,4,5,6,7,8,9 --cache /tmp/spane/guard_cache --ship
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

from edgecloud import atomic
from edgecloud.paths import REPO_ROOT
from edgecloud.results import Result, check_out_dir
from edgecloud.vmsched.agents.policy import GuardedQPolicy, QPolicy
from edgecloud.vmsched.checkpoint import GUARD_FILE, MODELS_DIR, PER_N, SHIPPED, load_model
from edgecloud.vmsched.cluster import ClusterConfig
from edgecloud.vmsched.evaluate import evaluate, trimmed_mean
from edgecloud.vmsched.flex import plot_by_n
from edgecloud.vmsched.policies import BalanceFit
from edgecloud.vmsched.trace import load_starts, load_trace

SPLITS = ("select", "test", "outside")
MARGINS = (0.0, 0.003, 0.01, 0.03, 0.1, math.inf)


def bases(n: int) -> list[str]:
    """The networks a guard can wrap at N: SPANE-NUMA and the per-N model when one is shipped."""
    per_n = PER_N.format(n=n)
    return ["spane-numa"] + ([per_n] if per_n in SHIPPED else [])


def policy(base: str, margin: float, n: int):
    if math.isinf(margin):
        return BalanceFit()
    net, _, _ = load_model(MODELS_DIR / SHIPPED[base])
    return QPolicy(net, base) if margin == 0 else GuardedQPolicy(net, base, margin)


def cand_key(base: str, margin: float) -> str:
    return "balance-fit" if math.isinf(margin) else f"{base}+guard{margin:g}" if margin else base


class Scores:
    """Per-episode totals, cached on disk as JSON lists (one file per N)."""

    def __init__(self, tr, starts: dict, cache: Path) -> None:
        self.tr, self.starts, self.cache = tr, starts, cache

    def totals(self, n: int, base: str, margin: float, split: str) -> np.ndarray:
        f = self.cache / f"n{n}.json"
        doc = json.loads(f.read_text()) if f.exists() else {}
        key = f"{cand_key(base, margin)}|{split}"
        if key not in doc:
            t0 = time.perf_counter()
            pol = policy(base, margin, n)
            doc[key] = evaluate(self.tr, ClusterConfig(n_pms=n), pol, self.starts[split]).totals.tolist()
            print(f"N={n} {key}: {trimmed_mean(doc[key]):,.0f} ({time.perf_counter() - t0:.0f} s)", flush=True)
            doc = (json.loads(f.read_text()) if f.exists() else {}) | {key: doc[key]}
            atomic.write_text(f, json.dumps(doc))
        return np.asarray(doc[key])

    def tm(self, n: int, base: str, margin: float, split: str) -> float:
        return round(trimmed_mean(self.totals(n, base, margin, split)), 4)


def diagnose(a: np.ndarray, bf: np.ndarray) -> dict:
    """How ``a`` loses or wins against Balance-Fit per episode: the trimmed-mean ratio, the share of episodes where
    it waits less / more, and the ratio with its 5 worst episodes (by a - bf) replaced by Balance-Fit's."""
    d = a - bf
    worst = np.argsort(d)[-5:]
    fixed = a.copy()
    fixed[worst] = bf[worst]
    return {"ratio": round(trimmed_mean(a) / trimmed_mean(bf), 4), "wins": round(float(np.mean(d < 0)), 3),
            "losses": round(float(np.mean(d > 0)), 3),
            "ratio_without_worst5": round(trimmed_mean(fixed) / trimmed_mean(bf), 4),
            "worst5_excess_s": round(float(d[worst].sum()), 1)}


def block_ratio_ci(a: np.ndarray, b: np.ndarray, starts: np.ndarray, block: int = 1000, reps: int = 2000,
                   seed: int = 0) -> tuple[float, float]:
    """95% interval of trimmed_mean(a) / trimmed_mean(b) under a block bootstrap over start rows: episodes whose
    starts lie within ``block`` rows share most of their VMs, so they are resampled together (an i.i.d. bootstrap
    over episodes would be far too narrow)."""
    ids = (starts - starts.min()) // block
    groups = [np.flatnonzero(ids == g) for g in np.unique(ids)]
    rng = np.random.default_rng(seed)
    r = np.empty(reps)
    for i in range(reps):
        idx = np.concatenate([groups[j] for j in rng.integers(0, len(groups), len(groups))])
        r[i] = trimmed_mean(a[idx]) / trimmed_mean(b[idx])
    lo, hi = np.quantile(r, [0.025, 0.975])
    return round(float(lo), 4), round(float(hi), 4)


def window_ratios(a: np.ndarray, b: np.ndarray, starts: np.ndarray, width: int) -> np.ndarray:
    """The trimmed-mean ratio a / b in consecutive windows of ``width`` start rows (windows with >= 20 starts)."""
    ids = (starts - starts.min()) // width
    return np.array([trimmed_mean(a[ids == g]) / trimmed_mean(b[ids == g]) for g in np.unique(ids)
                     if np.sum(ids == g) >= 20])


def one_size(sc: Scores, n: int) -> dict:
    shipped = PER_N.format(n=n) if PER_N.format(n=n) in SHIPPED else "spane-numa"  # `spane` before any guard
    bf = {sp: sc.totals(n, "", math.inf, sp) for sp in SPLITS}
    diag = {sp: diagnose(sc.totals(n, shipped, 0.0, sp), bf[sp]) for sp in SPLITS}
    cands = [(b, m) for b in bases(n) for m in MARGINS if not (math.isinf(m) and b != "spane-numa")]
    sel = {(b, m): sc.tm(n, b, m, "select") for b, m in cands}
    pick = min(cands, key=lambda c: (sel[c], c[1] != 0, c[1], c[0] != shipped))
    row = {"n_pms": n, "shipped": shipped, "pick": cand_key(*pick), "pick_base": pick[0], "pick_margin": pick[1]}
    for sp in SPLITS:
        row[f"bf_{sp}"] = round(trimmed_mean(bf[sp]), 4)
        row[f"shipped_{sp}"] = sc.tm(n, shipped, 0.0, sp)
        row[f"pick_{sp}"] = sc.tm(n, *pick, sp)
        row[f"pick_{sp}_vs_bf"] = round(row[f"pick_{sp}"] / row[f"bf_{sp}"], 4)
        row[f"shipped_{sp}_vs_bf"] = round(row[f"shipped_{sp}"] / row[f"bf_{sp}"], 4)
    st = sc.starts["select"]
    row["shipped_vs_bf_select_ci"] = block_ratio_ci(sc.totals(n, shipped, 0.0, "select"), bf["select"], st)
    if shipped != "spane-numa":
        row["shipped_vs_spane_numa_select_ci"] = block_ratio_ci(sc.totals(n, shipped, 0.0, "select"),
                                                                sc.totals(n, "spane-numa", 0.0, "select"), st)
    if pick != (shipped, 0.0):
        row["pick_vs_shipped_select_ci"] = block_ratio_ci(sc.totals(n, *pick, "select"),
                                                          sc.totals(n, shipped, 0.0, "select"), st)
    span = int(np.ptp(sc.starts["outside"]))  # windows of the test split as wide as the outside split
    w = window_ratios(sc.totals(n, shipped, 0.0, "test"), bf["test"], sc.starts["test"], span)
    row["test_windows"] = len(w)
    row["test_window_ratio_min"], row["test_window_ratio_max"] = round(float(w.min()), 3), round(float(w.max()), 3)
    row["test_windows_above_1.05"] = int(np.sum(w > 1.05))
    print(f"N={n}: pick {row['pick']} select {row['pick_select']:,.0f} (BF {row['bf_select']:,.0f}); test "
          f"{row['pick_test_vs_bf']} x BF (shipped {row['shipped_test_vs_bf']}); outside {row['pick_outside_vs_bf']}"
          f" x BF (shipped {row['shipped_outside_vs_bf']})", flush=True)
    return {"row": row, "diag": [{"n_pms": n, "split": sp} | diag[sp] for sp in SPLITS],
            "select": [{"n_pms": n, "candidate": cand_key(b, m), "select": sel[(b, m)],
                        "vs_bf": round(sel[(b, m)] / row["bf_select"], 4)} for b, m in cands]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="2,3,4,5,6,7,8,9")
    ap.add_argument("--cache", type=Path, required=True, help="dir of per-N score caches (JSON)")
    ap.add_argument("--ship", action="store_true", help=f"write the picks to edgecloud/vmsched/models/{GUARD_FILE}")
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "results")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    check_out_dir(args.out)
    args.cache.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tr = load_trace()
    sc = Scores(tr, {sp: load_starts(sp, len(tr)) for sp in SPLITS}, args.cache)
    res_n = [one_size(sc, int(x)) for x in args.sizes.split(",")]
    rows = [r["row"] for r in res_n]
    if args.ship:
        guard = {str(r["n_pms"]): {"model": r["pick_base"],
                                  "margin": "inf" if math.isinf(r["pick_margin"]) else r["pick_margin"],
                                  "select": r["pick_select"], "select_unguarded": r["shipped_select"],
                                  "unguarded": r["shipped"]} for r in rows
                 if r["pick_margin"] != 0 or r["pick_base"] != r["shipped"]}
        atomic.write_text(MODELS_DIR / GUARD_FILE, json.dumps(
            {"selected_by": "lowest trimmed mean on the select split at N among {spane-numa, per-N model} x guard "
                            "margins (bench/spane_guard.py); Balance-Fit = margin Infinity",
             "by_n": guard}, indent=2) + "\n")
    res = Result("spane_guard", {"rows": rows, "diagnosis": [d for r in res_n for d in r["diag"]],
                                 "select": [s for r in res_n for s in r["select"]]}, seed=0,
                 title="`spane` vs Balance-Fit per episode, and a Q-margin guard chosen on `select` "
                       "(generated by `bench/spane_guard.py`)")
    res.markdown = (
        "Trimmed mean of the total wait per episode (s), Huawei-East-1. `shipped` = the model `--policy spane` "
        "loaded before the guard; guard = Balance-Fit's action wherever the network leads it by less than the "
        "margin in Q. Chosen on `select` (600 starts in [50000, 70000)) only; test (1000 starts) and `outside` "
        "(300 starts in [110000, 113000)) are reported.\n\n")
    cols = ["n_pms", "shipped", "pick", "pick_select_vs_bf", "shipped_test_vs_bf", "pick_test_vs_bf",
            "shipped_outside_vs_bf", "pick_outside_vs_bf", "pick_test", "bf_test", "pick_outside", "bf_outside"]
    res.table(rows, cols)
    res.markdown += (
        "\n### How much `select` can tell apart, and how much one `outside`-wide stretch of test varies\n"
        "95% block-bootstrap intervals (1000-row blocks of start rows) of trimmed-mean ratios on `select`; and the "
        "shipped model's ratio to Balance-Fit in the 14 windows of the test split as wide as the whole `outside` "
        "split (its 300 starts span ~3,200 rows).\n")
    ci_cols = ["n_pms", "shipped_vs_bf_select_ci", "shipped_vs_spane_numa_select_ci", "pick_vs_shipped_select_ci",
               "test_window_ratio_min", "test_window_ratio_max", "test_windows_above_1.05"]
    res.table([{c: r.get(c, "—") for c in ci_cols} for r in rows], ci_cols)
    res.markdown += "\n### Diagnosis: the shipped `spane` against Balance-Fit per episode\n"
    res.table(res.data["diagnosis"])
    res.markdown += "\n### Every candidate on `select` (the only split used to choose)\n"
    res.table(res.data["select"])
    ns = [r["n_pms"] for r in rows]
    res.figure = plot_by_n(ns, {
        "shipped, test": [r["shipped_test_vs_bf"] for r in rows], "guarded pick, test": [r["pick_test_vs_bf"]
                                                                                         for r in rows],
        "shipped, outside": [r["shipped_outside_vs_bf"] for r in rows],
        "guarded pick, outside": [r["pick_outside_vs_bf"] for r in rows]},
        "trimmed mean / Balance-Fit", "`spane` with and without the guard", ref=1.0, ref_label="Balance-Fit",
        legend_size=8)
    paths = res.write(args.out)
    print(res.markdown)
    print(f"wrote {paths['md']} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
