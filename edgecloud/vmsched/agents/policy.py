"""A trained Q-network as a placement policy: greedy, i.e. the argmax of the masked Q values."""

from __future__ import annotations

import numpy as np
import torch

from edgecloud.errors import UserError
from edgecloud.vmsched.decision import Decision


def to_tensors(d: Decision) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    pm, vm = d.features()
    return (torch.from_numpy(pm.astype(np.float32)), torch.from_numpy(vm.astype(np.float32)),
            torch.from_numpy(np.ascontiguousarray(d.mask)))


class QPolicy:
    """Vectorized greedy policy over any batch of decisions (ties go to the lowest action index)."""

    def __init__(self, net: torch.nn.Module, name: str) -> None:
        self.net, self.name = net.eval(), name

    def __call__(self, d: Decision) -> np.ndarray:
        n = d.free.shape[1]
        fixed = getattr(self.net, "fixed_n", None)
        if fixed is not None and n != fixed:
            raise UserError(f"policy '{self.name}' is a flat MLP trained for N={fixed} PMs but the cluster has "
                            f"N={n}; use --pms {fixed}, or a SPANE model (it works for any N)")
        with torch.no_grad():
            q = self.net(*to_tensors(d))
        return q.argmax(1).numpy()
