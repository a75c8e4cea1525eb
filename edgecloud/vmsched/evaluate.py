"""Scoring a policy on a split: episode lengths from the probe, batched episodes, and the summary metrics."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from functools import lru_cache
from pathlib import Path

import numpy as np

from edgecloud import atomic
from edgecloud.paths import cache_root
from edgecloud.results import code_key
from edgecloud.vmsched.cluster import ClusterConfig
from edgecloud.vmsched.fastsim import episode_lengths, evaluate_totals
from edgecloud.vmsched.policies import Policy
from edgecloud.vmsched.trace import Trace

TRIM = 0.10


def trimmed_mean(x, trim: float = TRIM) -> float:
    """Sort, drop floor(trim * n) values at each end, average the rest (SPANE's 10% trimmed mean)."""
    x = np.sort(np.asarray(x, dtype=np.float64))
    k = int(np.floor(trim * len(x)))
    return float(x[k : len(x) - k].mean()) if len(x) > 2 * k else float(x.mean())


def round2(x: float) -> float:
    """Round half up to 0.01, as the published tables do (52483.255 -> 52483.26; float round() gives .25)."""
    return float(Decimal(repr(float(x))).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))


def fmt2(x) -> str:
    return f"{round2(x):.2f}" if isinstance(x, float) else str(x)


def summarize(totals) -> dict[str, float]:
    t = np.asarray(totals, dtype=np.float64)
    return {
        "trimmed_mean": round(trimmed_mean(t), 4),
        "mean": round(float(t.mean()), 4),
        "p50": round(float(np.percentile(t, 50)), 4),
        "p90": round(float(np.percentile(t, 90)), 4),
        "p99": round(float(np.percentile(t, 99)), 4),
    }


@lru_cache(maxsize=1)
def probe_code_version() -> str:
    """A hash of the modules the probe runs (fastsim, simulator, cluster, trace, policies, decision)."""
    import hashlib

    from edgecloud.vmsched import cluster, decision, fastsim, policies, simulator, trace

    h = hashlib.sha256()
    for mod in (fastsim, simulator, cluster, trace, policies, decision):
        h.update(Path(mod.__file__).read_bytes())
    return h.hexdigest()[:16]


def cached_episode_lengths(trace: Trace, cluster: ClusterConfig, starts, use_cache: bool = True) -> np.ndarray:
    """Probe lengths N_vm, cached on disk under a key of (trace, cluster, starts) and the probe's code version
    (a hash of the sources it runs), so a change of code never serves lengths the old code computed."""
    starts = np.asarray(starts, dtype=np.int64).reshape(-1)
    if not use_cache:
        return episode_lengths(trace, cluster, starts)
    import hashlib

    key = code_key(trace.fingerprint(), cluster.n_pms, cluster.node_cpu, cluster.node_mem, cluster.double_threshold,
                   hashlib.sha256(starts.tobytes()).hexdigest(), version=probe_code_version())
    path = cache_root() / "vmsched-probe" / f"{key}.npy"
    if path.exists():
        try:
            n = np.load(path, allow_pickle=False)
            if n.shape == starts.shape:
                return n
        except (OSError, ValueError):
            pass  # a corrupt cache entry is recomputed
    n = episode_lengths(trace, cluster, starts)
    try:
        with atomic.atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, n)
    except OSError:
        pass  # caching is an optimisation; a read-only cache dir must not fail evaluation
    return n


@dataclass
class EvalResult:
    policy: str
    n_pms: int
    split: str
    totals: np.ndarray
    n_vms: np.ndarray

    def summary(self) -> dict:
        return {"policy": self.policy, "n_pms": self.n_pms, "split": self.split, "episodes": int(len(self.totals)),
                **summarize(self.totals)}


def evaluate(trace: Trace, cluster: ClusterConfig, policy: Policy, starts, split_name: str = "custom",
             use_cache: bool = True, progress=None) -> EvalResult:
    """Total wait of every episode of ``policy`` from ``starts`` (lengths by the probe): compiled episodes for the
    built-in heuristics, else the compiled step-by-step simulator (``fastsim.py``)."""
    cluster.check_trace(trace)
    starts = np.asarray(starts, dtype=np.int64).reshape(-1)
    n_vms = cached_episode_lengths(trace, cluster, starts, use_cache)
    totals = evaluate_totals(trace, cluster, policy, starts, n_vms, progress)
    return EvalResult(getattr(policy, "name", type(policy).__name__), cluster.n_pms, split_name, totals, n_vms)


def evaluate_policies(trace: Trace, cluster: ClusterConfig, names: list[str], starts, split_name: str,
                      seed: int = 0, show_progress: bool = True) -> list[dict]:
    """One summary row per policy name (``evaluate --json`` keys: policy, n_pms, split, episodes, trimmed_mean,
    mean, p50, p90, p99)."""
    from edgecloud.progress import progress_bar
    from edgecloud.vmsched.policies import make_policy

    rows = []
    for name in names:
        pol = make_policy(name, seed=seed, n_pms=cluster.n_pms)
        with progress_bar(f"{name} on {split_name}", enabled=show_progress) as bar:
            row = evaluate(trace, cluster, pol, starts, split_name=split_name, progress=bar).summary()
        rows.append(row | {"policy": name})
    return rows


def table_rows(rows: list[dict], columns: list[str]) -> list[dict]:
    """Rows with every float cell rounded half up to 0.01 as text, for :func:`edgecloud.results.markdown_table`
    (which would otherwise show 4 significant figures; our tables are compared with the published ones to 0.01)."""
    return [{c: "—" if r.get(c) is None else fmt2(r[c]) for c in columns} for r in rows]
