"""The input every placement policy sees: a batch of pending decisions. Its own module so that learned policies
(which need torch) and the heuristics (which must not) both depend on it without depending on each other."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgecloud.vmsched.cluster import ClusterConfig


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
