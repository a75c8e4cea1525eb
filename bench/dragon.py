"""DRAGON benchmark, one run: perplexity of every baseline and DRAGON on held-out Wikipedia windows, exactness
(greedy vs centralized, mixture gap, χ²), and per-token latency / TTFT of two real processes over the emulated
link at RTT 0, 50, 100, 200, 300 ms (±20% jitter). Writes docs/results/dragon.{json,md,png}.

    PYTHONPATH=. .venv/bin/python bench/dragon.py          # 16 articles, 8 windows, 1 question x 12 tokens, 5 RTTs
    PYTHONPATH=. .venv/bin/python bench/dragon.py --quick    # the CLI's --quick workload
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from edgecloud.rag.bench import BenchConfig, run

OUT = Path(__file__).resolve().parent.parent / "docs" / "results"

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args()
    cfg = replace(BenchConfig.quick() if a.quick else BenchConfig(), seed=a.seed)
    res = run(cfg)
    for kind, path in res.write(a.out).items():
        print(kind, path)
    print(res.markdown)
