"""A trained Q-network as a placement policy: greedy, i.e. the argmax of the masked Q values."""

from __future__ import annotations

import numpy as np
import torch

from edgecloud.errors import UserError
from edgecloud.vmsched.decision import Decision
from edgecloud.vmsched.policies import BalanceFit


def to_tensors(d: Decision) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    pm, vm = d.features()
    return (torch.from_numpy(pm.astype(np.float32)), torch.from_numpy(vm.astype(np.float32)),
            torch.from_numpy(np.ascontiguousarray(d.mask)))


class QPolicy:
    """Vectorized greedy policy over any batch of decisions (ties go to the lowest action index)."""

    def __init__(self, net: torch.nn.Module, name: str) -> None:
        self.net, self.name = net.eval(), name

    def _check_n(self, d: Decision) -> None:
        n = d.free.shape[1]
        fixed = getattr(self.net, "fixed_n", None)
        if fixed is not None and n != fixed:
            raise UserError(f"policy '{self.name}' is a flat MLP trained for N={fixed} PMs but the cluster has "
                            f"N={n}; use --pms {fixed}, or a SPANE model (it works for any N)")

    def __call__(self, d: Decision) -> np.ndarray:
        self._check_n(d)
        with torch.no_grad():
            q = self.net(*to_tensors(d))
        return q.argmax(1).numpy()


class GuardedQPolicy(QPolicy):
    """The network's greedy action, unless it leads Balance-Fit's action by less than ``margin`` in Q: then
    Balance-Fit's. Why: the shipped SPANE-NUMA's choices sit on near-ties (docs/spane.md), so where the network is
    almost indifferent its argmax is noise, and a known-good heuristic is the safer default there. ``margin`` = 0 is
    the plain network (ties keep the network's action), a huge margin is Balance-Fit; the margin is chosen on
    validation splits only (bench/spane_guard.py)."""

    def __init__(self, net: torch.nn.Module, name: str, margin: float) -> None:
        if not margin >= 0:
            raise UserError(f"guard margin={margin!r} must be >= 0 (Q units; 0 = the plain network)")
        super().__init__(net, name)
        self.margin = float(margin)

    def __call__(self, d: Decision) -> np.ndarray:
        self._check_n(d)
        with torch.no_grad():
            q = self.net(*to_tensors(d)).numpy()
        own, bf = q.argmax(1), BalanceFit()(d)
        rows = np.arange(len(own))
        return np.where(q[rows, own] - q[rows, bf] < self.margin, bf, own)
