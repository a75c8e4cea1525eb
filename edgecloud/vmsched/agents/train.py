"""Training one DQN run from the CLI's view: a config from flags, a run dir, a progress bar, a summary.

The learner itself is :mod:`edgecloud.vmsched.agents.dqn`; this module is what ``edgecloud vmsched train``,
the sweeps (:mod:`edgecloud.vmsched.sweep`) and ``bench/spane_results.py`` share.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from edgecloud.errors import UserError
from edgecloud.vmsched.agents.config import AGENTS, DQNConfig, default_config

console = Console(stderr=True)


def make_config(agent: str, seed: int, pms: int, episodes: int | None, sets: list[str]) -> DQNConfig:
    if agent not in AGENTS:
        raise UserError(f"--agent {agent}: choose one of {', '.join(AGENTS)}")
    cfg = default_config(agent, seed=seed, n_pms=pms)
    if episodes is not None:
        cfg = cfg.with_overrides([f"episodes={episodes}"])
    return cfg.with_overrides(sets)


def train_run(cfg: DQNConfig, out: Path, resume: bool, show: bool = True, trace_path: Path | None = None,
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




def training_command(cfg: DQNConfig, out: str = "out/RUN") -> list[str]:
    """The ``edgecloud vmsched train`` argv that rebuilds ``cfg`` exactly: agent, seed, N, episodes and one
    ``--set`` for every field that differs from the agent's defaults (used to record each shipped model's
    command; ``make_config`` on the same flags gives back ``cfg``, tested)."""
    base = default_config(cfg.agent, seed=cfg.seed, n_pms=cfg.n_pms, episodes=cfg.episodes).to_dict()
    sets = [f"{k}={v if isinstance(v, str) else json.dumps(v, separators=(',', ':'))}" for k, v in cfg.to_dict().items()
            if base[k] != v]
    return ["edgecloud", "vmsched", "train", "--agent", cfg.agent, "--seed", str(cfg.seed), "--pms", str(cfg.n_pms),
            "--episodes", str(cfg.episodes), "--out", out] + [x for s in sets for x in ("--set", s)]
