"""Placement policies. Every policy is vectorized: it takes a batch of pending decisions and returns one
action per row, so the same object drives the scalar Gymnasium env (batch of 1) and the batched evaluator.

A learned policy plugs in by implementing the same ``__call__(decision) -> actions``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Protocol

import numpy as np

from edgecloud.errors import UserError
from edgecloud.vmsched.cluster import vm_demand
from edgecloud.vmsched.decision import Decision

__all__ = ["Decision", "Policy", "HEURISTICS", "make_policy", "register_policy", "register_prefix", "policy_names"]


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


# The one policy registry. A factory builds a policy from (name as asked, seed, n_pms). Learned policies are not
# imported here: their modules (PLUGINS) register themselves when imported, and are imported only on the first
# name the registry does not know, so the heuristics never pull in torch or the learners.
Factory = Callable[[str, int, "int | None"], Policy]
_NAMES: dict[str, Factory] = {k: (lambda _n, seed, _p, cls=cls: cls(seed) if cls is RandomFit else cls())
                              for k, cls in HEURISTICS.items()}
_PREFIXES: dict[str, Factory] = {}
PLUGINS = ["edgecloud.vmsched.checkpoint"]
_loaded: set[str] = set()


def register_policy(name: str, factory: Factory) -> None:
    """Make ``make_policy(name)`` build ``factory(name, seed, n_pms)`` (names are case-insensitive)."""
    _NAMES[name.strip().lower()] = factory


def register_prefix(prefix: str, factory: Factory) -> None:
    """Make every name starting with ``prefix`` (e.g. ``checkpoint:``) build ``factory(name, seed, n_pms)``."""
    _PREFIXES[prefix.lower()] = factory


def _load_plugins() -> None:
    for mod in PLUGINS:
        if mod not in _loaded:
            importlib.import_module(mod)  # a broken learner module is a loud error, never a missing policy
            _loaded.add(mod)


def _lookup(key: str) -> Factory | None:
    if key in _NAMES:
        return _NAMES[key]
    return next((f for p, f in _PREFIXES.items() if key.startswith(p)), None)


def policy_names() -> list[str]:
    """Every registered name (learned ones included) and prefix, for help texts and errors."""
    _load_plugins()
    return list(_NAMES) + [p + "..." for p in _PREFIXES]


def make_policy(name: str, seed: int = 0, n_pms: int | None = None) -> Policy:
    """A policy by name: a heuristic, a shipped learned model (e.g. ``spane``), or ``checkpoint:DIR``."""
    key = name.strip().lower()
    factory = _lookup(key)
    if factory is None:
        _load_plugins()
        factory = _lookup(key)
    if factory is None:
        raise UserError(f"unknown policy '{name}'; choose one of {', '.join(policy_names())} (checkpoint:DIR "
                        "for a trained run)")
    return factory(name.strip(), seed, n_pms)
