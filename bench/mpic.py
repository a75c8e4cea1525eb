"""MPIC benchmark, one run: every method side by side; writes docs/results/mpic.{md,json,png}.

    .venv/bin/python bench/mpic.py            # 24 requests (6 questions x 4 orders), 4-8 passages of <=256 tokens
    .venv/bin/python bench/mpic.py --quick    # the CLI's --quick workload
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from edgecloud.atomic import save_figure, write_text
from edgecloud.kvcache.bench import BenchConfig, run
from edgecloud.kvcache.cli import format_table
from edgecloud.llm.engine import Engine
from edgecloud.llm.models import load_model

OUT = Path(__file__).resolve().parent.parent / "docs" / "results"


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(out["methods"])
    m = out["methods"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.bar(names, [m[n]["ttft_s"] for n in names], color=["#777", "#999"] + ["#4a7"] * (len(names) - 2))
    a.set_ylabel("mean TTFT (s)")
    a.tick_params(axis="x", rotation=60)
    a.set_title(f"TTFT, {out['requests']} RAG requests, ~{out['prompt_tokens_mean']:.0f} tokens")
    b.plot([m[n]["ttft_s"] for n in names], [m[n]["exact_match_rate"] for n in names], "o")
    for n in names:
        b.annotate(n, (m[n]["ttft_s"], m[n]["exact_match_rate"]), fontsize=7)
    b.set_xlabel("mean TTFT (s)")
    b.set_ylabel("greedy answer identical to full prefill")
    b.set_title("quality vs TTFT")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args()
    cfg = BenchConfig.quick(a.seed) if a.quick else BenchConfig(seed=a.seed)
    out = run(Engine(load_model(a.model)), cfg)
    table = format_table(out)
    print(table)
    d = Path(a.out)
    write_text(d / "mpic.json", json.dumps(out, indent=1))
    cmd = "python bench/mpic.py" + (" --quick" if a.quick else "") + f" --seed {a.seed}"
    write_text(d / "mpic.md", f"# MPIC results\n\nRegenerate: `{cmd}`\n\n{table}\n\n![MPIC](mpic.png)\n")
    plot(out, d / "mpic.png")


if __name__ == "__main__":
    main()
