"""Anonymous user embeddings (IDfree-PL), one run: every arm on the same users and candidates, three seeds, the
attacker on each arm's uploads. Writes docs/results/anonymous_embeddings.{json,md,png} through edgecloud.results
(after every seed, so a run cut short keeps its finished seeds).

    PYTHONPATH=. .venv/bin/python bench/anonymous_embeddings.py            # 32 users, seeds 0, 1, 2
    PYTHONPATH=. .venv/bin/python bench/anonymous_embeddings.py --quick    # the CLI's --quick workload
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("EDGECLOUD_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from edgecloud.personal.anon.bench import BenchConfig, quick_config, run, to_result  # noqa: E402
from edgecloud.results import check_out_dir  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "docs" / "results"

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args()
    check_out_dir(a.out)
    cfg = quick_config(a.seed) if a.quick else BenchConfig(seeds=(a.seed, a.seed + 1, a.seed + 2))
    d = run(cfg, on_seed=lambda partial: to_result(partial).write(a.out))
    for kind, path in to_result(d).write(a.out).items():
        print(kind, path)
    print(to_result(d).markdown)
