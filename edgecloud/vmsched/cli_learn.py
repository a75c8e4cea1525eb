"""``edgecloud vmsched train`` and ``edgecloud vmsched sweep``: the deep-RL schedulers (SPANE and baselines)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from edgecloud.errors import UserError
from edgecloud.vmsched.agents.config import AGENTS, default_config

console = Console(stderr=True)


def _config(agent: str, seed: int, pms: int, episodes: int | None, sets: list[str]):
    if agent not in AGENTS:
        raise UserError(f"--agent {agent}: choose one of {', '.join(AGENTS)}")
    cfg = default_config(agent, seed=seed, n_pms=pms)
    if episodes is not None:
        cfg = cfg.with_overrides([f"episodes={episodes}"])
    return cfg.with_overrides(sets)


def train_run(cfg, out: Path, resume: bool, show: bool = True, trace_path: Path | None = None) -> dict:
    """Train one config into ``out`` (resuming when asked and possible); return the run summary."""
    from edgecloud.vmsched.agents.dqn import RESUME, Trainer
    from edgecloud.vmsched.trace import load_starts, load_trace

    out = Path(out)
    if not resume and (out / RESUME).exists():
        raise UserError(f"--out {out} already holds a training run; pass --resume to continue it or pick a new --out")
    tr = load_trace(trace_path)
    trainer = Trainer(cfg, tr, load_starts("valid", len(tr)), out)
    resumed = resume and trainer.load_resume()
    if not show:
        p = trainer.train()
    else:
        cols = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("eps {task.fields[eps]}"),
                TextColumn("valid {task.fields[valid]} (best {task.fields[best]})"),
                TextColumn("{task.fields[sps]} steps/s"), TimeElapsedColumn()]
        with Progress(*cols, console=console) as bar:
            task = bar.add_task(f"{cfg.agent} seed {cfg.seed}" + (" (resumed)" if resumed else ""),
                                total=cfg.episodes, eps="-", valid="-", best="-", sps="-")

            def update(p) -> None:
                bar.update(task, completed=min(p.episodes, cfg.episodes), eps=f"{p.eps:.3f}",
                           valid="-" if p.valid is None else f"{p.valid:,.0f}",
                           best="-" if p.best_valid is None else f"{p.best_valid:,.0f}",
                           sps=f"{p.env_steps / max(p.wall_s, 1e-9):,.0f}")

            p = trainer.train(update)
    s = trainer.summary()
    s.pop("history")
    s.pop("config")
    return s | {"out": str(out), "resumed": bool(resumed), "best_episode": p.best_episode}


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
        cfg = _config(agent, seed, pms, episodes, sets)
        s = train_run(cfg, out, resume, show=not as_json, trace_path=trace)
        if as_json:
            print(json.dumps(s))
        else:
            console.print(f"{agent} seed {seed}: best valid trimmed mean {s['best_valid_trimmed_mean']:,.2f} at "
                          f"episode {s['best_episode']}; {s['env_steps']:,} env steps in {s['wall_s']:.0f} s "
                          f"({s['env_steps_per_s']:,.0f}/s); model in {out / 'best'}")

    @app.command("sweep")
    def sweep_cmd(
        agent: list[str] = typer.Option(["spane"], "--agent", help="Repeat for several agents."),
        seeds: str = typer.Option("0,1,2,3,4", "--seeds", help="Comma-separated seeds."),
        out: Path = typer.Option(Path("out/vmsched-sweep"), "--out", help="One sub-dir per run: AGENT-sSEED."),
        pms: int = typer.Option(5, "--pms"),
        episodes: int | None = typer.Option(None, "--episodes"),
        sets: list[str] = typer.Option([], "--set", help="DQNConfig overrides for every run."),
        workers: int = typer.Option(2, "--workers", help="Runs at a time."),
        backend: str = typer.Option("auto", "--backend", help="auto (Ray Tune if installed), ray, or local."),
        resume: bool = typer.Option(False, "--resume", help="Resume runs that have a resume file."),
    ) -> None:
        """Train several seeds / agents in parallel (Ray Tune when installed, else local processes)."""
        try:
            seed_list = [int(s) for s in seeds.split(",") if s.strip()]
        except ValueError:
            raise UserError(f"--seeds {seeds!r}: write integers separated by commas, e.g. 0,1,2") from None
        if not seed_list or workers < 1:
            raise UserError("--seeds needs at least one seed and --workers must be >= 1")
        runs = [(a, s) for a in agent for s in seed_list]
        for a, s in runs:
            _config(a, s, pms, episodes, sets)  # fail fast on bad flags, before anything starts
        has_ray = importlib.util.find_spec("ray") is not None
        if backend not in ("auto", "ray", "local"):
            raise UserError(f"--backend {backend}: choose auto, ray or local")
        if backend == "ray" and not has_ray:
            raise UserError("--backend ray: Ray is not installed; pip install 'edgecloud[ray]' or use --backend local")
        use_ray = backend == "ray" or (backend == "auto" and has_ray)
        extra = ([f"--episodes={episodes}"] if episodes else []) + [f"--set={x}" for x in sets] + \
            (["--resume"] if resume else [])
        if use_ray:
            results = _sweep_ray(runs, out, pms, extra, workers)
        else:
            results = _sweep_local(runs, out, pms, extra, workers)
        table = Table(title=f"sweep ({'ray tune' if use_ray else 'local processes'})")
        for c in ("agent", "seed", "best valid", "episode", "wall s", "steps/s", "out"):
            table.add_column(c)
        for r in sorted(results, key=lambda r: (r["agent"], r.get("best_valid_trimmed_mean") or float("inf"))):
            bv = r.get("best_valid_trimmed_mean")
            table.add_row(r["agent"], str(r["seed"]), "failed" if bv is None else f"{bv:,.2f}",
                          str(r.get("best_episode", "")), str(r.get("wall_s", "")), str(r.get("env_steps_per_s", "")),
                          r["out"])
        Console().print(table)


def _cmd(agent: str, seed: int, out: Path, pms: int, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "edgecloud.cli", "vmsched", "train", "--agent", agent, "--seed", str(seed),
            "--out", str(out), "--pms", str(pms), "--json", *extra]


def _run_one(agent: str, seed: int, out: Path, pms: int, extra: list[str]) -> dict:
    run_out = out / f"{agent}-s{seed}"
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(_cmd(agent, seed, run_out, pms, extra), capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        console.print(f"[red]{agent} seed {seed} failed:[/] {proc.stderr.strip().splitlines()[-1:]}")
        return {"agent": agent, "seed": seed, "out": str(run_out)}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _sweep_local(runs, out: Path, pms: int, extra: list[str], workers: int) -> list[dict]:
    """Each run is its own `edgecloud vmsched train` process (1 torch thread); threads only wait on them."""
    with Progress(TextColumn("[bold]sweep"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as bar:
        task = bar.add_task("sweep", total=len(runs))
        results = []
        with ThreadPoolExecutor(workers) as ex:
            for r in ex.map(lambda ar: _run_one(ar[0], ar[1], out, pms, extra), runs):
                results.append(r)
                bar.advance(task)
    return results


def _sweep_ray(runs, out: Path, pms: int, extra: list[str], workers: int) -> list[dict]:
    """Ray Tune: one trial per (agent, seed), 1 CPU each, at most ``workers`` at a time."""
    from ray import tune

    out = out.resolve()

    def trainable(config: dict) -> dict:
        return _run_one(config["agent"], config["seed"], out, pms, extra)

    space = {"run": tune.grid_search([{"agent": a, "seed": s} for a, s in runs])}
    tuner = tune.Tuner(tune.with_resources(lambda c: trainable(c["run"]), {"cpu": 1}), param_space=space,
                       tune_config=tune.TuneConfig(max_concurrent_trials=workers))
    grid = tuner.fit()
    return [r.metrics for r in grid if r.metrics]
