"""VaLoRA benchmark: every policy on Poisson load over 16 adapters -> docs/results/valora.{json,md,png}.

    nice -n 10 python bench/valora.py [--quick] [--adapters DIR] [--seed 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from edgecloud.lora.bench import bench_data
from edgecloud.lora.cli import DEFAULT_TABLE
from edgecloud.lora.orchestrator import POLICIES
from edgecloud.results import Result, check_out_dir


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--adapters", type=Path, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "results")
    a = ap.parse_args()
    check_out_dir(a.out)
    data = bench_data(a.quick, a.adapters, DEFAULT_TABLE, a.seed)
    res = Result("valora", data, seed=a.seed)
    rows = [{"skew": k.split("/")[0], "policy": k.split("/")[1], **v} for k, v in data["runs"].items()]
    res.table(rows, ["skew", "policy", "throughput_tok_s", "mean_latency_s", "p50_latency_s", "p99_latency_s",
                     "mean_ttft_s", "slo_attainment", "switches", "switch_ms_mean"])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    skews = data["skews"]
    for j, p in enumerate(POLICIES):
        ax.bar([i + 0.16 * j for i in range(len(skews))], [data["runs"][f"{s}/{p}"]["mean_latency_s"] for s in skews],
               0.16, label=p)
    ax.set_xticks([i + 0.32 for i in range(len(skews))], [f"s={s}" for s in skews])
    ax.set_ylabel("mean latency (s)")
    ax.legend(fontsize=7)
    res.figure = fig
    res.write(a.out)


if __name__ == "__main__":
    main()
