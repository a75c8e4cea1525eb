"""The flex study: one policy set evaluated for several cluster sizes N without retraining."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgecloud import atomic
from edgecloud.progress import progress_bar
from edgecloud.results import Result, check_out_dir
from edgecloud.vmsched.cluster import ClusterConfig
from edgecloud.vmsched.evaluate import evaluate, round2, table_rows
from edgecloud.vmsched.policies import make_policy
from edgecloud.vmsched.trace import Trace


def flex_table(trace: Trace, starts: np.ndarray, names: list[str], sizes, cpu: float = 40.0, mem: float = 90.0,
               double_threshold: float = 10.0, seed: int = 0, show_progress: bool = True) -> list[dict]:
    """One row per N: {"n_pms": N, name: trimmed mean, ...}."""
    rows = []
    for n in sizes:
        cluster = ClusterConfig(n_pms=n, node_cpu=cpu, node_mem=mem, double_threshold=double_threshold)
        row: dict = {"n_pms": n}
        for name in names:
            policy = make_policy(name, seed=seed, n_pms=n)
            with progress_bar(f"N={n} {name}", enabled=show_progress) as bar:
                row[name] = round2(evaluate(trace, cluster, policy, starts, progress=bar).summary()["trimmed_mean"])
        rows.append(row)
    return rows


def flex_result(rows: list[dict], names: list[str], split: str, seed: int = 0) -> Result:
    """The flex study as a result: ``{"split", "policies", "rows"}`` (each row n_pms + one trimmed mean per policy),
    a Markdown table (0.01 rounding, as the published tables) and the plot."""
    res = Result("flex", {"split": split, "policies": names, "rows": rows}, seed=seed,
                 title=f"Trimmed-mean total wait per episode (s) by number of PMs ({split} split)")
    cols = ["n_pms"] + names
    res.table(table_rows(rows, cols), cols)
    res.figure = plot_flex(rows, names, split=split if split in ("test", "valid") else Path(split).name)
    return res


def write_flex(rows: list[dict], names: list[str], out: Path, split: str, seed: int = 0) -> dict:
    """Write out/flex.{json,md,png} (results layer, with provenance) and out/flex.csv; returns the JSON data."""
    res = flex_result(rows, names, split, seed)
    cols = ["n_pms"] + names
    csv_lines = [",".join(cols)] + [",".join(str(r[c]) for c in cols) for r in rows]
    check_out_dir(out)
    atomic.write_text(Path(out) / "flex.csv", "\n".join(csv_lines) + "\n")
    res.write(out)
    return res.data


def plot_flex(rows: list[dict], names: list[str], split: str = "test"):
    """The flex plot as a matplotlib figure (written by the results layer)."""
    ns = [r["n_pms"] for r in rows]
    return plot_by_n(ns, {name: [r[name] for r in rows] for name in names}, "trimmed-mean total wait per episode (s)",
                     f"Huawei-East-1 ({split} starts): total wait vs cluster size", figsize=(6, 4))


def plot_by_n(ns, series: dict[str, list[float]], ylabel: str, title: str, ref: float | None = None,
              ref_label: str = "", figsize=(6.4, 4), legend_size: float | None = None, alpha: float = 1.0):
    """One line per series over the cluster sizes ``ns`` (the flex plot and the SPANE per-N / multi-N benches);
    ``ref`` draws a dashed horizontal reference line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize, dpi=120)
    for label, ys in series.items():
        ax.plot(ns, ys, marker="o" if alpha == 1.0 else ".", alpha=alpha, label=label)
    if ref is not None:
        ax.axhline(ref, color="k", lw=0.8, ls="--", label=ref_label)
    ax.set_xlabel("number of PMs (N)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    return fig
