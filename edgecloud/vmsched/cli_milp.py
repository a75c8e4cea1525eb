"""``edgecloud vmsched optimal``: the offline DVAMP MILP on K trace VMs against First-Fit and Balance-Fit."""

from __future__ import annotations

from pathlib import Path

import typer

from edgecloud.errors import UserError
from edgecloud.results import report
from edgecloud.vmsched.cluster import ClusterConfig
from edgecloud.vmsched.milp import MilpConfig, compare_offline
from edgecloud.vmsched.trace import load_trace


def register(app: typer.Typer) -> None:
    @app.command("optimal")
    def optimal_cmd(
        start: int = typer.Option(..., "--start", help="First trace row of the instance."),
        vms: int = typer.Option(..., "--vms", help="Number of VMs K (rows start..start+K-1)."),
        pms: int = typer.Option(2, "--pms", help="Number of PMs M."),
        cpu: float = typer.Option(40.0, "--cpu", help="CPU per NUMA node (scale down so that queueing happens)."),
        mem: float = typer.Option(90.0, "--mem", help="Memory (GB) per NUMA node."),
        double_threshold: float = typer.Option(10.0, "--double-threshold", help="Double-NUMA when mem > this."),
        time_limit: float = typer.Option(10.0, "--time-limit", help="Seconds per MILP solve (two solves: the "
                                         "simulator-semantics model and the relaxed lower-bound model)."),
        mip_gap: float = typer.Option(0.0, "--mip-gap", help="Relative MIP gap at which a solve stops (0: exact; "
                                      "it also stops once the absolute gap is below 1 s, waits being integers)."),
        no_bound: bool = typer.Option(False, "--no-bound", help="Skip the relaxed (non-FIFO) lower-bound solve."),
        trace: Path | None = typer.Option(None, "--trace", help="Trace CSV (default: the Huawei-East-1 trace)."),
        seed: int = typer.Option(0, "--seed", help="HiGHS random seed (the solve is deterministic given it)."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    ) -> None:
        """Optimal total wait of K VMs from trace row S on M PMs (HiGHS), with a lower bound, First-Fit and
        Balance-Fit totals. Status: optimal / feasible (time limit hit, best solution and gap) / timeout."""
        if vms < 1:
            raise UserError(f"--vms is {vms}; it must be >= 1")
        if pms < 1:
            raise UserError(f"--pms is {pms}; it must be >= 1")
        cluster = ClusterConfig(n_pms=pms, node_cpu=cpu, node_mem=mem, double_threshold=double_threshold)
        cfg = MilpConfig(mode="sim", time_limit=time_limit, mip_gap=mip_gap, seed=seed)
        out = compare_offline(load_trace(trace), cluster, start, vms, cfg, lower_bound=not no_bound)
        if as_json:
            print(report(out, seed=seed))
            return
        for k, v in out.items():
            typer.echo(f"{k:24s} {v}")
