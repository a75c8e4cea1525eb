"""Benchmark: the full First-Fit evaluation (1000 test episodes, probes included) four ways in one run: the
scalar Gymnasium env stepped in a Python loop; the numpy lockstep simulator (``BatchedSim``); the compiled
simulator stepped from Python with one vectorized policy call per step (``FastSim``, what a Q-network uses); and
whole compiled episodes (``fastsim.run_heuristic``, what ``evaluate`` uses for the heuristics). Prints the speed
ratios, checks all four give the same per-episode totals, and writes docs/results/vmsched_eval.{json,md} (results
layer) together with the heuristics table (all heuristics, N=5, against the published reference numbers).

    .venv/bin/python bench/vmsched_eval.py            # full: ~3-4 minutes on 2 cores (the scalar loop dominates)
    .venv/bin/python bench/vmsched_eval.py --episodes 100   # a quick look
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from edgecloud.results import Result, check_out_dir
from edgecloud.vmsched import fastsim
from edgecloud.vmsched.batched import BatchedSim, episode_lengths, run_policy
from edgecloud.vmsched.cluster import ClusterConfig
from edgecloud.vmsched.env import DVAMPEnv
from edgecloud.vmsched.evaluate import evaluate, summarize, table_rows
from edgecloud.vmsched.policies import FirstFit, make_policy
from edgecloud.vmsched.trace import load_starts, load_trace

PUBLISHED = {"first-fit": 89822.52, "balance-fit": 86009.91}
OUT = Path(__file__).resolve().parent.parent / "docs" / "results"


def scalar_loop(trace, cluster, starts) -> tuple[np.ndarray, float]:
    """What a plain Gymnasium user writes: reset (which runs the probe), then step until terminated."""
    t0 = time.perf_counter()
    env = DVAMPEnv(trace, cluster)
    totals = []
    for s in starts:
        obs, info = env.reset(options={"start": int(s)})
        done = False
        while not done:
            action = int(np.argmax(obs["action_mask"]))  # First-Fit from the observation
            obs, _, done, _, info = env.step(action)
        totals.append(info["total_wait"])
    return np.array(totals), time.perf_counter() - t0


def batched(trace, cluster, starts) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    n = episode_lengths(trace, cluster, starts)
    totals = run_policy(BatchedSim(trace, cluster, starts, n), FirstFit())
    return totals, time.perf_counter() - t0


def compiled_steps(trace, cluster, starts) -> tuple[np.ndarray, float]:
    """The compiled dynamics stepped from Python, the policy called once per step (as for a Q-network)."""
    t0 = time.perf_counter()
    n = fastsim.episode_lengths(trace, cluster, starts)
    ff = FirstFit()
    totals = fastsim.run_steps(fastsim.FastSim(trace, cluster, starts, n), lambda d: ff(d))
    return totals, time.perf_counter() - t0


def compiled_episodes(trace, cluster, starts) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    n = fastsim.episode_lengths(trace, cluster, starts)
    totals = fastsim.evaluate_totals(trace, cluster, FirstFit(), starts, n)
    return totals, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--episodes", type=int, default=1000, help="first K test starts (default all 1000)")
    ap.add_argument("--no-write", action="store_true", help="do not rewrite docs/results/vmsched_eval.md")
    args = ap.parse_args()
    if not args.no_write:
        check_out_dir(OUT)
    trace = load_trace()
    starts = load_starts("test", len(trace))[: args.episodes]
    cluster = ClusterConfig()

    t0 = time.perf_counter()
    compiled_episodes(trace, cluster, starts[:2])  # loads (or, the first time ever, compiles) the numba kernels
    compiled_steps(trace, cluster, starts[:2])
    warm = time.perf_counter() - t0
    print(f"kernel load/compile: {warm:7.2f} s (not in the timings below)")
    tc, sc = compiled_episodes(trace, cluster, starts)
    print(f"compiled episodes : {sc:8.2f} s  ({len(starts)} episodes, probes included)")
    tf, sf = compiled_steps(trace, cluster, starts)
    print(f"compiled, stepped : {sf:8.2f} s")
    tb, sb = batched(trace, cluster, starts)
    print(f"numpy lockstep    : {sb:8.2f} s")
    ts, ss = scalar_loop(trace, cluster, starts)
    print(f"scalar env loop   : {ss:8.2f} s")
    same = bool(np.array_equal(tb, ts) and np.array_equal(tc, ts) and np.array_equal(tf, ts))
    print(f"speed-up          : compiled episodes {ss / sc:.1f}x, compiled stepped {ss / sf:.1f}x, numpy lockstep "
          f"{ss / sb:.1f}x   identical per-episode totals: {same}")
    if not same:
        raise SystemExit("the simulators' totals differ")

    rows = []
    for name in ("first-fit", "balance-fit", "best-fit", "worst-fit", "random"):
        s = evaluate(trace, cluster, make_policy(name, seed=0), starts).summary()
        s["published"] = PUBLISHED.get(name) if args.episodes == 1000 else None
        rows.append(s)
    ff = rows[0]["trimmed_mean"]
    for r in rows:
        r["vs_first_fit"] = round(r["trimmed_mean"] / ff, 4)
    cols = ["policy", "trimmed_mean", "published", "mean", "p50", "p90", "p99", "vs_first_fit"]
    speed = [{"method": "scalar Gymnasium env, Python loop", "seconds": round(ss, 2), "speedup": 1.0},
             {"method": "numpy lockstep (BatchedSim)", "seconds": round(sb, 2), "speedup": round(ss / sb, 1)},
             {"method": "compiled, stepped from Python (FastSim; Q-networks, training)", "seconds": round(sf, 2),
              "speedup": round(ss / sf, 1)},
             {"method": "compiled whole episodes (evaluate, heuristics)", "seconds": round(sc, 3),
              "speedup": round(ss / sc, 1)}]
    res = Result("vmsched_eval", {"episodes": len(starts), "n_pms": cluster.n_pms, "split": "test", "policies": rows,
                                  "speed": speed, "identical_totals": same, "first_fit_summary": summarize(tb),
                                  "kernel_load_s": round(warm, 2)},
                 seed=0, title="vmsched: heuristics and evaluator speed (generated by `bench/vmsched_eval.py`)")
    res.markdown = (f"Huawei-East-1 test split ({len(starts)} starts), N=5 PMs of 2 x (40 CPU, 90 GB). Total wait per "
                    "episode in seconds; `published` is the SPANE paper's reference number; `vs_first_fit` the "
                    "trimmed-mean ratio to First-Fit.\n")
    cells = [c | {"vs_first_fit": f"{r['vs_first_fit']:.3f}"} for c, r in zip(table_rows(rows, cols), rows)]
    res.table(cells, cols, ["policy", "trimmed mean", "published", "mean", "p50", "p90", "p99",
                                       "ratio vs First-Fit"])
    res.markdown += ("\nEvaluator speed, full First-Fit evaluation (episodes including the probes), all four in one "
                     "run. Measured on a 2-core machine shared with other jobs: the seconds are noisy and only the "
                     "order of magnitude of the ratios is to be trusted. The numba kernels are compiled once and "
                     f"cached on disk; loading them took {warm:.1f} s here, outside the timings.\n\n")
    res.table(speed, ["method", "seconds", "speedup"])
    res.markdown += f"\nPer-episode totals of the four methods identical: {same}.\n"
    print(res.markdown)
    if args.no_write or args.episodes != 1000:
        return
    paths = res.write(OUT)
    print(f"wrote {paths['md']}, {paths['json']}")


if __name__ == "__main__":
    main()
