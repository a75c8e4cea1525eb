"""The DVAMP dynamics for one episode, step by step (the reference semantics; see docs/vmsched.md).

Strict FIFO with head-of-line blocking: only the next VM in trace order may be placed. After a placement at
clock t the clock advances for the next VM: release every VM ending at or before its arrival; if it fits, the
clock becomes max(t, arrival); otherwise jump to the earliest end time, release what ends then, and retry.
Invariant: when a VM is placed at clock t, every running VM ends after t.
"""

from __future__ import annotations

import heapq

import numpy as np

from edgecloud.errors import UserError
from edgecloud.vmsched.cluster import ClusterConfig, action_mask, apply_placement
from edgecloud.vmsched.policies import Decision, FirstFit, Policy
from edgecloud.vmsched.trace import Trace

PROBE_EXTRA = 40  # N_vm = P + 40


class Simulator:
    """One episode of the DVAMP queue on a cluster. Use :meth:`reset`, then :meth:`place` until :attr:`done`."""

    def __init__(self, trace: Trace, cluster: ClusterConfig) -> None:
        self.trace = trace
        self.cluster = cluster
        self.double = cluster.is_double(trace.mem)
        self.free = cluster.empty()
        self.running: list[tuple[float, int, int, int]] = []  # (end, row, action) heap
        self.clock = 0.0
        self.row = 0
        self.end_row = 0
        self.total_wait = 0.0

    # --- episode control -------------------------------------------------------------------------
    def reset(self, start: int, n_vm: int) -> None:
        check_episode(self.trace, start, n_vm)
        self.free = self.cluster.empty()
        self.running = []
        self.row = start
        self.end_row = start + n_vm
        self.clock = float(self.trace.at[start])
        self.total_wait = 0.0

    @property
    def done(self) -> bool:
        return self.row >= self.end_row

    def mask(self) -> np.ndarray:
        return self.mask_for(self.row)

    def mask_for(self, row: int) -> np.ndarray:
        t = self.trace
        return action_mask(self.free, t.cpu[row], t.mem[row], self.double[row])

    def decision(self) -> Decision:
        t, r = self.trace, self.row
        return Decision(
            self.free[None].copy(), t.cpu[r : r + 1], t.mem[r : r + 1], self.double[r : r + 1],
            self.mask()[None], self.cluster,
        )

    def place(self, action: int) -> float:
        """Place the head VM on ``action`` at the current clock, advance the clock, return the VM's wait."""
        if self.done:
            raise RuntimeError("episode is over; call reset()")
        action = int(action)
        if not 0 <= action < self.cluster.n_actions:
            raise ValueError(f"action {action} is outside [0, {self.cluster.n_actions})")
        mask = self.mask()
        if not mask[action]:
            raise ValueError(f"action {action} is not valid for VM row {self.row} (mask {mask.astype(int).tolist()})")
        t, r = self.trace, self.row
        apply_placement(self.free, action, t.cpu[r], t.mem[r], self.double[r])
        wait = self.clock - t.at[r]
        heapq.heappush(self.running, (self.clock + t.lt[r], r, action))
        self.total_wait += wait
        self.row += 1
        if not self.done:
            self._advance()
        return float(wait)

    # --- dynamics ----------------------------------------------------------------------------------
    def _release_until(self, time: float) -> None:
        t = self.trace
        while self.running and self.running[0][0] <= time:
            _, r, a = heapq.heappop(self.running)
            apply_placement(self.free, a, t.cpu[r], t.mem[r], self.double[r], sign=+1.0)

    def _advance(self) -> None:
        arrival = float(self.trace.at[self.row])
        self._release_until(arrival)
        if self.mask().any():
            self.clock = max(self.clock, arrival)
            return
        while True:
            if not self.running:  # cannot happen once the trace passed ClusterConfig.check_trace
                raise UserError(f"VM row {self.row} does not fit even on an empty cluster")
            self.clock = self.running[0][0]
            self._release_until(self.clock)
            if self.mask().any():
                return


def check_start(trace: Trace, start: int) -> None:
    if not 0 <= start < len(trace):
        raise UserError(f"start row {start} is outside the trace (0..{len(trace) - 1}); pick a start inside it")


def check_episode(trace: Trace, start: int, n_vm: int) -> None:
    check_start(trace, start)
    if n_vm < 1:
        raise UserError(f"episode length n_vm={n_vm}; it must be >= 1")
    if start + n_vm > len(trace):
        raise UserError(
            f"an episode of {n_vm} VMs from start row {start} runs past the end of the trace ({len(trace)} rows); "
            "pick an earlier start"
        )


def probe_length(trace: Trace, cluster: ClusterConfig, start: int) -> int:
    """P for start row s: First-Fit with full dynamics until, right after a placement and before any release,
    the next VM does not fit. Returns P (that placement included); the episode has P + 40 VMs."""
    check_start(trace, start)
    sim = Simulator(trace, cluster)
    sim.reset(start, len(trace) - start)
    ff = FirstFit()
    placed = 0
    while True:
        t, r = sim.trace, sim.row
        action = int(ff(sim.decision())[0])
        apply_placement(sim.free, action, t.cpu[r], t.mem[r], sim.double[r])
        heapq.heappush(sim.running, (sim.clock + t.lt[r], r, action))
        sim.row += 1
        placed += 1
        if sim.row >= len(trace):
            raise UserError(f"start row {start}: the probe ran to the end of the trace; pick an earlier start")
        if not sim.mask().any():
            return placed
        sim._advance()


def episode_length(trace: Trace, cluster: ClusterConfig, start: int) -> int:
    n = probe_length(trace, cluster, start) + PROBE_EXTRA
    check_episode(trace, start, n)
    return n


def run_episode(trace: Trace, cluster: ClusterConfig, policy: Policy, start: int, n_vm: int | None = None) -> float:
    """Total wait of one episode, stepping the reference simulator."""
    n_vm = episode_length(trace, cluster, start) if n_vm is None else n_vm
    sim = Simulator(trace, cluster)
    sim.reset(start, n_vm)
    while not sim.done:
        sim.place(int(policy(sim.decision())[0]))
    return sim.total_wait
