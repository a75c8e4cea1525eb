"""Scoring a policy on a split: episode lengths from the probe, batched episodes, and the summary metrics."""

from __future__ import annotations

import json
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import numpy as np

from edgecloud import atomic
from edgecloud.paths import cache_root
from edgecloud.vmsched.batched import BatchedSim, episode_lengths, run_policy
from edgecloud.vmsched.cluster import ClusterConfig
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


def cached_episode_lengths(trace: Trace, cluster: ClusterConfig, starts, use_cache: bool = True) -> np.ndarray:
    """Probe lengths N_vm, cached on disk by (trace, cluster, starts) since they never change."""
    starts = np.asarray(starts, dtype=np.int64).reshape(-1)
    if not use_cache:
        return episode_lengths(trace, cluster, starts)
    import hashlib

    key = hashlib.sha256(
        json.dumps([trace.fingerprint(), cluster.n_pms, cluster.node_cpu, cluster.node_mem,
                    cluster.double_threshold]).encode() + starts.tobytes()
    ).hexdigest()[:24]
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
    """Total wait of every episode of ``policy`` from ``starts`` (lengths by the probe), batched."""
    cluster.check_trace(trace)
    starts = np.asarray(starts, dtype=np.int64).reshape(-1)
    n_vms = cached_episode_lengths(trace, cluster, starts, use_cache)
    totals = run_policy(BatchedSim(trace, cluster, starts, n_vms), policy, progress)
    return EvalResult(getattr(policy, "name", type(policy).__name__), cluster.n_pms, split_name, totals, n_vms)


def write_table(path: Path, rows: list[dict], columns: list[str]) -> None:
    """Write rows as CSV (path.csv) and markdown (path.md), atomically."""
    path = Path(path)
    csv_lines = [",".join(columns)] + [",".join(str(r[c]) for c in columns) for r in rows]
    atomic.write_text(path.with_suffix(".csv"), "\n".join(csv_lines) + "\n")
    md = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    md += ["| " + " | ".join(fmt2(r[c]) for c in columns) + " |"
           for r in rows]
    atomic.write_text(path.with_suffix(".md"), "\n".join(md) + "\n")
