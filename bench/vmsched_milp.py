"""Benchmark: how far the schedulers are from optimal on small DVAMP instances (offline MILP, HiGHS).

For each instance: the simulator-semantics optimum (with its solver status and gap), the relaxed lower bound,
and the total waits of First-Fit, Balance-Fit, the online MILP and the learned SPANE policy (when a shipped
model loads). Instances: slices of the Huawei-East-1 trace (start rows drawn with --seed, kept when First-Fit
or Balance-Fit queues, on scaled-down nodes so that queueing happens) and random synthetic ones; then the
adversarial family for the stated greedy bound. Prints the ratios and writes docs/results/vmsched_milp.{json,md,png}
(results layer, with provenance).

    nice .venv/bin/python bench/vmsched_milp.py                  # ~5-10 minutes on 1 core (550 s on a busy one)
    .venv/bin/python bench/vmsched_milp.py --per-config 1 --time-limit 3 --no-write   # a quick look
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from edgecloud.errors import UserError
from edgecloud.results import Result, check_out_dir
from edgecloud.vmsched.bound import adversarial_trace, bound_inputs
from edgecloud.vmsched.cluster import ClusterConfig
from edgecloud.vmsched.milp import MilpConfig, compare_offline, run_online_milp, simulate, solve_offline
from edgecloud.vmsched.policies import FirstFit, make_policy
from edgecloud.vmsched.trace import Trace, load_trace

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "results"  # vmsched_milp.{json,md,png}
# (K VMs, M PMs, cpu per node, mem per node)
TRACE_CONFIGS = [(20, 2, 16, 32), (40, 2, 16, 32), (40, 3, 16, 32), (80, 2, 24, 48)]


def pick_starts(trace: Trace, k: int, cluster: ClusterConfig, n: int, rng) -> list[int]:
    """Start rows whose K VMs fit the scaled nodes and on which First-Fit or Balance-Fit queues."""
    from edgecloud.vmsched.policies import BalanceFit

    out: list[int] = []
    for s in rng.permutation(len(trace) - k):
        sub = trace.slice(int(s), int(s) + k)
        try:
            cluster.check_trace(sub)
        except UserError:
            continue
        if simulate(trace, cluster, int(s), k, FirstFit()).total_wait > 0 or \
                simulate(trace, cluster, int(s), k, BalanceFit()).total_wait > 0:
            out.append(int(s))
            if len(out) == n:
                break
    return out


def random_trace(k: int, rng) -> Trace:
    cpu = rng.choice([1, 2, 4, 8], k).astype(float)
    mem = rng.choice([1, 2, 4, 8, 16, 24], k).astype(float)
    at = np.cumsum(rng.integers(0, 30, k)).astype(float)
    lt = rng.integers(10, 600, k).astype(float)
    return Trace(np.arange(k), cpu, mem, at, lt, "random")


def learned(n_pms: int):
    try:
        return make_policy("spane-paper", n_pms=n_pms)  # the model its results were measured with
    except UserError:
        return None


def one(trace: Trace, cluster: ClusterConfig, start: int, k: int, cfg: MilpConfig, source: str, online: bool) -> dict:
    row = compare_offline(trace, cluster, start, k, cfg)
    row["source"] = source
    row["online_milp_total_wait"] = run_online_milp(trace, cluster, start, k, time_limit=1.0) if online else None
    pol = learned(cluster.n_pms)
    row["spane_total_wait"] = simulate(trace, cluster, start, k, pol).total_wait if pol is not None else None
    return row


def ratio(w, opt) -> str:
    if w is None:
        return "—"
    if opt == 0:
        return "1.000" if w == 0 else "∞ (opt 0)"
    return f"{w / opt:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-config", type=int, default=3, help="trace instances per (K, M, cpu, mem) config")
    ap.add_argument("--random", type=int, default=4, help="random synthetic instances (K=20, M=2)")
    ap.add_argument("--time-limit", type=float, default=20.0, help="seconds per MILP solve")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-online", action="store_true", help="skip the online MILP policy")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    if not args.no_write:
        check_out_dir(OUT)
    rng = np.random.default_rng(args.seed)
    cfg = MilpConfig(time_limit=args.time_limit, seed=args.seed)
    trace = load_trace()
    rows: list[dict] = []
    t_start = time.perf_counter()
    for k, m, cpu, mem in TRACE_CONFIGS:
        c = ClusterConfig(n_pms=m, node_cpu=cpu, node_mem=mem)
        for s in pick_starts(trace, k, c, args.per_config, rng):
            rows.append(one(trace, c, s, k, cfg, "huawei", online=not args.no_online))
            print_row(rows[-1])
    small = ClusterConfig(n_pms=2, node_cpu=10, node_mem=20)
    for i in range(args.random):
        tr = random_trace(20, rng)
        rows.append(one(tr, small, 0, 20, cfg, f"random#{i}", online=not args.no_online))
        rows[-1]["_trace"] = tr
        print_row(rows[-1])

    adv = []
    for m in (2, 3, 4):
        for mu in (1.01, 1.1, 2.0, 4.0):
            tr, c = adversarial_trace(m, mu, t=100, n_double=max(1, m // 2))
            ff = simulate(tr, c, 0, len(tr), FirstFit()).total_wait
            opt = solve_offline(tr, c, 0, len(tr), cfg)
            b = bound_inputs(tr, c)
            adv.append(dict(m=m, mu=mu, nd=max(1, m // 2), tr=b.tr, ff=ff, opt=opt.total_wait, status=opt.status,
                            gap=ff - opt.total_wait, bound=b.bound, ratio=(ff - opt.total_wait) / b.bound))
            print(f"adversarial m={m} mu={mu}: FF {ff:.0f}  opt {opt.total_wait:.0f} ({opt.status})  "
                  f"gap {ff - opt.total_wait:.0f}  bound {b.bound:.3f}  gap/bound {adv[-1]['ratio']:.4f}")
    elapsed = time.perf_counter() - t_start
    # stated bound on every benchmark instance (gap to the best found: a lower bound on the true gap)
    viol = 0
    for r in rows:
        tr = r.pop("_trace", None) or trace.slice(r["start"], r["start"] + r["vms"])
        b = bound_inputs(tr, ClusterConfig(n_pms=r["pms"], node_cpu=r["cpu"], node_mem=r["mem"]))
        r["bound"] = b.bound
        viol += (r["first_fit_total_wait"] - r["total_wait"]) > b.bound
    summary(rows, adv, viol, elapsed, args)


SHORT = [("FF", "first_fit_total_wait"), ("BF", "balance_fit_total_wait"), ("online", "online_milp_total_wait"),
         ("spane", "spane_total_wait")]


def fmt0(x) -> str:
    return "—" if x is None else f"{x:.0f}"


def print_row(r: dict) -> None:
    print(f"{r['source']:9s} S={r['start']:6d} K={r['vms']:2d} M={r['pms']} | opt {r['total_wait']:>10.0f} "
          f"({r['status']}, gap {r['gap']:.3f}, {r['solve_time']:.1f}s) LB {r['lower_bound']:>8.0f} | "
          + "  ".join(f"{n} {ratio(r[k], r['total_wait'])}" for n, k in SHORT))


def summary(rows: list[dict], adv: list[dict], viol: int, elapsed: float, args) -> None:
    def geo(key: str) -> str:
        v = [(r[key] + 1) / (r["total_wait"] + 1) for r in rows if r[key] is not None]
        return f"{np.exp(np.mean(np.log(v))):.3f}" if v else "—"

    tot = {k: sum(r[k] for r in rows if r[k] is not None) for k in
           ("total_wait", "first_fit_total_wait", "balance_fit_total_wait")}
    print(f"\n{len(rows)} instances in {elapsed:.0f} s; statuses: "
          + ", ".join(f"{s} {sum(r['status'] == s for r in rows)}" for s in ("optimal", "feasible", "timeout")))
    print(f"sum of waits: opt {tot['total_wait']:.0f}  FF {tot['first_fit_total_wait']:.0f} "
          f"({tot['first_fit_total_wait'] / max(tot['total_wait'], 1):.3f}x)  BF {tot['balance_fit_total_wait']:.0f} "
          f"({tot['balance_fit_total_wait'] / max(tot['total_wait'], 1):.3f}x)")
    print(f"geometric mean of (W+1)/(W_opt+1): FF {geo('first_fit_total_wait')}  BF {geo('balance_fit_total_wait')}  "
          f"online {geo('online_milp_total_wait')}  spane {geo('spane_total_wait')}")
    if args.no_write:
        return
    md = [f"{len(rows)} instances solved in {elapsed:.0f} s (one core of a 2-core machine shared with other jobs: "
          "solve times are noisy, and a time-limited solve may end at another incumbent on a less busy machine). "
          "`opt` is the simulator-semantics MILP (FIFO + clock rule; status *optimal* = proven optimal, "
          "*feasible* = time limit hit, best found with its gap). `LB` is the relaxed (non-FIFO) model's dual "
          "bound, valid for every schedule. Ratios are W_policy / W_opt (∞ when the optimum waits 0 s). "
          "Huawei rows: K trace VMs from row S on M PMs with scaled nodes (cpu/mem in the table), starts drawn "
          "with the seed and kept when First-Fit or Balance-Fit queues. Random rows: 20 synthetic VMs, "
          "2 PMs of (10 cpu, 20 GB). `online` is the online MILP (known VMs only, 1 s per decision); `spane` "
          "the shipped learned model when one loads (— when none is available).", "",
          "| source | S | K | M | cpu/mem | status | gap | solve s | LB | opt | FF | BF | online | spane | "
          "FF/opt | BF/opt | online/opt | spane/opt |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['source']} | {r['start']} | {r['vms']} | {r['pms']} | {r['cpu']:g}/{r['mem']:g} | "
                  f"{r['status']} | {r['gap']:.3f} | {r['solve_time']:.1f} | {r['lower_bound']:.0f} | "
                  f"{r['total_wait']:.0f} | " + " | ".join(fmt0(r[k]) for _, k in SHORT) + " | "
                  + " | ".join(ratio(r[k], r["total_wait"]) for _, k in SHORT) + " |")
    md += ["", f"Geometric mean of (W+1)/(W_opt+1) over all rows: FF {geo('first_fit_total_wait')}, "
           f"BF {geo('balance_fit_total_wait')}, online MILP {geo('online_milp_total_wait')}, "
           f"SPANE {geo('spane_total_wait')}. Sum of waits: optimum {tot['total_wait']:.0f} s, "
           f"FF {tot['first_fit_total_wait']:.0f} s, BF {tot['balance_fit_total_wait']:.0f} s.", "",
           "## The stated greedy bound (m-1)/(2m-1)·(mu-1)·TR", "",
           "Definitions in `edgecloud/vmsched/bound.py` (mu = l_max/l_min, TR = PM-seconds). Adversarial "
           "long/short family (`adversarial_trace(m, mu, t=100, n_double=max(1, m // 2))`; First-Fit gap vs the "
           "exact optimum). At m = 2 gap/bound = 3/(mu + 2), which tends to 1 as mu -> 1: the family attains the "
           "stated bound asymptotically; for even m the limit is (2m - 1)/(3(m - 1)).", "",
           "| m | doubles | mu | TR | FF | opt | status | gap | bound | gap/bound |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for a in adv:
        md.append(f"| {a['m']} | {a['nd']} | {a['mu']:g} | {a['tr']:g} | {a['ff']:.0f} | {a['opt']:.0f} | "
                  f"{a['status']} | {a['gap']:.0f} | {a['bound']:.3f} | {a['ratio']:.4f} |")
    md += ["", f"On the benchmark rows above, First-Fit's gap to the best solution found (a lower bound on its "
           f"true gap when the status is feasible) exceeds the stated bound on {viol} of {len(rows)} instances. "
           "The formula is not a valid bound in this model (it is 0 for m = 1 or "
           "mu = 1 while First-Fit can be strictly suboptimal there; see the counterexamples in "
           "`edgecloud/vmsched/bound.py` and docs/vmsched_milp.md).", ""]
    geos = {k: geo(k) for _, k in SHORT}
    data = {"config": {"per_config": args.per_config, "random": args.random, "time_limit": args.time_limit,
                       "online": not args.no_online}, "rows": rows, "adversarial": adv, "bound_violations": viol,
            "geo_mean_ratio_vs_opt": {k: None if v == "—" else float(v) for k, v in geos.items()},
            "sum_waits": tot, "elapsed_s": round(elapsed, 1)}
    res = Result("vmsched_milp", data, seed=args.seed,
                 title="vmsched: schedulers vs the DVAMP optimum (generated by `bench/vmsched_milp.py`)")
    res.markdown = "\n".join(md)
    res.figure = plot(rows)
    paths = res.write(OUT)
    print(f"wrote {paths['md']}, {paths['json']} and {paths['png']}")


def plot(rows: list[dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [("first_fit_total_wait", "First-Fit"), ("balance_fit_total_wait", "Balance-Fit"),
             ("online_milp_total_wait", "online MILP"), ("spane_total_wait", "SPANE")]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    x = np.arange(len(rows))
    width = 0.2
    for i, (key, label) in enumerate(names):
        vals = [(r[key] + 1) / (r["total_wait"] + 1) if r[key] is not None else np.nan for r in rows]
        if np.all(np.isnan(vals)):
            continue
        ax.bar(x + (i - 1.5) * width, vals, width, label=label)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_yscale("log")
    ax.set_xticks(x, [f"{r['source'][:6]}\nK{r['vms']}M{r['pms']}\n{r['status'][:4]}" for r in rows], fontsize=6)
    ax.set_ylabel("(W + 1) / (W_opt + 1), log scale")
    ax.set_title("Total wait relative to the DVAMP MILP optimum (best found within the time limit)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
