"""The multi-NUMA cluster model: N PMs x 2 NUMA nodes x (cpu, mem), and which placements are valid.

State is the *remaining* capacity, an array of shape (..., N, 2, 2): [pm, node, (cpu, mem)]. Every function
here is vectorized over any leading batch shape so that the scalar env and the batched evaluator share it.
An action a in [0, 2N) means PM a // 2, node a % 2. A double-NUMA VM (mem > threshold) takes half of its
cpu and mem from both nodes of one PM; then both actions of that PM are valid and mean the same placement.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgecloud.errors import UserError


@dataclass(frozen=True)
class ClusterConfig:
    n_pms: int = 5
    node_cpu: float = 40.0
    node_mem: float = 90.0
    double_threshold: float = 10.0  # a VM is double-NUMA when mem > this (strictly)

    def __post_init__(self) -> None:
        if int(self.n_pms) != self.n_pms or self.n_pms < 1:
            raise UserError(f"n_pms (--pms) is {self.n_pms}; it must be an integer >= 1")
        for name, flag in (("node_cpu", "--cpu"), ("node_mem", "--mem"), ("double_threshold", "--double-threshold")):
            if not np.isfinite(getattr(self, name)):
                raise UserError(f"{name} ({flag}) is {getattr(self, name)}; give a finite number")
        if self.double_threshold < 0:
            raise UserError(f"double_threshold (--double-threshold) is {self.double_threshold}; give a memory >= 0")
        if self.node_cpu <= 0 or self.node_mem <= 0:
            raise UserError(f"node capacities must be > 0 (got cpu={self.node_cpu}, mem={self.node_mem})")

    @property
    def n_actions(self) -> int:
        return 2 * self.n_pms

    @property
    def capacity(self) -> np.ndarray:
        return np.array([self.node_cpu, self.node_mem], dtype=np.float64)

    def empty(self, batch: tuple[int, ...] = ()) -> np.ndarray:
        """Remaining capacity of an empty cluster, shape batch + (N, 2, 2)."""
        return np.broadcast_to(self.capacity, batch + (self.n_pms, 2, 2)).copy()

    def is_double(self, mem) -> np.ndarray:
        return np.asarray(mem) > self.double_threshold

    def check_trace(self, trace) -> None:
        """Raise if some VM could never be placed on an empty PM of this cluster (it would block forever)."""
        double = self.is_double(trace.mem)
        need_cpu = np.where(double, trace.cpu / 2, trace.cpu)
        need_mem = np.where(double, trace.mem / 2, trace.mem)
        bad = np.flatnonzero((need_cpu > self.node_cpu) | (need_mem > self.node_mem))
        if bad.size:
            i = bad[0]
            kind = "double-NUMA (half on each node)" if double[i] else "single-NUMA"
            raise UserError(
                f"VM {int(trace.vmid[i])} (row {i}) needs cpu={trace.cpu[i]:g}, mem={trace.mem[i]:g} as a {kind} VM, "
                f"but a NUMA node holds only cpu={self.node_cpu:g}, mem={self.node_mem:g}; no PM can ever hold it. "
                "Raise --cpu/--mem or drop the VM from the trace"
            )


def vm_demand(cpu, mem, double) -> tuple[np.ndarray, np.ndarray]:
    """Per-node demand: the whole request for a single VM, half of it on each node for a double VM."""
    cpu = np.asarray(cpu, dtype=np.float64)
    mem = np.asarray(mem, dtype=np.float64)
    return np.where(double, cpu / 2, cpu), np.where(double, mem / 2, mem)


def action_mask(free: np.ndarray, cpu, mem, double) -> np.ndarray:
    """Valid actions, shape batch + (2N,). ``free`` is batch + (N, 2, 2); cpu/mem/double are batch-shaped."""
    need_cpu, need_mem = vm_demand(cpu, mem, double)
    node_ok = (free[..., 0] >= need_cpu[..., None, None]) & (free[..., 1] >= need_mem[..., None, None])
    pm_ok = node_ok.all(axis=-1, keepdims=True)  # both nodes, for a double VM
    ok = np.where(np.asarray(double)[..., None, None], np.broadcast_to(pm_ok, node_ok.shape), node_ok)
    return ok.reshape(ok.shape[:-2] + (-1,))


def apply_placement(free: np.ndarray, action, cpu, mem, double, sign: float = -1.0) -> None:
    """Take (sign=-1) or give back (sign=+1) a VM's resources in place. Batched over the leading axis
    when ``free`` is (B, N, 2, 2) and the rest are (B,) arrays; scalar when ``free`` is (N, 2, 2)."""
    need_cpu, need_mem = vm_demand(cpu, mem, double)
    action = np.asarray(action)
    pm, node = action // 2, action % 2
    if free.ndim == 3:
        if double:
            free[pm, :, 0] += sign * need_cpu
            free[pm, :, 1] += sign * need_mem
        else:
            free[pm, node, 0] += sign * need_cpu
            free[pm, node, 1] += sign * need_mem
        return
    b = np.arange(free.shape[0])
    double = np.asarray(double, dtype=bool)
    for nd in (0, 1):  # a double VM touches both nodes; a single VM only its own
        touch = double | (node == nd)
        free[b[touch], pm[touch], nd, 0] += sign * need_cpu[touch]
        free[b[touch], pm[touch], nd, 1] += sign * need_mem[touch]
