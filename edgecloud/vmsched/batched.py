"""B episodes of the DVAMP queue in lockstep over arrays, for fast evaluation and experience collection.

State: remaining capacity ``free`` (B, N, 2, 2) and a pool of running-VM slots per episode (end time, PM,
node, per-node demand), shape (B, K), K grown on demand. Each :meth:`BatchedSim.step` places one VM in every
active episode, then advances each clock exactly as :class:`~edgecloud.vmsched.simulator.Simulator` does
(release up to the next arrival, then jump to successive end times until the head VM fits); the jumps run
only over the episodes that need them. The per-episode totals equal the scalar simulator's (tested).
"""

from __future__ import annotations

import numpy as np

from edgecloud.errors import UserError
from edgecloud.vmsched.cluster import ClusterConfig, action_mask, vm_demand
from edgecloud.vmsched.policies import Decision, FirstFit, Policy
from edgecloud.vmsched.simulator import PROBE_EXTRA, check_episode, check_start
from edgecloud.vmsched.trace import Trace

DOUBLE = 2  # slot node code for a VM that holds both nodes of its PM


def init_episodes(sim, starts: np.ndarray, n_vms: np.ndarray) -> None:
    """The per-episode state every lockstep simulator keeps: rows, clocks, totals, active flags, free capacity."""
    B = len(starts)
    sim.starts, sim.n_vms = starts, n_vms
    sim.row = starts.copy()
    sim.end_row = starts + n_vms
    sim.clock = sim.trace.at[starts].astype(np.float64)
    sim.total = np.zeros(B)
    sim.placed = np.zeros(B, dtype=np.int64)
    sim.active = n_vms > 0
    sim.free = sim.cluster.empty((B,))


def restart_episodes(sim, idx, starts, n_vms) -> np.ndarray:
    """Reset episodes ``idx`` of ``sim`` to new (checked) start rows with an empty cluster; returns ``idx``."""
    idx = np.asarray(idx, dtype=np.int64)
    starts = np.asarray(starts, dtype=np.int64).reshape(-1)
    n_vms = np.broadcast_to(np.asarray(n_vms, dtype=np.int64), starts.shape)
    for s, n in zip(starts, n_vms):
        check_episode(sim.trace, int(s), int(n))
    sim.starts[idx], sim.n_vms[idx] = starts, n_vms
    sim.row[idx], sim.end_row[idx] = starts, starts + n_vms
    sim.clock[idx] = sim.trace.at[starts]
    sim.total[idx] = 0.0
    sim.placed[idx] = 0
    sim.active[idx] = n_vms > 0
    sim.free[idx] = sim.cluster.capacity
    return idx


class BatchedSim:
    """Lockstep episodes. ``starts`` and ``n_vms`` are (B,) arrays; ``probe=True`` runs the probe instead
    (First-Fit until, right after a placement, the next VM does not fit; ``placed`` is then P)."""

    def __init__(self, trace: Trace, cluster: ClusterConfig, starts, n_vms=None, probe: bool = False,
                 slots: int = 64) -> None:
        self.trace, self.cluster, self.probe = trace, cluster, probe
        starts = np.array(starts, dtype=np.int64).reshape(-1)  # a copy: reset_episodes writes into it
        B = len(starts)
        if n_vms is None:
            if not probe:
                raise ValueError("n_vms is required unless probe=True")
            n_vms = np.full(B, len(trace) - starts)
        n_vms = np.broadcast_to(np.asarray(n_vms, dtype=np.int64), (B,)).copy()
        if not probe:
            for s, n in zip(starts, n_vms):
                check_episode(trace, int(s), int(n))
        else:
            for s in starts:
                check_start(trace, int(s))
        self.double_all = cluster.is_double(trace.mem)
        self.need_cpu_all, self.need_mem_all = vm_demand(trace.cpu, trace.mem, self.double_all)
        init_episodes(self, starts, n_vms)
        self.ends = np.full((B, slots), np.inf)
        self.s_pm = np.zeros((B, slots), dtype=np.int64)
        self.s_node = np.zeros((B, slots), dtype=np.int8)
        self.s_cpu = np.zeros((B, slots))
        self.s_mem = np.zeros((B, slots))
        self.next_end = np.full(B, np.inf)  # min of each row of ``ends``: skips rows with nothing to release
        # free slots as a stack per episode: stack[b, :n_free[b]] are the unused slot numbers
        self.stack = np.broadcast_to(np.arange(slots)[::-1], (B, slots)).copy()
        self.n_free = np.full(B, slots, dtype=np.int64)
        self.mask_cache = np.zeros((B, cluster.n_actions), dtype=bool)  # head VM's mask, valid where mask_ok
        self.mask_ok = np.zeros(B, dtype=bool)

    def reset_episodes(self, idx, starts, n_vms) -> None:
        """Restart episodes ``idx`` from new start rows with an empty cluster (for auto-reset collectors)."""
        idx = restart_episodes(self, idx, starts, n_vms)
        K = self.ends.shape[1]
        self.ends[idx] = np.inf
        self.next_end[idx] = np.inf
        self.stack[idx] = np.arange(K)[::-1]
        self.n_free[idx] = K
        self.mask_ok[idx] = False

    # --- queries ------------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return not self.active.any()

    def _masks(self, idx: np.ndarray, rows: np.ndarray) -> np.ndarray:
        t = self.trace
        return action_mask(self.free[idx], t.cpu[rows], t.mem[rows], self.double_all[rows])

    def decision(self) -> tuple[np.ndarray, Decision]:
        """The active episodes (indices) and their pending placements; every one has a valid action."""
        idx = np.flatnonzero(self.active)
        rows = self.row[idx]
        t = self.trace
        stale = idx[~self.mask_ok[idx]]
        if stale.size:
            self.mask_cache[stale] = self._masks(stale, self.row[stale])
            self.mask_ok[stale] = True
        d = Decision(self.free[idx], t.cpu[rows], t.mem[rows], self.double_all[rows], self.mask_cache[idx],
                     self.cluster)
        return idx, d

    # --- dynamics -----------------------------------------------------------------------------------
    def _release(self, idx: np.ndarray, until: np.ndarray) -> None:
        some = self.next_end[idx] <= until
        idx, until = idx[some], until[some]
        if idx.size == 0:
            return
        e = self.ends[idx]
        r, c = np.nonzero(e <= until[:, None])
        b = idx[r]
        ix, val = self._flat_usage(b, self.s_pm[b, c], self.s_node[b, c], self.s_cpu[b, c], self.s_mem[b, c])
        np.add.at(self.free.reshape(-1), ix, val)
        self.ends[b, c] = np.inf
        first = np.searchsorted(r, r)  # r is sorted: rank of each freed slot within its episode
        pos = self.n_free[b] + np.arange(r.size) - first
        self.stack[b, pos] = c
        self.n_free[idx] += np.bincount(r, minlength=idx.size)
        e[r, c] = np.inf
        self.next_end[idx] = e.min(axis=1)

    def _flat_usage(self, b, pm, node, cpu, mem) -> tuple[np.ndarray, np.ndarray]:
        """Flat indices into ``free`` and the amounts a VM holds there: cpu and mem on its node, or on both
        nodes of its PM for a double VM (node code DOUBLE)."""
        base = (b * self.cluster.n_pms + pm) * 4
        dbl = node == DOUBLE
        n0 = np.where(dbl, 0, node) * 2 + base
        ix = [n0, n0 + 1, base[dbl] + 2, base[dbl] + 3]
        val = [cpu, mem, cpu[dbl], mem[dbl]]
        return np.concatenate(ix), np.concatenate(val)

    def _grow(self) -> None:
        B, K = self.ends.shape
        self.ends = np.concatenate([self.ends, np.full((B, K), np.inf)], axis=1)
        new = np.arange(2 * K - 1, K - 1, -1)
        stack = np.zeros((B, 2 * K), dtype=np.int64)
        stack[:, :K] = new  # the new slots go to the bottom of every stack, the old free ones on top
        cols = np.arange(K)
        take = cols[None, :] < self.n_free[:, None]
        stack[:, K:][take] = self.stack[take]
        self.stack = stack
        self.n_free = self.n_free + K
        for name in ("s_pm", "s_node", "s_cpu", "s_mem"):
            a = getattr(self, name)
            setattr(self, name, np.concatenate([a, np.zeros_like(a)], axis=1))

    def step(self, idx: np.ndarray, actions: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """Place the head VM of episodes ``idx`` on ``actions``; advance; return their waits (seconds)."""
        actions = np.asarray(actions, dtype=np.int64)
        rows = self.row[idx]
        if mask is None:
            mask = self._masks(idx, rows)
        if actions.shape != idx.shape or (actions < 0).any() or (actions >= self.cluster.n_actions).any() \
                or not mask[np.arange(len(idx)), actions].all():
            raise ValueError("a policy chose an invalid action (outside [0, 2N) or masked out)")
        t = self.trace
        pm, node = actions // 2, actions % 2
        dbl = self.double_all[rows]
        ncpu, nmem = self.need_cpu_all[rows], self.need_mem_all[rows]
        code = np.where(dbl, DOUBLE, node).astype(np.int8)
        ix, val = self._flat_usage(idx, pm, code, ncpu, nmem)
        self.free.reshape(-1)[ix] -= val  # no repeated index: one VM per episode
        self.mask_ok[idx] = False
        waits = self.clock[idx] - t.at[rows]
        self.total[idx] += waits
        # a slot for each new running VM
        if (self.n_free[idx] == 0).any():
            self._grow()
        self.n_free[idx] -= 1
        slot = self.stack[idx, self.n_free[idx]]
        end = self.clock[idx] + t.lt[rows]
        self.ends[idx, slot] = end
        self.next_end[idx] = np.minimum(self.next_end[idx], end)
        self.s_pm[idx, slot] = pm
        self.s_node[idx, slot] = code
        self.s_cpu[idx, slot] = ncpu
        self.s_mem[idx, slot] = nmem
        self.row[idx] += 1
        self.placed[idx] += 1
        finished = self.row[idx] >= self.end_row[idx]
        if self.probe:
            if finished.any():
                raise UserError(
                    f"start row {self.starts[idx[finished][0]]}: the probe ran to the end of the trace; "
                    "pick an earlier start"
                )
            nxt = self.row[idx]
            stop = ~self._masks(idx, nxt).any(axis=1)  # checked before any release: the probe's rule
            finished = finished | stop
        self.active[idx[finished]] = False
        self._advance(idx[~finished])
        return waits

    def _advance(self, idx: np.ndarray) -> None:
        if idx.size == 0:
            return
        arrival = self.trace.at[self.row[idx]]
        until = np.maximum(self.clock[idx], arrival)
        self._release(idx, until)
        self.clock[idx] = until
        m = self._masks(idx, self.row[idx])
        self.mask_cache[idx] = m
        fits = m.any(axis=1)
        self.mask_ok[idx] = fits  # blocked heads get a new mask after their jump
        blocked = idx[~fits]
        for lo in range(0, blocked.size, 128):  # chunks bound the (j, K, N, 2, 2) prefix tensor
            self._jump(blocked[lo : lo + 128], depth=16)

    def _jump(self, idx: np.ndarray, depth: int | None) -> None:
        """For blocked episodes: the earliest end time after whose releases the head VM fits, in one pass.

        Equal to jumping end time by end time (the spec's loop): running VMs sorted by end give prefix sums of
        released capacity; the first prefix on which the head fits names the time to jump to, and releasing
        part of a group of equal end times already fits only if the whole group does.
        """
        e = self.ends[idx]
        k = int(np.isfinite(e).sum(axis=1).max())
        if k == 0:
            raise UserError("a VM does not fit even on an empty cluster; check the trace against the cluster")
        if depth is not None and depth < k:
            k = depth  # most heads fit after a few releases: try the first few, then all for the rest
            part = np.argpartition(e, k - 1, axis=1)[:, :k]
            order = np.take_along_axis(part, np.argsort(np.take_along_axis(e, part, axis=1), axis=1), axis=1)
        else:
            depth = None
            order = np.argsort(e, axis=1)[:, :k]
        es = np.take_along_axis(e, order, axis=1)
        j = idx.size
        pm = np.take_along_axis(self.s_pm[idx], order, axis=1)
        node = np.take_along_axis(self.s_node[idx], order, axis=1)
        cpu = np.take_along_axis(self.s_cpu[idx], order, axis=1)
        mem = np.take_along_axis(self.s_mem[idx], order, axis=1)
        live = np.isfinite(es)
        delta = np.zeros((j, k) + self.free.shape[1:])
        r, c = np.nonzero(live)
        for nd in (0, 1):
            touch = (node[r, c] == nd) | (node[r, c] == DOUBLE)
            rr, cc = r[touch], c[touch]
            delta[rr, cc, pm[rr, cc], nd, 0] = cpu[rr, cc]
            delta[rr, cc, pm[rr, cc], nd, 1] = mem[rr, cc]
        cum = self.free[idx][:, None] + np.cumsum(delta, axis=1)
        rows = self.row[idx]
        t = self.trace
        fits = action_mask(cum, t.cpu[rows][:, None], t.mem[rows][:, None], self.double_all[rows][:, None]).any(-1)
        fits &= live
        ok = fits.any(axis=1)
        if depth is None and not ok.all():
            raise UserError("a VM does not fit even on an empty cluster; check the trace against the cluster")
        when = es[np.arange(j), np.argmax(fits, axis=1)]
        self.clock[idx[ok]] = when[ok]
        self._release(idx[ok], when[ok])
        if not ok.all():
            self._jump(idx[~ok], None)


def run_policy(sim: BatchedSim, policy: Policy, progress=None) -> np.ndarray:
    """Drive every episode to its end with a vectorized policy; return the per-episode total waits.
    ``progress(done, total)`` is called now and then with placements done and to do (for a progress bar)."""
    goal = int(sim.n_vms.sum()) if not sim.probe else None
    step = 0
    while not sim.done:
        idx, d = sim.decision()
        sim.step(idx, policy(d), d.mask)
        step += 1
        if progress is not None and goal and step % 50 == 0:
            progress(int(sim.placed.sum()), goal)
    if progress is not None and goal:
        progress(goal, goal)
    return sim.total.copy()


def probe_lengths(trace: Trace, cluster: ClusterConfig, starts) -> np.ndarray:
    """P for every start (see :func:`edgecloud.vmsched.simulator.probe_length`), batched."""
    sim = BatchedSim(trace, cluster, starts, probe=True)
    run_policy(sim, FirstFit())
    return sim.placed.copy()


def episode_lengths(trace: Trace, cluster: ClusterConfig, starts) -> np.ndarray:
    """N_vm = P + 40 for every start, checked against the trace end."""
    n = probe_lengths(trace, cluster, starts) + PROBE_EXTRA
    for s, k in zip(np.asarray(starts).reshape(-1), n):
        check_episode(trace, int(s), int(k))
    return n


def evaluate_totals(trace: Trace, cluster: ClusterConfig, policy: Policy, starts, n_vms=None) -> np.ndarray:
    """Per-episode total waits of ``policy`` on the given starts (episode lengths from the probe if not given)."""
    starts = np.asarray(starts, dtype=np.int64).reshape(-1)
    if n_vms is None:
        n_vms = episode_lengths(trace, cluster, starts)
    return run_policy(BatchedSim(trace, cluster, starts, n_vms), policy)
