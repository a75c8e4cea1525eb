"""Anonymous user embeddings (IDfree-PL), one run: every arm on the same users and candidates, three seeds, the
attacker on each arm's uploads. Writes docs/results/anonymous_embeddings.{json,md,png} through edgecloud.results
(after every seed, so a run cut short keeps its finished seeds).

    PYTHONPATH=. .venv/bin/python bench/anonymous_embeddings.py            # 32 users, seeds 0, 1, 2
    PYTHONPATH=. .venv/bin/python bench/anonymous_embeddings.py --quick    # the CLI's --quick workload
    # the headline arms only (none, static, gaussian sigma 2), seeds 0-2 -> anonymous_embeddings_contrast.*
    PYTHONPATH=. .venv/bin/python bench/anonymous_embeddings.py --seeds 3 --sigmas 2 --no-mixture \
        --name anonymous_embeddings_contrast
    PYTHONPATH=. .venv/bin/python bench/anonymous_embeddings.py --oracle   # is the task user-dependent at all?
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("EDGECLOUD_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dataclasses import replace  # noqa: E402

from edgecloud.personal.anon.bench import BenchConfig, quick_config, run, to_result  # noqa: E402
from edgecloud.results import check_out_dir  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "docs" / "results"

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--seeds", type=int, default=3, help="number of seeds (seed, seed+1, ...)")
    ap.add_argument("--epochs", type=float, default=0.0, help="training epochs per arm (0: the preset's)")
    ap.add_argument("--sigmas", type=float, nargs="*", default=None, help="gaussian sigmas (the first is the headline)")
    ap.add_argument("--no-mixture", action="store_true", help="leave out the mixture arm")
    ap.add_argument("--name", default="anonymous_embeddings", help="result file name")
    ap.add_argument("--space", choices=("style", "lm"), default="style", help="device feature space")
    ap.add_argument("--history", type=int, default=100, help="style space: replies per user a device embeds")
    ap.add_argument("--static", choices=("mean", "table"), default="mean", help="the static-ID arm's embedding")
    ap.add_argument("--dim", type=int, default=0, help="embedding dimension (0: the preset's)")
    ap.add_argument("--n-eval", type=int, default=0, help="held-out examples per user (0: the preset's)")
    ap.add_argument("--oracle", action="store_true", help="the identity oracles (no LM): anonymous_embeddings_oracle")
    a = ap.parse_args()
    check_out_dir(a.out)
    if a.oracle:
        from edgecloud.personal.anon.data import DataConfig
        from edgecloud.personal.anon.oracle import study
        from edgecloud.personal.anon.oracle import to_result as oracle_result

        res = oracle_result(study(DataConfig(), seed=a.seed), a.seed)
        for kind, path in res.write(a.out).items():
            print(kind, path)
        print(res.markdown)
        raise SystemExit(0)
    cfg = quick_config(a.seed) if a.quick else BenchConfig(seeds=tuple(range(a.seed, a.seed + a.seeds)))
    if a.epochs:
        cfg = replace(cfg, cloud=replace(cfg.cloud, epochs=a.epochs))
    cfg = replace(cfg, space=a.space, history=a.history, static=a.static, dim=a.dim or cfg.dim)
    if a.n_eval:
        cfg = replace(cfg, data=replace(cfg.data, n_eval=a.n_eval))
    if a.no_mixture:
        cfg = replace(cfg, skip_mixture=True)
    if a.sigmas:
        cfg = replace(cfg, sigmas=tuple(a.sigmas), headline_sigma=a.sigmas[0])
    d = run(cfg, on_seed=lambda partial: to_result(partial, a.name).write(a.out))
    for kind, path in to_result(d, a.name).write(a.out).items():
        print(kind, path)
    print(to_result(d, a.name).markdown)
