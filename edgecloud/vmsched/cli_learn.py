"""``edgecloud vmsched train`` and ``edgecloud vmsched sweep``: the deep-RL schedulers (SPANE and baselines)."""

from __future__ import annotations

import importlib.util
import itertools
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


def train_run(cfg, out: Path, resume: bool, show: bool = True, trace_path: Path | None = None,
              on_progress=None) -> dict:
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
        p = trainer.train(on_progress)
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
                print(json.dumps({"run": str(run)} | meta))
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
    ) -> None:
        """Train several seeds / agents / configs in parallel (Ray Tune when installed, else local processes)."""
        try:
            seed_list = [int(s) for s in seeds.split(",") if s.strip()]
        except ValueError:
            raise UserError(f"--seeds {seeds!r}: write integers separated by commas, e.g. 0,1,2") from None
        if not seed_list or workers < 1:
            raise UserError("--seeds needs at least one seed and --workers must be >= 1")
        if backend not in ("auto", "ray", "local"):
            raise UserError(f"--backend {backend}: choose auto, ray or local")
        has_ray = importlib.util.find_spec("ray") is not None
        if backend == "ray" and not has_ray:
            raise UserError("--backend ray: Ray is not installed; pip install 'edgecloud[ray]' or use --backend local")
        runs = plan_runs(agent, seed_list, pms, episodes, sets, grid, out)
        use_ray = backend == "ray" or (backend == "auto" and has_ray)
        results = (_sweep_ray if use_ray else _sweep_local)(runs, resume, workers)
        table = Table(title=f"sweep ({'ray tune' if use_ray else 'local processes'})")
        for c in ("run", "seed", "best valid", "episode", "wall s", "steps/s", "out"):
            table.add_column(c)
        for r in sorted(results, key=lambda r: (r["name"], r.get("best_valid_trimmed_mean") or float("inf"))):
            bv = r.get("best_valid_trimmed_mean")
            table.add_row(r["name"], str(r["seed"]), "failed" if bv is None else f"{bv:,.2f}",
                          str(r.get("best_episode", "")), str(r.get("wall_s", "")), str(r.get("env_steps_per_s", "")),
                          r["out"])
        Console().print(table)
        if any(r.get("best_valid_trimmed_mean") is None for r in results):
            raise typer.Exit(1)


def plan_runs(agents: list[str], seeds: list[int], pms: int, episodes: int | None, sets: list[str],
              grid: list[str], out: Path) -> list[dict]:
    """Every (agent, grid point, seed) as a run: its name, config overrides and run dir. Each config is built
    here, so a bad flag fails before anything starts."""
    axes: list[list[tuple[str, str]]] = []
    for g in grid:
        key, _, vals = g.partition("=")
        values = [v.strip() for v in vals.split(",") if v.strip()]
        if not key.strip() or not values:
            raise UserError(f"--grid {g!r}: write key=v1,v2 (e.g. --grid lr=0.001,0.003)")
        axes.append([(key.strip(), v) for v in values])
    runs = []
    for a in agents:
        for point in itertools.product(*axes):
            name = "-".join([a] + [f"{k}-{v}" for k, v in point])
            point_sets = list(sets) + [f"{k}={v}" for k, v in point]
            for s in seeds:
                _config(a, s, pms, episodes, point_sets)
                runs.append({"name": name, "agent": a, "seed": s, "pms": pms, "episodes": episodes,
                             "sets": point_sets, "out": str(out / f"{name}-s{s}")})
    if len({r["out"] for r in runs}) != len(runs):
        raise UserError("two runs would share one run dir: repeat no agent, seed or --grid value")
    return runs


def _run_local(run: dict, resume: bool) -> dict:
    """One run as its own `edgecloud vmsched train` process with one torch thread."""
    cmd = [sys.executable, "-m", "edgecloud.cli", "vmsched", "train", "--agent", run["agent"], "--seed",
           str(run["seed"]), "--out", run["out"], "--pms", str(run["pms"]), "--json",
           *([f"--episodes={run['episodes']}"] if run["episodes"] else []), *[f"--set={x}" for x in run["sets"]],
           *(["--resume"] if resume else [])]
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        console.print(f"[red]{run['name']} seed {run['seed']} failed:[/] {proc.stderr.strip().splitlines()[-1:]}")
        return {"name": run["name"], "seed": run["seed"], "out": run["out"]}
    return json.loads(proc.stdout.strip().splitlines()[-1]) | {"name": run["name"]}


def _sweep_local(runs: list[dict], resume: bool, workers: int) -> list[dict]:
    with Progress(TextColumn("[bold]sweep"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as bar:
        task = bar.add_task("sweep", total=len(runs))
        results = []
        with ThreadPoolExecutor(workers) as ex:
            for r in ex.map(lambda run: _run_local(run, resume), runs):
                results.append(r)
                bar.advance(task)
    return results


def ray_trainable(config: dict) -> None:
    """A Ray Tune function trainable: trains one run in this worker and reports every validation round
    (``valid_trimmed_mean``, ``episode``), so Tune schedulers and the Tune results see the learning curve."""
    from ray import tune

    run = config["run"]
    cfg = _config(run["agent"], run["seed"], run["pms"], run["episodes"], run["sets"])
    seen = 0

    def report(p) -> None:
        nonlocal seen
        for h in p.history[seen:]:
            tune.report({"valid_trimmed_mean": h["valid_trimmed_mean"], "episode": h["episode"],
                         "best_valid_trimmed_mean": p.best_valid, "env_steps": h["env_steps"]})
        seen = len(p.history)

    s = train_run(cfg, Path(run["out"]), config["resume"], show=False, on_progress=report)
    tune.report(s | {"name": run["name"], "valid_trimmed_mean": s["best_valid_trimmed_mean"], "done": True})


def _sweep_ray(runs: list[dict], resume: bool, workers: int) -> list[dict]:
    """Ray Tune: one trial per run, 1 CPU each, at most ``workers`` at a time; results under OUT/ray."""
    import ray
    from ray import tune

    for r in runs:
        r["out"] = str(Path(r["out"]).resolve())
    storage = Path(runs[0]["out"]).parent / "ray"
    started = not ray.is_initialized()
    if started:  # a local Ray with exactly `workers` CPUs; an already running Ray (a cluster) is used as it is
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        tuner = tune.Tuner(tune.with_resources(ray_trainable, {"cpu": 1}),
                           param_space={"run": tune.grid_search(runs), "resume": resume},
                           tune_config=tune.TuneConfig(max_concurrent_trials=workers),
                           run_config=tune.RunConfig(storage_path=str(storage), name="sweep", verbose=0))
        grid = tuner.fit()
    finally:
        if started:
            ray.shutdown()
    results = []
    for r in grid:
        run = r.config["run"]
        m = r.metrics or {}
        if r.error is not None or not m.get("done"):
            console.print(f"[red]{run['name']} seed {run['seed']} failed:[/] {str(r.error).strip().splitlines()[-1:]}")
            results.append({"name": run["name"], "seed": run["seed"], "out": run["out"]})
        else:
            results.append({k: v for k, v in m.items() if k in _SUMMARY_KEYS} | {"name": run["name"]})
    return results


_SUMMARY_KEYS = ("agent", "seed", "n_pms", "episodes", "env_steps", "grad_steps", "wall_s", "env_steps_per_s",
                 "best_valid_trimmed_mean", "best_episode", "finished", "out", "resumed")
