"""The DVAMP dynamics compiled (numba): each episode keeps its running VMs in a binary heap keyed by end time and
runs the reference loop of :class:`~edgecloud.vmsched.simulator.Simulator` (release up to the next arrival, then
jump end time by end time until the head VM fits) without Python in the way.

Two entry points, both equal to the reference per episode (tests check totals, waits and decisions):

- :func:`run_heuristic`: whole episodes of a built-in heuristic (First-Fit, Balance-Fit, Best-Fit, Worst-Fit)
  or the probe, one episode after the other inside one compiled call: no lockstep, no per-step Python. This is
  what ``evaluate`` and the probe use for those policies.
- :class:`FastSim`: the :class:`~edgecloud.vmsched.batched.BatchedSim` interface (``decision`` / ``step`` /
  ``reset_episodes``) for policies that need Python per step (a Q-network, a seeded random policy). One compiled
  call places a VM in every active episode and advances them; finished episodes drop out of the batch, so late
  steps cost only what is still running. Training (the vector env) runs on it.

All resource amounts in the trace are integers (double-NUMA halves too), so sums are exact in float64 and the
order of releases never changes a result.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from edgecloud.errors import UserError
from edgecloud.vmsched.batched import init_episodes, restart_episodes
from edgecloud.vmsched.cluster import ClusterConfig, vm_demand
from edgecloud.vmsched.decision import Decision
from edgecloud.vmsched.simulator import check_episode, check_start
from edgecloud.vmsched.trace import Trace

DOUBLE = 2  # heap node code for a VM holding both nodes of its PM
FIRST_FIT, BALANCE_FIT, BEST_FIT, WORST_FIT = 0, 1, 2, 3
KERNELS = {"first-fit": FIRST_FIT, "balance-fit": BALANCE_FIT, "best-fit": BEST_FIT, "worst-fit": WORST_FIT}
# error codes returned by the kernels (raised as Python errors by the callers)
OK, BAD_ACTION, NEVER_FITS, PROBE_END, HEAP_FULL = 0, 1, 2, 3, 4


# --- per-episode primitives ---------------------------------------------------------------------------------------
@njit(cache=True)
def _fits(free, b, need_cpu, need_mem, dbl) -> bool:
    for p in range(free.shape[1]):
        ok0 = free[b, p, 0, 0] >= need_cpu and free[b, p, 0, 1] >= need_mem
        ok1 = free[b, p, 1, 0] >= need_cpu and free[b, p, 1, 1] >= need_mem
        if dbl:
            if ok0 and ok1:
                return True
        elif ok0 or ok1:
            return True
    return False


@njit(cache=True)
def _mask_row(free, b, need_cpu, need_mem, dbl, out) -> None:
    """``out`` (2N,) bool: the valid actions for a VM (as ``cluster.action_mask``)."""
    for p in range(free.shape[1]):
        ok0 = free[b, p, 0, 0] >= need_cpu and free[b, p, 0, 1] >= need_mem
        ok1 = free[b, p, 1, 0] >= need_cpu and free[b, p, 1, 1] >= need_mem
        if dbl:
            ok0 = ok0 and ok1
            ok1 = ok0
        out[2 * p] = ok0
        out[2 * p + 1] = ok1


@njit(cache=True)
def _heap_push(h_end, h_pm, h_code, h_cpu, h_mem, h_n, b, end, pm, code, cpu, mem) -> None:
    i = h_n[b]
    h_n[b] = i + 1
    while i > 0:
        p = (i - 1) // 2
        if h_end[b, p] <= end:
            break
        h_end[b, i], h_pm[b, i], h_code[b, i] = h_end[b, p], h_pm[b, p], h_code[b, p]
        h_cpu[b, i], h_mem[b, i] = h_cpu[b, p], h_mem[b, p]
        i = p
    h_end[b, i], h_pm[b, i], h_code[b, i], h_cpu[b, i], h_mem[b, i] = end, pm, code, cpu, mem


@njit(cache=True)
def _release_until(free, h_end, h_pm, h_code, h_cpu, h_mem, h_n, b, time) -> None:
    """Pop every running VM of episode b that ends at or before ``time`` and give its resources back."""
    while h_n[b] > 0 and h_end[b, 0] <= time:
        pm, code, cpu, mem = h_pm[b, 0], h_code[b, 0], h_cpu[b, 0], h_mem[b, 0]
        for nd in range(2):
            if code == DOUBLE or code == nd:
                free[b, pm, nd, 0] += cpu
                free[b, pm, nd, 1] += mem
        n = h_n[b] - 1
        h_n[b] = n
        if n == 0:
            break
        end, lpm, lcode, lcpu, lmem = h_end[b, n], h_pm[b, n], h_code[b, n], h_cpu[b, n], h_mem[b, n]
        i = 0
        while True:
            c = 2 * i + 1
            if c >= n:
                break
            if c + 1 < n and h_end[b, c + 1] < h_end[b, c]:
                c += 1
            if h_end[b, c] >= end:
                break
            h_end[b, i], h_pm[b, i], h_code[b, i] = h_end[b, c], h_pm[b, c], h_code[b, c]
            h_cpu[b, i], h_mem[b, i] = h_cpu[b, c], h_mem[b, c]
            i = c
        h_end[b, i], h_pm[b, i], h_code[b, i], h_cpu[b, i], h_mem[b, i] = end, lpm, lcode, lcpu, lmem


@njit(cache=True)
def _place(b, action, free, h_end, h_pm, h_code, h_cpu, h_mem, h_n, row, clock, total, placed,
           at, lt, need_cpu, need_mem, dbl) -> float:
    """Place episode b's head VM on ``action`` at its clock; push it on the heap; return its wait."""
    r = row[b]
    pm, nd = action // 2, action % 2
    code = DOUBLE if dbl[r] else nd
    for k in range(2):
        if code == DOUBLE or code == k:
            free[b, pm, k, 0] -= need_cpu[r]
            free[b, pm, k, 1] -= need_mem[r]
    wait = clock[b] - at[r]
    total[b] += wait
    _heap_push(h_end, h_pm, h_code, h_cpu, h_mem, h_n, b, clock[b] + lt[r], pm, code, need_cpu[r], need_mem[r])
    row[b] = r + 1
    placed[b] += 1
    return wait


@njit(cache=True)
def _advance(b, free, h_end, h_pm, h_code, h_cpu, h_mem, h_n, row, clock, at, need_cpu, need_mem, dbl) -> int:
    """The clock for episode b's new head VM: release up to its arrival; while it does not fit, jump to the next
    end time and release. Returns NEVER_FITS if nothing is left to release and it still does not fit."""
    r = row[b]
    t = max(clock[b], at[r])
    _release_until(free, h_end, h_pm, h_code, h_cpu, h_mem, h_n, b, t)
    clock[b] = t
    while not _fits(free, b, need_cpu[r], need_mem[r], dbl[r]):
        if h_n[b] == 0:
            return NEVER_FITS
        t = h_end[b, 0]
        _release_until(free, h_end, h_pm, h_code, h_cpu, h_mem, h_n, b, t)
        clock[b] = t
    return OK


# --- heuristics, compiled ---------------------------------------------------------------------------------------
@njit(cache=True)
def _choose(kind, free, b, need_cpu, need_mem, dbl, cap_cpu, cap_mem, mask) -> int:
    """The action of heuristic ``kind`` for the head VM (``mask`` already holds its valid actions); the same
    arithmetic, in the same order, as the numpy policies in ``policies.py``."""
    n_act = mask.shape[0]
    first = 0
    while not mask[first]:
        first += 1
    if kind == FIRST_FIT:
        return first
    if kind == BALANCE_FIT:
        if dbl:
            return first
        best_pm, best = 0, -1.0
        for p in range(free.shape[1]):
            if mask[2 * p] or mask[2 * p + 1]:
                v0 = min(free[b, p, 0, 0] / cap_cpu, free[b, p, 0, 1] / cap_mem)
                v1 = min(free[b, p, 1, 0] / cap_cpu, free[b, p, 1, 1] / cap_mem)
                d = abs(v0 - v1)
            else:
                d = 0.0
            if d > best:
                best, best_pm = d, p
        if best == 0.0:
            return first
        v0 = min(free[b, best_pm, 0, 0] / cap_cpu, free[b, best_pm, 0, 1] / cap_mem)
        v1 = min(free[b, best_pm, 1, 0] / cap_cpu, free[b, best_pm, 1, 1] / cap_mem)
        nd = 1 if v1 > v0 else 0
        if not mask[2 * best_pm + nd]:
            nd = 1 - nd
        return 2 * best_pm + nd
    # best-fit / worst-fit: normalised cpu+mem left on the node(s) used
    pick, score = first, 0.0
    found = False
    for a in range(n_act):
        if not mask[a]:
            continue
        p, nd = a // 2, a % 2
        if dbl:
            s0 = (free[b, p, 0, 0] - need_cpu) / cap_cpu + (free[b, p, 0, 1] - need_mem) / cap_mem
            s1 = (free[b, p, 1, 0] - need_cpu) / cap_cpu + (free[b, p, 1, 1] - need_mem) / cap_mem
            s = s0 + s1
        else:
            s = (free[b, p, nd, 0] - need_cpu) / cap_cpu + (free[b, p, nd, 1] - need_mem) / cap_mem
        if not found or (kind == BEST_FIT and s < score) or (kind == WORST_FIT and s > score):
            pick, score, found = a, s, True
    return pick


@njit(cache=True)
def _run_heuristic(kind, probe, starts, n_vms, n_pms, cap_cpu, cap_mem, at, lt, need_cpu, need_mem, dbl,
                   slots, totals, placed_out, err):
    """Whole episodes, one after the other. probe: First-Fit until, right after a placement and before any
    release, the next VM does not fit (``placed_out`` = P). Returns per-episode totals in ``totals``."""
    free = np.empty((1, n_pms, 2, 2))
    h_end = np.empty((1, slots))
    h_pm = np.empty((1, slots), np.int64)
    h_code = np.empty((1, slots), np.int64)
    h_cpu = np.empty((1, slots))
    h_mem = np.empty((1, slots))
    h_n = np.zeros(1, np.int64)
    row = np.zeros(1, np.int64)
    clock = np.zeros(1)
    total = np.zeros(1)
    placed = np.zeros(1, np.int64)
    mask = np.empty(2 * n_pms, np.bool_)
    n_rows = at.shape[0]
    for e in range(starts.shape[0]):
        for p in range(n_pms):
            for k in range(2):
                free[0, p, k, 0] = cap_cpu
                free[0, p, k, 1] = cap_mem
        h_n[0] = 0
        row[0] = starts[e]
        clock[0] = at[starts[e]]
        total[0] = 0.0
        placed[0] = 0
        end_row = starts[e] + n_vms[e]
        while True:
            r = row[0]
            if h_n[0] >= slots:
                err[0], err[1] = HEAP_FULL, e
                return
            _mask_row(free, 0, need_cpu[r], need_mem[r], dbl[r], mask)
            a = _choose(kind, free, 0, need_cpu[r], need_mem[r], dbl[r], cap_cpu, cap_mem, mask)
            _place(0, a, free, h_end, h_pm, h_code, h_cpu, h_mem, h_n, row, clock, total, placed, at, lt,
                   need_cpu, need_mem, dbl)
            if probe:
                if row[0] >= n_rows:
                    err[0], err[1] = PROBE_END, e
                    return
                nr = row[0]
                if not _fits(free, 0, need_cpu[nr], need_mem[nr], dbl[nr]):
                    break
            elif row[0] >= end_row:
                break
            if _advance(0, free, h_end, h_pm, h_code, h_cpu, h_mem, h_n, row, clock, at, need_cpu, need_mem,
                        dbl) != OK:
                err[0], err[1] = NEVER_FITS, e
                return
        totals[e] = total[0]
        placed_out[e] = placed[0]


@njit(cache=True)
def _step(idx, actions, free, h_end, h_pm, h_code, h_cpu, h_mem, h_n, row, end_row, clock, total, placed,
          active, mask_cache, at, lt, need_cpu, need_mem, dbl, waits, err) -> None:
    """Place one VM in each episode of ``idx`` and advance it; refresh its mask; finished episodes go inactive."""
    n_act = mask_cache.shape[1]
    for i in range(idx.shape[0]):
        b, a = idx[i], actions[i]
        if a < 0 or a >= n_act or not mask_cache[b, a]:
            err[0], err[1] = BAD_ACTION, i
            return
    for i in range(idx.shape[0]):
        b = idx[i]
        waits[i] = _place(b, actions[i], free, h_end, h_pm, h_code, h_cpu, h_mem, h_n, row, clock, total, placed,
                          at, lt, need_cpu, need_mem, dbl)
        if row[b] >= end_row[b]:
            active[b] = False
            continue
        if _advance(b, free, h_end, h_pm, h_code, h_cpu, h_mem, h_n, row, clock, at, need_cpu, need_mem,
                    dbl) != OK:
            err[0], err[1] = NEVER_FITS, i
            return
        r = row[b]
        _mask_row(free, b, need_cpu[r], need_mem[r], dbl[r], mask_cache[b])


# --- Python side ------------------------------------------------------------------------------------------------
class TraceArrays:
    """The per-VM arrays the kernels read, computed once per (trace, cluster)."""

    def __init__(self, trace: Trace, cluster: ClusterConfig) -> None:
        self.dbl = np.ascontiguousarray(cluster.is_double(trace.mem))
        need_cpu, need_mem = vm_demand(trace.cpu, trace.mem, self.dbl)
        self.need_cpu, self.need_mem = np.ascontiguousarray(need_cpu), np.ascontiguousarray(need_mem)
        self.at = np.ascontiguousarray(trace.at, dtype=np.float64)
        self.lt = np.ascontiguousarray(trace.lt, dtype=np.float64)


# The last (trace, double threshold) and its arrays. The cache holds the trace itself and matches it by identity:
# keyed by ``id(trace)`` alone, a new trace allocated where a collected one lived got the old one's arrays.
_LAST: list = [None, None, None]


def trace_arrays(trace: Trace, cluster: ClusterConfig) -> TraceArrays:
    held, threshold, arrays = _LAST
    if held is not trace or threshold != cluster.double_threshold:
        arrays = TraceArrays(trace, cluster)
        _LAST[:] = [trace, cluster.double_threshold, arrays]
    return arrays


def _never_fits() -> UserError:
    return UserError("a VM does not fit even on an empty cluster; check the trace against the cluster")


def run_heuristic(trace: Trace, cluster: ClusterConfig, kind: int, starts, n_vms=None,
                  probe: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per-episode (total wait, VMs placed) of a compiled heuristic (``KERNELS``), or the probe (First-Fit)."""
    starts = np.ascontiguousarray(np.asarray(starts, dtype=np.int64).reshape(-1))
    if probe:
        for s in starts:
            check_start(trace, int(s))
        n_vms = len(trace) - starts
    else:
        n_vms = np.broadcast_to(np.asarray(n_vms, dtype=np.int64), starts.shape).copy()
        for s, n in zip(starts, n_vms):
            check_episode(trace, int(s), int(n))
    ta = trace_arrays(trace, cluster)
    slots = 1024
    while True:
        totals, placed = np.zeros(len(starts)), np.zeros(len(starts), np.int64)
        err = np.zeros(2, np.int64)
        _run_heuristic(FIRST_FIT if probe else kind, probe, starts, n_vms, cluster.n_pms, cluster.node_cpu,
                       cluster.node_mem, ta.at, ta.lt, ta.need_cpu, ta.need_mem, ta.dbl, slots, totals, placed, err)
        if err[0] == HEAP_FULL:
            slots *= 4
            continue
        if err[0] == PROBE_END:
            raise UserError(f"start row {starts[err[1]]}: the probe ran to the end of the trace; pick an earlier start")
        if err[0] == NEVER_FITS:
            raise _never_fits()
        return totals, placed


class FastSim:
    """B episodes driven step by step from Python (same interface as ``BatchedSim``), compiled dynamics."""

    def __init__(self, trace: Trace, cluster: ClusterConfig, starts, n_vms, slots: int = 256) -> None:
        self.trace, self.cluster, self.probe = trace, cluster, False
        starts = np.array(starts, dtype=np.int64).reshape(-1)
        B = len(starts)
        n_vms = np.broadcast_to(np.asarray(n_vms, dtype=np.int64), (B,)).copy()
        for s, n in zip(starts, n_vms):
            check_episode(trace, int(s), int(n))
        self.ta = trace_arrays(trace, cluster)
        self.double_all = self.ta.dbl
        init_episodes(self, starts, n_vms)
        self.h_end = np.full((B, slots), np.inf)
        self.h_pm = np.zeros((B, slots), np.int64)
        self.h_code = np.zeros((B, slots), np.int64)
        self.h_cpu = np.zeros((B, slots))
        self.h_mem = np.zeros((B, slots))
        self.h_n = np.zeros(B, np.int64)
        self.mask_cache = np.zeros((B, cluster.n_actions), dtype=bool)
        self._refresh_masks(np.arange(B))

    def _refresh_masks(self, idx: np.ndarray) -> None:
        from edgecloud.vmsched.cluster import action_mask

        if idx.size:
            r = self.row[idx]
            t = self.trace
            self.mask_cache[idx] = action_mask(self.free[idx], t.cpu[r], t.mem[r], self.double_all[r])

    def reset_episodes(self, idx, starts, n_vms) -> None:
        """Restart episodes ``idx`` from new start rows with an empty cluster (auto-reset collectors)."""
        idx = restart_episodes(self, idx, starts, n_vms)
        self.h_n[idx] = 0
        self._refresh_masks(idx)

    @property
    def done(self) -> bool:
        return not self.active.any()

    def decision(self) -> tuple[np.ndarray, Decision]:
        """The active episodes (indices) and their pending placements; every one has a valid action."""
        idx = np.flatnonzero(self.active)
        rows = self.row[idx]
        t = self.trace
        return idx, Decision(self.free[idx], t.cpu[rows], t.mem[rows], self.double_all[rows], self.mask_cache[idx],
                             self.cluster)

    def _grow(self) -> None:
        B, K = self.h_end.shape
        for name, fill in (("h_end", np.inf), ("h_pm", 0), ("h_code", 0), ("h_cpu", 0.0), ("h_mem", 0.0)):
            a = getattr(self, name)
            setattr(self, name, np.concatenate([a, np.full((B, K), fill, dtype=a.dtype)], axis=1))

    def step(self, idx: np.ndarray, actions: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """Place the head VM of episodes ``idx`` on ``actions``; advance; return their waits (seconds).
        ``mask`` is accepted for interface parity; validity is checked against the simulator's own masks."""
        idx = np.ascontiguousarray(idx, dtype=np.int64)
        actions = np.ascontiguousarray(np.asarray(actions, dtype=np.int64).reshape(-1))
        if actions.shape != idx.shape:
            raise ValueError("a policy chose an invalid action (outside [0, 2N) or masked out)")
        if idx.size and self.h_n[idx].max() >= self.h_end.shape[1]:
            self._grow()
        waits = np.zeros(len(idx))
        err = np.zeros(2, np.int64)
        ta = self.ta
        _step(idx, actions, self.free, self.h_end, self.h_pm, self.h_code, self.h_cpu, self.h_mem, self.h_n,
              self.row, self.end_row, self.clock, self.total, self.placed, self.active, self.mask_cache, ta.at,
              ta.lt, ta.need_cpu, ta.need_mem, ta.dbl, waits, err)
        if err[0] == BAD_ACTION:
            raise ValueError("a policy chose an invalid action (outside [0, 2N) or masked out)")
        if err[0] == NEVER_FITS:
            raise _never_fits()
        return waits


def run_steps(sim: FastSim, policy, progress=None) -> np.ndarray:
    """Drive every episode to its end with a vectorized policy; per-episode total waits."""
    goal = int(sim.n_vms.sum())
    step = 0
    while not sim.done:
        idx, d = sim.decision()
        sim.step(idx, policy(d))
        step += 1
        if progress is not None and step % 50 == 0:
            progress(int(sim.placed.sum()), goal)
    if progress is not None:
        progress(goal, goal)
    return sim.total.copy()


def kernel_of(policy) -> int | None:
    """The compiled heuristic equal to ``policy``, or None (then it runs step by step through :class:`FastSim`)."""
    from edgecloud.vmsched.policies import BalanceFit, BestFit, FirstFit, WorstFit

    return {FirstFit: FIRST_FIT, BalanceFit: BALANCE_FIT, BestFit: BEST_FIT, WorstFit: WORST_FIT}.get(type(policy))


def episode_lengths(trace: Trace, cluster: ClusterConfig, starts) -> np.ndarray:
    """N_vm = P + 40 for every start (the probe, compiled), checked against the trace end."""
    from edgecloud.vmsched.simulator import PROBE_EXTRA

    _, placed = run_heuristic(trace, cluster, FIRST_FIT, starts, probe=True)
    n = placed + PROBE_EXTRA
    for s, k in zip(np.asarray(starts).reshape(-1), n):
        check_episode(trace, int(s), int(k))
    return n


def evaluate_totals(trace: Trace, cluster: ClusterConfig, policy, starts, n_vms=None, progress=None) -> np.ndarray:
    """Per-episode total waits of ``policy``: whole compiled episodes for the built-in heuristics, else the
    step-by-step :class:`FastSim` with one vectorized policy call per step (episode lengths from the probe)."""
    starts = np.asarray(starts, dtype=np.int64).reshape(-1)
    if n_vms is None:
        n_vms = episode_lengths(trace, cluster, starts)
    kind = kernel_of(policy)
    if kind is not None:
        totals, _ = run_heuristic(trace, cluster, kind, starts, n_vms)
        if progress is not None:
            progress(int(np.sum(n_vms)), int(np.sum(n_vms)))
        return totals
    return run_steps(FastSim(trace, cluster, starts, n_vms), policy, progress)
