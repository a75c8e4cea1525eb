"""``edgecloud vmsched train``, ``select`` and ``sweep``: options in, library calls out (training lives in
:mod:`edgecloud.vmsched.agents.train`, sweeps in :mod:`edgecloud.vmsched.sweep`)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from edgecloud.errors import UserError
from edgecloud.results import report

console = Console(stderr=True)


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train_cmd(
        agent: str = typer.Option("spane", "--agent", help="spane, spane-numa, mlpdqn or mlpaug."),
        seed: int = typer.Option(0, "--seed", help="Seeds network init, exploration, replay and training starts."),
        out: Path = typer.Option(..., "--out", help="Run dir: best/ (model.safetensors + config.json), "
                                                    "resume.safetensors, summary.json."),
        pms: int = typer.Option(5, "--pms", help="Number of PMs to train on."),
        episodes: int | None = typer.Option(None, "--episodes", help="Training episodes (default 5000)."),
        sets: list[str] = typer.Option([], "--set", help="Override any DQNConfig field: --set lr=0.001 (repeat)."),
        resume: bool = typer.Option(False, "--resume", help="Continue the run in --out after a kill."),
        trace: Path | None = typer.Option(None, "--trace", help="Trace CSV (default: the Huawei-East-1 trace)."),
        as_json: bool = typer.Option(False, "--json", help="No progress bar; print the summary as JSON."),
    ) -> None:
        """Train a DQN scheduler (double DQN, dueling, n-step) with validation on the 150-start split."""
        from edgecloud.vmsched.agents.train import make_config, train_run

        cfg = make_config(agent, seed, pms, episodes, sets)
        s = train_run(cfg, out, resume, show=not as_json, trace_path=trace)
        if as_json:
            print(report(s, seed=seed))
        else:
            console.print(f"{agent} seed {seed}: best valid trimmed mean {s['best_valid_trimmed_mean']:,.2f} at "
                          f"episode {s['best_episode']}; {s['env_steps']:,} env steps in {s['wall_s']:.0f} s "
                          f"({s['env_steps_per_s']:,.0f}/s); model in {out / 'best'}")

    @app.command("select")
    def select_cmd(
        runs: list[Path] = typer.Argument(..., help="Training run dirs (each with checkpoints/)."),
        k: str = typer.Option("1,3,5", "--k", help="Ensemble sizes to compare (1 = the best checkpoint alone)."),
        trace: Path | None = typer.Option(None, "--trace", help="Trace CSV (default: the Huawei-East-1 trace)."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object per run."),
    ) -> None:
        """Pick each run's model on the validation split: its best checkpoint or a mean-Q ensemble of its k best;
        writes RUN/selected (load it with --policy checkpoint:RUN/selected)."""
        from edgecloud.vmsched.agents.select import select_model
        from edgecloud.vmsched.trace import load_starts, load_trace

        try:
            ks = tuple(int(x) for x in k.split(",") if x.strip())
        except ValueError:
            raise UserError(f"--k {k!r}: write integers separated by commas, e.g. 1,3,5") from None
        tr = load_trace(trace)
        valid = load_starts("valid", len(tr))
        for run in runs:
            if not run.is_dir():
                raise UserError(f"{run} is not a directory; pass training run dirs (edgecloud vmsched train --out)")
        for run in runs:
            meta = select_model(run, tr, valid, ks or (1,))
            if as_json:
                print(report({"run": str(run)} | meta))
            else:
                cands = ", ".join(f"k={a}: {b:,.0f}" for a, b in meta["candidates"].items())
                console.print(f"{run}: selected k={meta['members']} ({cands}) -> {run / 'selected'}")

    @app.command("sweep")
    def sweep_cmd(
        agent: list[str] = typer.Option(["spane"], "--agent", help="Repeat for several agents."),
        seeds: str = typer.Option("0,1,2,3,4", "--seeds", help="Comma-separated seeds."),
        out: Path = typer.Option(Path("out/vmsched-sweep"), "--out", help="One sub-dir per run: AGENT[-KEY-V]-sSEED."),
        pms: int = typer.Option(5, "--pms"),
        episodes: int | None = typer.Option(None, "--episodes"),
        sets: list[str] = typer.Option([], "--set", help="DQNConfig overrides for every run."),
        grid: list[str] = typer.Option([], "--grid", help="A DQNConfig field and its values, crossed with agents, "
                                                          "seeds and other --grid fields: --grid lr=0.001,0.003."),
        workers: int = typer.Option(2, "--workers", help="Runs at a time."),
        backend: str = typer.Option("auto", "--backend", help="auto (Ray Tune if installed), ray, or local."),
        resume: bool = typer.Option(False, "--resume", help="Resume runs that have a resume file."),
        as_json: bool = typer.Option(False, "--json", help="Print the run summaries as one JSON object."),
    ) -> None:
        """Train several seeds / agents / configs in parallel (Ray Tune when installed, else local processes)."""
        try:
            seed_list = [int(s) for s in seeds.split(",") if s.strip()]
        except ValueError:
            raise UserError(f"--seeds {seeds!r}: write integers separated by commas, e.g. 0,1,2") from None
        if not seed_list:
            raise UserError("--seeds needs at least one seed")
        from edgecloud.vmsched.sweep import plan_runs, sweep

        runs = plan_runs(agent, seed_list, pms, episodes, sets, grid, out)
        results, use_ray = sweep(runs, backend, workers, resume)
        failed = any(r.get("best_valid_trimmed_mean") is None for r in results)
        if as_json:  # each run's own provenance is dropped: the sweep's covers them all
            print(report({"backend": "ray" if use_ray else "local", "failed": failed,
                          "runs": [{k: v for k, v in r.items() if k != "provenance"} for r in results]}))
            if failed:
                raise typer.Exit(1)
            return
        table = Table(title=f"sweep ({'ray tune' if use_ray else 'local processes'})")
        for c in ("run", "seed", "best valid", "episode", "wall s", "steps/s", "out"):
            table.add_column(c)
        for r in sorted(results, key=lambda r: (r["name"], r.get("best_valid_trimmed_mean") or float("inf"))):
            bv = r.get("best_valid_trimmed_mean")
            table.add_row(r["name"], str(r["seed"]), "failed" if bv is None else f"{bv:,.2f}",
                          str(r.get("best_episode", "")), str(r.get("wall_s", "")), str(r.get("env_steps_per_s", "")),
                          r["out"])
        Console().print(table)
        if failed:
            raise typer.Exit(1)
