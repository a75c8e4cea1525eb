"""DRAGON benchmark: perplexity of every baseline and DRAGON on held-out Wikipedia windows, exactness (greedy vs
centralized, mixture gaps, χ²), and per-token latency / TTFT of two real processes over the emulated link at RTT 0,
50, 100, 200, 300 ms (±20% jitter). The quality part is long and untimed, the latency part short and timed, so they
run apart (docs/results/dragon-quality.* and dragon-latency.*):

    cd /work/wt/NAME && export PYTHONPATH=$PWD EDGECLOUD_THREADS=1
    low   python bench/dragon.py --part quality     # 16 articles, 8 windows, 3 questions x 12 tokens, float64 check
    timed python bench/dragon.py --part latency     # 5 RTTs x 5 modes x 3 questions x 12 tokens, ~6 min quiet
    python bench/dragon.py --quick                   # both parts, the CLI's --quick workload
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from edgecloud.rag.bench import PARTS, BenchConfig, run

OUT = Path(__file__).resolve().parent.parent / "docs" / "results"

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--part", choices=PARTS, default="all")
    ap.add_argument("--questions", type=int, default=None, help="questions per latency cell / exactness replay")
    ap.add_argument("--max-new", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args()
    cfg = replace(BenchConfig.quick() if a.quick else BenchConfig(), seed=a.seed)
    if a.questions:
        cfg = replace(cfg, questions=a.questions)
    if a.max_new:
        cfg = replace(cfg, max_new=a.max_new)
    res = run(cfg, a.part)
    for kind, path in res.write(a.out).items():
        print(kind, path)
    print(res.markdown)
