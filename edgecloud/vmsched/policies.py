"""Placement policies. Every policy is vectorized: it takes a batch of pending decisions and returns one
action per row, so the same object drives the scalar Gymnasium env (batch of 1) and the batched evaluator.

A learned policy plugs in by implementing the same ``__call__(decision) -> actions``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from edgecloud.errors import UserError
from edgecloud.vmsched.cluster import ClusterConfig, vm_demand


@dataclass
class Decision:
    """A batch of B placements waiting for a policy."""

    free: np.ndarray  # (B, N, 2, 2) remaining cpu, mem per PM and node
    cpu: np.ndarray  # (B,)
    mem: np.ndarray  # (B,)
    double: np.ndarray  # (B,) bool
    mask: np.ndarray  # (B, 2N) bool, at least one True per row
    cluster: ClusterConfig

    def features(self) -> tuple[np.ndarray, np.ndarray]:
        """Normalised inputs for learned policies: PM state (B, N, 4) and VM features (B, 3)."""
        cap = self.cluster.capacity
        pm = (self.free / cap).reshape(self.free.shape[0], self.free.shape[1], 4)
        vm = np.stack([self.cpu / cap[0], self.mem / cap[1], self.double.astype(np.float64)], axis=1)
        return pm, vm


class Policy(Protocol):
    name: str

    def __call__(self, d: Decision) -> np.ndarray: ...


def first_valid(mask: np.ndarray) -> np.ndarray:
    return np.argmax(mask, axis=1)


class FirstFit:
    """The lowest valid action index."""

    name = "first-fit"

    def __call__(self, d: Decision) -> np.ndarray:
        return first_valid(d.mask)


class BalanceFit:
    """SPANE's Balance-Fit, exactly as the spec states it.

    Double VMs go First-Fit. For a single VM each node scores min(cpu_left/cpu_cap, mem_left/mem_cap); each PM
    with a valid node scores |node0 - node1| (others 0). If all PM scores are 0, First-Fit; else the PM with the
    largest score (first on ties), on it the node with the larger value (first on ties), or the other node if
    that one is invalid.
    """

    name = "balance-fit"

    def __call__(self, d: Decision) -> np.ndarray:
        B, N = d.free.shape[:2]
        cap = d.cluster.capacity
        v = np.minimum(d.free[..., 0] / cap[0], d.free[..., 1] / cap[1])  # (B, N, 2)
        valid = d.mask.reshape(B, N, 2)
        diff = np.where(valid.any(axis=2), np.abs(v[..., 0] - v[..., 1]), 0.0)  # (B, N)
        pm = np.argmax(diff, axis=1)
        rows = np.arange(B)
        node = np.where(v[rows, pm, 1] > v[rows, pm, 0], 1, 0)
        node = np.where(valid[rows, pm, node], node, 1 - node)
        act = 2 * pm + node
        use_ff = d.double | (diff.max(axis=1) == 0)
        return np.where(use_ff, first_valid(d.mask), act)


def _leftover(d: Decision) -> np.ndarray:
    """Normalised capacity left on the touched node(s) after each action, (B, 2N); inf where invalid."""
    B, N = d.free.shape[:2]
    cap = d.cluster.capacity
    need_cpu, need_mem = vm_demand(d.cpu, d.mem, d.double)
    after = (d.free[..., 0] - need_cpu[:, None, None]) / cap[0] + (d.free[..., 1] - need_mem[:, None, None]) / cap[1]
    pm_after = after.sum(axis=2, keepdims=True)  # a double VM leaves both nodes' remainder
    score = np.where(d.double[:, None, None], np.broadcast_to(pm_after, after.shape), after).reshape(B, 2 * N)
    return np.where(d.mask, score, np.inf)


class BestFit:
    """The valid action that leaves the least normalised cpu+mem on the node(s) it uses (first on ties)."""

    name = "best-fit"

    def __call__(self, d: Decision) -> np.ndarray:
        return np.argmin(_leftover(d), axis=1)


class WorstFit:
    """The valid action that leaves the most normalised cpu+mem on the node(s) it uses (first on ties)."""

    name = "worst-fit"

    def __call__(self, d: Decision) -> np.ndarray:
        s = _leftover(d)
        return np.argmax(np.where(np.isfinite(s), s, -np.inf), axis=1)


class RandomFit:
    """A uniformly random valid action, from its own seeded generator."""

    name = "random"

    def __init__(self, seed: int | None = 0) -> None:
        self.rng = np.random.default_rng(seed)

    def __call__(self, d: Decision) -> np.ndarray:
        u = self.rng.random(d.mask.shape)
        return np.argmax(np.where(d.mask, u, -1.0), axis=1)


HEURISTICS: dict[str, Callable[..., Policy]] = {
    "first-fit": FirstFit,
    "balance-fit": BalanceFit,
    "best-fit": BestFit,
    "worst-fit": WorstFit,
    "random": RandomFit,
}


def make_policy(name: str, seed: int = 0, n_pms: int | None = None) -> Policy:
    """A policy by name: a heuristic, a shipped learned model (e.g. ``spane``), or ``checkpoint:DIR``.

    Learned policies come from :mod:`edgecloud.vmsched.checkpoint` (``load_policy(name, n_pms)``, which returns
    None for a name it does not know), imported only when a non-heuristic name is asked for.
    """
    key = name.strip().lower()
    if key == "random":
        return RandomFit(seed)
    if key in HEURISTICS:
        return HEURISTICS[key]()
    learned = None
    if importlib.util.find_spec("edgecloud.vmsched.checkpoint") is not None:
        from edgecloud.vmsched.checkpoint import load_policy

        learned = load_policy(name, n_pms)
    if learned is not None:
        return learned
    from edgecloud.vmsched.agents.config import AGENTS

    raise UserError(f"unknown policy '{name}'; choose one of {', '.join(HEURISTICS)}, a shipped model "
                    f"({', '.join(AGENTS)}), or checkpoint:DIR")
