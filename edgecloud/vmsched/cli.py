"""``edgecloud vmsched ...``: evaluate schedulers on the Huawei-East-1 trace, and the flex study over N."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from edgecloud.errors import UserError
from edgecloud.results import check_out_dir, report
from edgecloud.vmsched.cluster import ClusterConfig
from edgecloud.vmsched.evaluate import evaluate_policies, fmt2
from edgecloud.vmsched.policies import make_policy
from edgecloud.vmsched.trace import load_starts, load_trace

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False)
console = Console(width=None if sys.stdout.isatty() else 160)

TraceOpt = typer.Option(None, "--trace", help="Trace CSV (lifetime or raw event form). Default: "
                        "$EDGECLOUD_DATA/huawei-east-1/Huawei-East-1-lt.csv, data root ../shared/data.")
CpuOpt = typer.Option(40.0, "--cpu", help="CPU per NUMA node.")
MemOpt = typer.Option(90.0, "--mem", help="Memory (GB) per NUMA node.")
DoubleOpt = typer.Option(10.0, "--double-threshold", help="A VM is double-NUMA when mem > this.")
HorizonOpt = typer.Option(None, "--horizon", help="Raw event traces: keep never-deleted VMs until this time "
                          "(seconds) instead of dropping them.")
JsonOpt = typer.Option(False, "--json", help="Print one JSON object instead of a table.")
SeedOpt = typer.Option(0, "--seed", help="Seed for stochastic policies (random).")


def _cluster(pms: int, cpu: float, mem: float, double_threshold: float) -> ClusterConfig:
    return ClusterConfig(n_pms=pms, node_cpu=cpu, node_mem=mem, double_threshold=double_threshold)


def _print_summary(rows: list[dict], title: str) -> None:
    from edgecloud.vmsched.published import reference

    cols = ("policy", "n_pms", "split", "episodes", "trimmed_mean", "published", "vs published", "mean", "p50",
            "p90", "p99")
    table = Table(title=title, caption="Each episode's total wait (s) summed over its VMs; trimmed_mean = 10% "
                  "trimmed mean over the split's episodes (SPANE's score). Lower is better. 'published' is the "
                  "SPANE paper's number for the test split (learned models: mean of the top 3 by validation); "
                  "'vs published' = ours / published.")
    for col in cols:
        table.add_column(col, justify="right" if col not in ("policy", "split") else "left")
    for r in rows:
        ref = reference(r["policy"], r["n_pms"]) if r["split"] == "test" else None
        pub, ratio = (fmt2(ref[0]), f"{r['trimmed_mean'] / ref[0]:.3f}") if ref else ("-", "-")
        table.add_row(*[fmt2(r[c]) for c in cols[:5]], pub, ratio, *[fmt2(r[c]) for c in cols[7:]])
    console.print(table)


@app.command("evaluate")
def evaluate_cmd(
    policy: list[str] = typer.Option(["first-fit"], "--policy", "-p",
                                     help="first-fit, balance-fit, best-fit, worst-fit, random, a shipped model "
                                          "(spane = our best learner by validation; spane-paper = the published "
                                          "architecture; spane-numa, mlpdqn, mlpaug) or "
                                          "checkpoint:DIR. Repeat for several."),
    split: str = typer.Option("test", "--split", help="test, valid, or a .npy / text file of start rows."),
    pms: int = typer.Option(5, "--pms", min=1, max=1000, help="Number of PMs (N >= 1)."),
    trace: Path | None = TraceOpt,
    horizon: float | None = HorizonOpt,
    cpu: float = CpuOpt,
    mem: float = MemOpt,
    double_threshold: float = DoubleOpt,
    seed: int = SeedOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Total wait per episode on a split, as SPANE scores it: 10% trimmed mean, mean, p50/p90/p99."""
    cluster = _cluster(pms, cpu, mem, double_threshold)
    for name in policy:
        make_policy(name, seed=seed, n_pms=pms)  # a bad name fails before the trace loads
    tr = load_trace(trace, horizon=horizon)
    starts = load_starts(split, len(tr))
    rows = evaluate_policies(tr, cluster, policy, starts, split, seed=seed, show_progress=not as_json)
    if as_json:  # one shape for any number of policies: the first policy's row at the top, every row in "rows"
        print(report(rows[0] | {"rows": rows}, seed=seed))
    else:
        _print_summary(rows, f"Total wait per episode (s), N={pms} PMs")


@app.command("flex")
def flex_cmd(
    policy: list[str] = typer.Option([], "--policy", "-p", help="Extra policies beside first-fit and balance-fit "
                                                                "(e.g. checkpoint:DIR trained at N=5)."),
    pms_min: int = typer.Option(2, "--pms-min", min=1, max=1000),
    pms_max: int = typer.Option(9, "--pms-max", min=1, max=1000),
    split: str = typer.Option("test", "--split"),
    out: Path = typer.Option(Path("out/vmsched-flex"), "--out",
                     help="Folder for flex.json, flex.md, flex.csv, flex.png."),
    trace: Path | None = TraceOpt,
    horizon: float | None = HorizonOpt,
    cpu: float = CpuOpt,
    mem: float = MemOpt,
    double_threshold: float = DoubleOpt,
    seed: int = SeedOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Trimmed-mean total wait for N = pms-min..pms-max PMs: First-Fit, Balance-Fit and any --policy."""
    if pms_min < 1 or pms_max < pms_min:
        raise UserError(f"--pms-min {pms_min} / --pms-max {pms_max}: need 1 <= pms-min <= pms-max")
    from edgecloud.vmsched.flex import flex_table, write_flex

    check_out_dir(out)
    _cluster(pms_min, cpu, mem, double_threshold)
    for name in policy:
        make_policy(name, seed=seed)  # a bad name fails before the trace loads
    tr = load_trace(trace, horizon=horizon)
    starts = load_starts(split, len(tr))
    names = ["first-fit", "balance-fit"] + [p for p in policy if p not in ("first-fit", "balance-fit")]
    rows = flex_table(tr, starts, names, range(pms_min, pms_max + 1), cpu, mem, double_threshold, seed,
                      show_progress=not as_json)
    data = write_flex(rows, names, out, split, seed)
    if as_json:
        print(report(data | {"out": str(out)}, seed=seed))
        return
    cols = ["n_pms"] + names
    table = Table(title=f"Trimmed-mean total wait by number of PMs ({split} split)")
    for c in cols:
        table.add_column(c, justify="right")
    for r in rows:
        table.add_row(*[str(r["n_pms"])] + [fmt2(r[n]) for n in names])
    console.print(table)
    console.print(f"wrote {out / 'flex.json'}, {out / 'flex.md'}, {out / 'flex.csv'}, {out / 'flex.png'}")


from edgecloud.vmsched import cli_learn, cli_milp  # noqa: E402  (their commands join this group)

cli_learn.register(app)
cli_milp.register(app)
