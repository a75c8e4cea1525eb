"""Model selection after training, on the validation split only.

DQN's greedy policy swings from one checkpoint to the next (a run's validation scores jump by 2x between
neighbouring checkpoints), so the single best checkpoint is partly luck of the draw. The candidates here are the
best validated checkpoint and the mean-Q ensembles of the k best checkpoints; each is scored on the same
validation starts and the lowest trimmed mean wins (ties go to the smaller model). The winner is written to
``RUN/selected`` (load it with ``checkpoint:RUN/selected``; ``checkpoint:RUN`` stays the best checkpoint).

Measured (docs/results/spane.md): an ensemble won on validation in 8 of 40 runs but beat that run's best
checkpoint on the test split in only 2 (for SPANE-NUMA it was worse in all 5), i.e. choosing among more candidates
on 150 validation starts overfits them; so the issue's protocol, the best checkpoint, remains every run's model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from edgecloud.errors import UserError
from edgecloud.vmsched.agents.policy import QPolicy
from edgecloud.vmsched.agents.qnet import EnsembleQNet
from edgecloud.vmsched.checkpoint import CONFIG, load_model, save_model
from edgecloud.vmsched.cluster import ClusterConfig
from edgecloud.vmsched.evaluate import evaluate, trimmed_mean
from edgecloud.vmsched.trace import Trace

DEFAULT_KS = (1, 3, 5)

SCORE_METRIC = "geometric mean over N of trimmed mean / Balance-Fit trimmed mean"


def balance_fit_scores(trace: Trace, pms, starts) -> dict[int, float]:
    """Balance-Fit's trimmed mean at each N on ``starts`` (the yardstick of a multi-N score)."""
    from edgecloud.vmsched.policies import BalanceFit

    return {n: trimmed_mean(evaluate(trace, ClusterConfig(n_pms=n), BalanceFit(), starts).totals) for n in pms}


def valid_score(trace: Trace, net: torch.nn.Module, agent: str, pms, starts, bf: dict[int, float]
                ) -> tuple[float, dict[int, float]]:
    """Score of a network on ``starts`` at each N of ``pms``: at one N its trimmed mean; at several the geometric
    mean over N of its trimmed mean / Balance-Fit's (so every N weighs the same, whatever its scale)."""
    by_n = {n: trimmed_mean(evaluate(trace, ClusterConfig(n_pms=n), QPolicy(net, agent), starts).totals)
            for n in pms}
    if len(by_n) == 1:
        return next(iter(by_n.values())), by_n
    return float(np.exp(np.mean([np.log(by_n[n] / bf[n]) for n in pms]))), by_n


def ranked_checkpoints(run: Path) -> list[tuple[float, int, Path]]:
    """(validation score, episode, dir) of every saved checkpoint of a run, best first (the score is the trimmed
    mean, or the multi-N ratio score of ``valid_score`` when the run validated at several N)."""
    out = []
    for d in sorted((Path(run) / "checkpoints").glob("ep*")):
        try:
            meta = json.loads((d / CONFIG).read_text())["meta"]
        except (OSError, ValueError, KeyError):
            continue  # a checkpoint being written when the run was killed
        out.append((float(meta.get("valid_score", meta["valid_trimmed_mean"])), int(meta["episode"]), d))
    return sorted(out, key=lambda t: (t[0], t[1]))


def select_model(run: Path, trace: Trace, valid_starts: np.ndarray, ks: tuple[int, ...] = DEFAULT_KS) -> dict:
    """Score the candidates on validation, write the winner to ``run/selected``, return what was compared."""
    run = Path(run)
    ranked = ranked_checkpoints(run)
    if not ranked:
        raise UserError(f"{run} has no checkpoints/ to select from; train with keep_checkpoints=true")
    if any(k < 1 for k in ks):
        raise UserError(f"--k {list(ks)}: ensemble sizes must be >= 1")
    nets, cfg = [], None
    for _, _, d in ranked[: max(ks)]:
        net, cfg, _ = load_model(d)
        nets.append(net)
    starts = np.asarray(valid_starts, np.int64)
    if cfg.valid_limit:
        starts = starts[: cfg.valid_limit]
    pms = cfg.valid_pms or (cfg.n_pms,)
    bf = balance_fit_scores(trace, pms, starts) if len(pms) > 1 else {}
    scores: dict[int, float] = {}
    for k in sorted({min(k, len(nets)) for k in ks}):
        net = nets[0] if k == 1 else EnsembleQNet(nets[:k])
        scores[k] = valid_score(trace, net, cfg.agent, pms, starts, bf)[0]
    k_best = min(scores, key=lambda k: (scores[k], k))
    winner = nets[0] if k_best == 1 else EnsembleQNet(nets[:k_best])
    meta = {"valid_trimmed_mean": round(scores[k_best], 4), "members": k_best,
            "episodes": [ep for _, ep, _ in ranked[:k_best]],
            "candidates": {str(k): round(v, 4) for k, v in scores.items()}, "valid_starts": int(len(starts))}
    save_model(run / "selected", winner, cfg, meta)
    return meta
