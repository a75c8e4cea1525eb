"""Sweeps: several (agent, config grid point, seed) training runs in parallel, on Ray Tune when it is installed
(one trial per run, learning curves reported to Tune) or as local ``edgecloud vmsched train`` processes."""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from edgecloud.errors import UserError
from edgecloud.vmsched.agents.train import console, make_config, train_run


def sweep(runs: list[dict], backend: str = "auto", workers: int = 2, resume: bool = False) -> tuple[list[dict], bool]:
    """Run every planned run (see :func:`plan_runs`); returns one summary per run (failed runs lack
    ``best_valid_trimmed_mean``) and whether Ray Tune ran them."""
    if backend not in ("auto", "ray", "local"):
        raise UserError(f"--backend {backend}: choose auto, ray or local")
    if workers < 1:
        raise UserError(f"--workers {workers}: must be >= 1")
    has_ray = importlib.util.find_spec("ray") is not None
    if backend == "ray" and not has_ray:
        raise UserError("--backend ray: Ray is not installed; pip install 'edgecloud[ray]' or use --backend local")
    use_ray = backend == "ray" or (backend == "auto" and has_ray)
    return (_sweep_ray if use_ray else _sweep_local)(runs, resume, workers), use_ray


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
                make_config(a, s, pms, episodes, point_sets)
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
    cfg = make_config(run["agent"], run["seed"], run["pms"], run["episodes"], run["sets"])
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
