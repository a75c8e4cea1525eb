"""DVAMP as a mixed-integer program (SPANE's offline and online DVAMP), solved with HiGHS.

Three models over the same variables (see docs/vmsched_milp.md for the exact math):

* ``mode="sim"``: FIFO start order *and* the simulator's clock rule (a VM starts at the first moment it fits
  on some action; no deliberate idling). Its feasible schedules are exactly those a policy can produce in
  :class:`~edgecloud.vmsched.simulator.Simulator`, so its optimum is the best any (clairvoyant) policy can do
  and a solution replayed in the simulator gives the same total wait (:func:`replay`).
* ``mode="fifo"``: FIFO start order, idling allowed. A relaxation of ``sim``.
* ``mode="relaxed"``: any start order (no FIFO), only arrivals and capacities. Its dual bound is a lower bound
  on the total wait of every schedule, the one reported as ``lower_bound``.

Time is continuous (integer seconds in the trace); the models are event based: one start-time variable per VM
and pairwise indicators saying whether VM i still runs when VM j starts, so capacity is checked at every start
(load on a node only grows at starts). Big-M constants come from an incumbent's total wait W (First-Fit /
Balance-Fit replayed): every schedule at least as good has s_j <= a_j + W.
"""

from __future__ import annotations

import copy
import heapq
import math
import os
import sys
import time
from dataclasses import dataclass, field

import highspy
import numpy as np

from edgecloud.errors import UserError
from edgecloud.vmsched.cluster import ClusterConfig, vm_demand
from edgecloud.vmsched.policies import BalanceFit, BestFit, Decision, FirstFit, Policy, RandomFit, WorstFit
from edgecloud.vmsched.simulator import Simulator, check_episode
from edgecloud.vmsched.trace import Trace

MODES = ("sim", "fifo", "relaxed")
_BANNER_SHOWN = False


def _new_highs() -> highspy.Highs:
    """A Highs instance. The first one of a process prints a copyright banner on stdout (from C++, before any
    option can be set); send it to /dev/null so that ``--json`` output stays one JSON object."""
    global _BANNER_SHOWN
    if _BANNER_SHOWN:
        return highspy.Highs()
    sys.stdout.flush()
    saved, null = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        h = highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(null)
    _BANNER_SHOWN = True
    return h


@dataclass(frozen=True)
class MilpConfig:
    """Solver settings. ``time_limit`` in seconds of wall time; ``mip_gap`` relative. Waits are integer seconds,
    so the solver also stops once incumbent - bound < 1 (then the incumbent is exactly optimal); with the
    default relative gap 0, status "optimal" means exactly optimal."""

    mode: str = "sim"
    time_limit: float = 10.0
    mip_gap: float = 0.0
    threads: int = 1
    seed: int = 0
    warm_start: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UserError(f"MILP mode '{self.mode}' is unknown; choose one of {', '.join(MODES)}")
        if not self.time_limit > 0:
            raise UserError(f"time limit (--time-limit) is {self.time_limit}; it must be > 0 seconds")
        if not 0 <= self.mip_gap < 1:
            raise UserError(f"MIP gap (--mip-gap) is {self.mip_gap}; it must be in [0, 1)")


@dataclass
class Schedule:
    """A placement of VMs 0..K-1 of an instance: action index (2*pm + node) and absolute start time each."""

    actions: np.ndarray
    starts: np.ndarray
    total_wait: float


@dataclass
class MilpResult:
    mode: str
    status: str  # optimal (within mip_gap) / feasible (stopped with an incumbent) / timeout (no solution)
    total_wait: float | None  # objective of the best schedule found
    dual_bound: float  # a valid lower bound on this model's optimum (0 when nothing better is known)
    gap: float | None  # (total_wait - dual_bound) / total_wait
    schedule: Schedule | None
    solve_time: float
    highs_status: str
    n_vars: int = 0
    n_rows: int = 0
    extra: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {"mode": self.mode, "status": self.status, "total_wait": self.total_wait,
                "dual_bound": self.dual_bound, "gap": self.gap, "solve_time": round(self.solve_time, 3),
                "highs_status": self.highs_status, "n_vars": self.n_vars, "n_rows": self.n_rows}


# --- instances ----------------------------------------------------------------------------------------------
@dataclass
class Instance:
    """K VMs in FIFO (trace) order on a cluster; times relative to t0 (the first arrival)."""

    arrival: np.ndarray  # (K,) relative to t0
    lifetime: np.ndarray
    dem: np.ndarray  # (K, 2): per-node (cpu, mem) demand
    double: np.ndarray  # (K,) bool
    cluster: ClusterConfig
    t0: float
    trace: Trace  # the K rows themselves (for replay)

    @property
    def k(self) -> int:
        return len(self.arrival)


def make_instance(trace: Trace, cluster: ClusterConfig, start: int, k: int) -> Instance:
    """The K VMs from trace row ``start``. Raises UserError for an episode outside the trace, a VM no node can
    hold, or non-integer times (the model's strict orderings assume integer seconds)."""
    check_episode(trace, start, k)
    sub = trace.slice(start, start + k)
    cluster.check_trace(sub)
    for name, arr in (("at", sub.at), ("lt", sub.lt)):
        if not np.all(arr == np.round(arr)):
            raise UserError(f"trace field '{name}' has non-integer seconds in rows {start}..{start + k - 1}; "
                            "the MILP needs integer times (round the trace)")
    double = cluster.is_double(sub.mem)
    cpu, mem = vm_demand(sub.cpu, sub.mem, double)
    t0 = float(sub.at[0])
    return Instance(sub.at - t0, sub.lt.astype(np.float64), np.stack([cpu, mem], 1), double, cluster, t0, sub)


def _granularity(inst: Instance) -> float:
    """Largest eta in {1, 1/2, ..., 1/1024} dividing every demand and capacity: 'load + dem > cap' is then
    'load + dem >= cap + eta' exactly."""
    vals = np.concatenate([inst.dem.ravel(), inst.cluster.capacity])
    for p in range(11):
        u = 2.0 ** -p
        if np.allclose(vals / u, np.round(vals / u), atol=1e-9, rtol=0):
            return u
    raise UserError("CPU/memory values are not multiples of 1/1024; the MILP needs them on that grid "
                    "(round --cpu/--mem and the trace)")


# --- simulator side: schedules of policies, and replay --------------------------------------------------------
def simulate(trace: Trace, cluster: ClusterConfig, start: int, k: int, policy: Policy) -> Schedule:
    """Run ``policy`` on rows start..start+k-1 with Simulator.reset(start, k) (no probe); record the schedule."""
    sim = Simulator(trace, cluster)
    sim.reset(start, k)
    acts, starts = np.zeros(k, np.int64), np.zeros(k)
    for j in range(k):
        a = int(policy(sim.decision())[0])
        acts[j], starts[j] = a, sim.clock
        sim.place(a)
    return Schedule(acts, starts, float(sim.total_wait))


class ReplayPolicy:
    """Plays a fixed list of actions in FIFO order (the k-th call places the k-th VM). Raises if an action is
    not valid when its turn comes: then the schedule is not one the simulator can produce."""

    name = "milp-replay"

    def __init__(self, actions) -> None:
        self.actions = [int(a) for a in actions]
        self.i = 0

    def __call__(self, d: Decision) -> np.ndarray:
        a = self.actions[self.i]
        if not d.mask[0, a]:
            raise ValueError(f"replay: action {a} for VM #{self.i} is not valid at the simulator's clock")
        self.i += 1
        return np.array([a])


def replay(trace: Trace, cluster: ClusterConfig, start: int, actions) -> Schedule:
    """Total wait of the simulator when it is fed ``actions`` in order."""
    return simulate(trace, cluster, start, len(actions), ReplayPolicy(actions))


# --- the model --------------------------------------------------------------------------------------------
class _Model:
    """Rows and columns collected in Python lists, handed to HiGHS in one passModel call."""

    def __init__(self) -> None:
        self.lb: list[float] = []
        self.ub: list[float] = []
        self.cost: list[float] = []
        self.integer: list[bool] = []
        self.rlo: list[float] = []
        self.rhi: list[float] = []
        self.rstart: list[int] = [0]
        self.ridx: list[int] = []
        self.rval: list[float] = []

    def var(self, lb: float, ub: float, cost: float = 0.0, integer: bool = False) -> int:
        self.lb.append(lb)
        self.ub.append(ub)
        self.cost.append(cost)
        self.integer.append(integer)
        return len(self.lb) - 1

    def binary(self) -> int:
        return self.var(0.0, 1.0, 0.0, True)

    def row(self, terms: list[tuple[int, float]], lo: float = -math.inf, hi: float = math.inf) -> None:
        for i, v in terms:
            self.ridx.append(i)
            self.rval.append(v)
        self.rstart.append(len(self.ridx))
        self.rlo.append(lo)
        self.rhi.append(hi)

    def to_highs(self, offset: float) -> highspy.HighsLp:
        lp = highspy.HighsLp()
        lp.num_col_, lp.num_row_ = len(self.lb), len(self.rlo)
        lp.col_cost_, lp.col_lower_, lp.col_upper_ = self.cost, self.lb, self.ub
        lp.row_lower_, lp.row_upper_ = self.rlo, self.rhi
        lp.offset_ = offset
        # rowwise -> colwise (HiGHS wants columns)
        idx, val = np.asarray(self.ridx, np.int64), np.asarray(self.rval, np.float64)
        rows = np.repeat(np.arange(len(self.rlo)), np.diff(np.asarray(self.rstart)))
        order = np.lexsort((rows, idx))
        counts = np.bincount(idx, minlength=len(self.lb))
        lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
        lp.a_matrix_.start_ = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
        lp.a_matrix_.index_ = rows[order].astype(np.int32)
        lp.a_matrix_.value_ = val[order]
        lp.integrality_ = [highspy.HighsVarType.kInteger if b else highspy.HighsVarType.kContinuous
                           for b in self.integer]
        return lp


class DvampModel:
    """Builds one DVAMP MILP over an :class:`Instance`.

    ``fixed_action[j] >= 0`` pins VM j's placement and ``fixed_start[j]`` (not NaN) its start time (relative);
    the online policy uses this for VMs already running and for the head VM whose start the clock fixed.
    Capacity is checked only at the starts of VMs whose placement is free (pinned VMs are history).
    """

    def __init__(self, inst: Instance, mode: str, w_ub: float, fixed_action=None, fixed_start=None,
                 tie_break: np.ndarray | None = None) -> None:
        self.inst, self.mode = inst, mode
        K, M = inst.k, inst.cluster.n_pms
        A, L, D = inst.arrival, inst.lifetime, inst.dem
        cap = inst.cluster.capacity
        self.fixed_action = np.full(K, -1) if fixed_action is None else np.asarray(fixed_action)
        self.fixed_start = np.full(K, np.nan) if fixed_start is None else np.asarray(fixed_start, float)
        self.eta = _granularity(inst)
        self.w_ub = float(w_ub)
        self.fractional_costs = tie_break is not None
        m = self.m = _Model()
        fifo = mode in ("fifo", "sim")
        hi = A + w_ub  # any schedule at least as good as the incumbent starts VM j by a_j + W
        for j in range(K):
            if not np.isnan(self.fixed_start[j]):
                hi[j] = self.fixed_start[j]
        self.hi = hi
        lo = np.where(np.isnan(self.fixed_start), A, self.fixed_start)
        free = self.fixed_action < 0
        cost = free.astype(float)  # objective: sum of waits of the VMs still to place
        self.s = [m.var(lo[j], hi[j], cost[j]) for j in range(K)]
        self.offset = -float((A * cost).sum())
        # placement options: a node q = 2p + n for a single VM, a PM p for a double VM (takes both its nodes)
        self.x: list[list[int]] = []
        for j in range(K):
            n_opt = M if inst.double[j] else 2 * M
            fa = self.fixed_action[j]
            opts = []
            for o in range(n_opt):
                act = 2 * o if inst.double[j] else o
                if fa >= 0:
                    want = (fa // 2 == o) if inst.double[j] else (fa == o)
                    v = m.var(float(want), float(want), 0.0, True)
                else:
                    tb = 0.0 if tie_break is None else float(tie_break[j]) * act
                    v = m.var(0.0, 1.0, tb, True)
                opts.append(v)
            self.x.append(opts)
            m.row([(v, 1.0) for v in opts], 1.0, 1.0)

        def X(i: int, q: int) -> list[tuple[int, float]]:  # is VM i on node q, as linear terms
            return [(self.x[i][q // 2], 1.0)] if inst.double[i] else [(self.x[i][q], 1.0)]

        # FIFO order, or pairwise order indicators p[i, j] (i < j): 1 -> (s_i, i) before (s_j, j)
        self.p: dict[tuple[int, int], int] = {}
        if fifo:
            for j in range(1, K):
                m.row([(self.s[j], 1.0), (self.s[j - 1], -1.0)], 0.0)
        else:
            for i in range(K):
                for j in range(i + 1, K):
                    if hi[i] <= lo[j]:
                        continue  # i always starts no later than j: p = 1 constant
                    v = self.p[i, j] = m.binary()
                    # p=1: s_j - s_i >= 0 ; p=0: s_i - s_j >= 1 (integer seconds; ties go to index order)
                    m.row([(self.s[j], 1.0), (self.s[i], -1.0), (v, -(hi[i] - lo[j]))], -(hi[i] - lo[j]))
                    m.row([(self.s[i], 1.0), (self.s[j], -1.0), (v, hi[j] - lo[i] + 1.0)], 1.0)

        # e[i, j]: VM i is counted at the start of VM j (started before it in the order and not yet ended)
        self.e: dict[tuple[int, int], int] = {}
        self.w: dict[tuple[int, int, int], int] = {}
        for j in range(K):
            if not free[j]:
                continue
            for i in range(K):
                if i == j or (fifo and i > j):
                    continue
                if not fifo and i > j and (j, i) not in self.p:
                    continue  # j always starts strictly before... or p fixed 1: i is after j, never counted
                reach = hi[i] + L[i] - lo[j]  # max of s_i + l_i - s_j
                if reach <= 0:
                    continue  # i always ended by s_j
                v = self.e[i, j] = m.binary()
                # s_j - s_i - l_i >= -reach * e_ij - reach * [i after j]
                terms = [(self.s[j], 1.0), (self.s[i], -1.0), (v, reach)]
                rhs = L[i]
                if not fifo:
                    if i < j and (i, j) in self.p:  # [i after j] = 1 - p_ij
                        terms.append((self.p[i, j], -reach))
                        rhs -= reach
                    elif i > j:  # [i after j] = p_ji
                        terms.append((self.p[j, i], reach))
                m.row(terms, rhs)
            # capacity at the start of j on every node it may use
            for q in range(2 * M):
                pairs = [i for i in range(K) if (i, j) in self.e]
                xj = X(j, q)
                for r in range(2):
                    worst = D[j, r] + sum(D[i, r] for i in pairs)
                    if worst <= cap[r] + 1e-9:
                        continue
                    terms = [(xv, D[j, r] * c) for xv, c in xj]
                    for i in pairs:
                        if D[i, r] <= 0:
                            continue
                        key = (i, j, q)
                        if key not in self.w:
                            wv = self.w[key] = m.var(0.0, 1.0)
                            # w >= X_iq + e_ij - 1
                            m.row([(wv, 1.0), (self.e[i, j], -1.0)] + [(xv, -c) for xv, c in X(i, q)], -1.0)
                        terms.append((self.w[key], D[i, r]))
                    m.row(terms, hi=cap[r])

        # the simulator's clock rule: VM j starts at max(s_{j-1}, a_j), or it did not fit anywhere just before s_j
        self.beta: dict[int, int] = {}
        self.alpha: dict[int, int] = {}
        self.g: dict[tuple[int, int], int] = {}
        self.v: dict[tuple[int, int, int], int] = {}
        self.o: dict[tuple[int, int, int], int] = {}
        if mode == "sim":
            for j in range(K):
                if not np.isnan(self.fixed_start[j]):
                    continue
                if j == 0:
                    m.row([(self.s[0], 1.0)], hi=lo[0])
                    continue
                b = self.beta[j] = m.binary()
                a = self.alpha[j] = m.binary()
                big = hi[j] - lo[j - 1]
                # not blocked: s_j <= s_{j-1} (alpha=0) or s_j <= a_j (alpha=1)
                m.row([(self.s[j], 1.0), (self.s[j - 1], -1.0), (a, -big), (b, -big)], hi=0.0)
                m.row([(self.s[j], 1.0), (a, big), (b, -big)], hi=A[j] + big)
                # blocked: for every option some node/resource is over capacity at s_j^- (VMs i < j with
                # s_i + l_i >= s_j still hold their resources just before s_j)
                preds = []
                for i in range(j):
                    if hi[i] + L[i] < lo[j]:
                        continue
                    gv = self.g[i, j] = m.binary()
                    big_g = hi[j] - lo[i] - L[i]
                    if big_g > 0:  # g=1 -> s_i + l_i - s_j >= 0
                        m.row([(self.s[i], 1.0), (self.s[j], -1.0), (gv, -big_g)], -L[i] - big_g)
                    preds.append(i)
                for q in range(2 * M):
                    for r in range(2):
                        if D[j, r] + sum(D[i, r] for i in preds) < cap[r] + self.eta - 1e-9:
                            continue
                        ov = self.o[j, q, r] = m.binary()
                        terms = [(ov, -(cap[r] + self.eta))]
                        for i in preds:
                            key = (i, j, q)
                            if key not in self.v:
                                vv = self.v[key] = m.var(0.0, 1.0)
                                m.row([(vv, 1.0), (self.g[i, j], -1.0)], hi=0.0)
                                m.row([(vv, 1.0)] + [(xv, -c) for xv, c in X(i, q)], hi=0.0)
                            terms.append((self.v[key], D[i, r]))
                        m.row(terms, lo=-D[j, r])
                groups = ([[2 * p, 2 * p + 1] for p in range(M)] if inst.double[j] else [[q] for q in range(2 * M)])
                for nodes in groups:
                    terms = [(self.o[j, q, r], 1.0) for q in nodes for r in range(2) if (j, q, r) in self.o]
                    m.row(terms + [(b, -1.0)], lo=0.0)

    # --- a known schedule as a full MIP start ---------------------------------------------------------------
    def solution_of(self, sched: Schedule) -> list[float]:
        inst = self.inst
        K, L, D, cap = inst.k, inst.lifetime, inst.dem, inst.cluster.capacity
        s = np.asarray(sched.starts, float) - inst.t0
        act = np.asarray(sched.actions)
        val = [0.0] * len(self.m.lb)
        for j in range(K):
            val[self.s[j]] = s[j]
            o = act[j] // 2 if inst.double[j] else act[j]
            val[self.x[j][o]] = 1.0

        def on(i: int, q: int) -> float:
            return float(act[i] // 2 == q // 2) if inst.double[i] else float(act[i] == q)

        key = {i: (s[i], i) for i in range(K)}
        for (i, j), v in self.p.items():
            val[v] = float(key[i] < key[j])
        for (i, j), v in self.e.items():
            val[v] = float(key[i] < key[j] and s[i] + L[i] > s[j])
        for (i, j, q), v in self.w.items():
            val[v] = max(0.0, on(i, q) + val[self.e[i, j]] - 1.0)
        for (i, j), v in self.g.items():
            val[v] = float(s[i] + L[i] >= s[j])
        for (i, j, q), v in self.v.items():
            val[v] = min(on(i, q), val[self.g[i, j]])
        for j, b in self.beta.items():
            tau = max(s[j - 1], inst.arrival[j])
            blocked = s[j] > tau + 1e-9
            val[b] = float(blocked)
            val[self.alpha[j]] = float((not blocked) and s[j] <= inst.arrival[j] + 1e-9)
        for (j, q, r), v in self.o.items():
            if val[self.beta[j]]:
                load = sum(D[i, r] * val[self.v[i, jj, qq]] for (i, jj, qq) in self.v if jj == j and qq == q)
                val[v] = float(load + D[j, r] >= cap[r] + self.eta - 1e-9)
        return val

    # --- solve ------------------------------------------------------------------------------------------
    def solve(self, cfg: MilpConfig, starts: list[Schedule] = ()) -> MilpResult:
        h = _new_highs()
        h.setOptionValue("output_flag", False)
        h.setOptionValue("time_limit", float(cfg.time_limit))
        h.setOptionValue("mip_rel_gap", float(cfg.mip_gap))
        if not self.fractional_costs:  # integer optimum: a gap below 1 s proves the incumbent optimal
            h.setOptionValue("mip_abs_gap", 1.0 - 1e-6)
        h.setOptionValue("threads", int(cfg.threads))
        h.setOptionValue("random_seed", int(cfg.seed))
        h.setOptionValue("mip_feasibility_tolerance", 1e-9)
        h.passModel(self.m.to_highs(self.offset))
        best = None
        for sch in starts if cfg.warm_start else ():
            if best is None or sch.total_wait < best.total_wait:
                best = sch
        if best is not None:
            sol = highspy.HighsSolution()
            sol.col_value = self.solution_of(best)
            sol.value_valid = True
            h.setSolution(sol)
        t0 = time.perf_counter()
        h.run()
        elapsed = time.perf_counter() - t0
        ms = h.getModelStatus()
        info = h.getInfo()
        has_sol = info.primal_solution_status == 2  # kSolutionStatusFeasible
        dual = float(info.mip_dual_bound) if math.isfinite(info.mip_dual_bound) else 0.0
        total = float(info.objective_function_value) if has_sol else None
        if ms == highspy.HighsModelStatus.kOptimal:
            status = "optimal"
        elif ms == highspy.HighsModelStatus.kInfeasible:
            status = "infeasible"
        else:
            status = "feasible" if has_sol else "timeout"
        sched = None
        if has_sol:
            col = np.asarray(h.getSolution().col_value)
            acts = np.zeros(self.inst.k, np.int64)
            for j in range(self.inst.k):
                o = int(np.argmax([col[v] for v in self.x[j]]))
                acts[j] = 2 * o if self.inst.double[j] else o
            st = np.array([col[v] for v in self.s]) + self.inst.t0
            sched = Schedule(acts, st, total)
        if not self.fractional_costs:  # the optimum is an integer number of seconds: round the bound up
            dual = float(math.ceil(dual - 1e-6))
            if total is not None:
                dual = min(dual, total)
        gap = None if total is None else (0.0 if total <= 1e-9 else max(0.0, (total - dual) / total))
        return MilpResult(self.mode, status, total, max(dual, 0.0), gap, sched, elapsed,
                          h.modelStatusToString(ms), len(self.m.lb), len(self.m.rlo))


def incumbent_pool(trace: Trace, cluster: ClusterConfig, start: int, k: int, n_random: int = 32,
                   seed: int = 0) -> list[Schedule]:
    """Simulator schedules of every heuristic plus ``n_random`` seeded random-fit rollouts: cheap MIP starts.
    The best of them bounds the big-M constants, so a better pool also tightens the model."""
    pols: list[Policy] = [FirstFit(), BalanceFit(), BestFit(), WorstFit()]
    pols += [RandomFit(seed * 7919 + i) for i in range(n_random)]
    return [simulate(trace, cluster, start, k, p) for p in pols]


def solve_offline(trace: Trace, cluster: ClusterConfig, start: int, k: int, cfg: MilpConfig = MilpConfig(),
                  incumbents: list[Schedule] | None = None) -> MilpResult:
    """Offline DVAMP on the K VMs from ``start``: all arrivals and lifetimes known. Warm-started (and its big-M
    constants bounded) by heuristic schedules (:func:`incumbent_pool`), so it never returns worse than them.
    In ``sim`` mode the returned schedule is replayed in the simulator and its total must match."""
    inst = make_instance(trace, cluster, start, k)
    if incumbents is None:
        incumbents = incumbent_pool(trace, cluster, start, k, seed=cfg.seed)
    w_ub = min(s.total_wait for s in incumbents)
    model = DvampModel(inst, cfg.mode, w_ub)
    res = model.solve(cfg, incumbents)
    if cfg.mode == "sim" and res.schedule is not None:
        rep = replay(trace, cluster, start, res.schedule.actions)
        res.extra["replay_total_wait"] = rep.total_wait
        res.extra["milp_starts"] = res.schedule.starts
        res.extra["milp_total_wait"] = res.total_wait
        if abs(rep.total_wait - res.total_wait) > 0.5:
            raise RuntimeError(f"MILP total {res.total_wait} != simulator replay {rep.total_wait}")
        res.total_wait = rep.total_wait  # exact integer seconds
        res.schedule = rep
    return res


# --- online DVAMP -------------------------------------------------------------------------------------------
def _online_decision(sim: Simulator, lookahead: int, cfg: MilpConfig) -> int:
    """At the simulator's current decision: the VMs running now (pinned), the head (its start pinned to the
    clock) and the VMs that have already arrived (at most ``lookahead`` in all): solve the sim-mode MILP, play
    the head's action. No future arrival is used. Ties go to the lowest action (First-Fit)."""
    tr, r = sim.trace, sim.row
    mask = sim.mask()
    queued = [r]
    while len(queued) < lookahead and queued[-1] + 1 < sim.end_row and tr.at[queued[-1] + 1] <= sim.clock:
        queued.append(queued[-1] + 1)
    if len(queued) == 1 or mask.sum() == 1:
        return int(np.argmax(mask))  # nothing else is known: every valid action gives the same known waits
    running = sorted(sim.running, key=lambda e: (e[0] - tr.lt[e[1]], e[1]))  # by start, then row
    rows = [e[1] for e in running] + queued
    sub = Trace(tr.vmid[rows], tr.cpu[rows], tr.mem[rows], tr.at[rows], tr.lt[rows], tr.source)
    cluster = sim.cluster
    double = cluster.is_double(sub.mem)
    cpu, mem = vm_demand(sub.cpu, sub.mem, double)
    t0 = float(min(sub.at.min(), sim.clock))
    starts_abs = np.array([e[0] - tr.lt[e[1]] for e in running] + [sim.clock] + [np.nan] * (len(queued) - 1))
    # FIFO order in the model is the order of `rows`; running VMs started before the clock, so it holds
    inst = Instance(sub.at - t0, sub.lt.astype(float), np.stack([cpu, mem], 1), double, cluster, t0, sub)
    nf = len(running)
    fixed_action = np.array([e[2] for e in running] + [-1] * len(queued))
    fixed_start = starts_abs - t0
    # incumbent: First-Fit from the current state on the known queue
    ff_sim = copy.copy(sim)
    ff_sim.free, ff_sim.running = sim.free.copy(), list(sim.running)
    heapq.heapify(ff_sim.running)
    ff_sim.end_row = queued[-1] + 1
    acts, sts = [], []
    while not ff_sim.done:
        a = int(np.argmax(ff_sim.mask()))
        acts.append(a)
        sts.append(ff_sim.clock)
        ff_sim.place(a)
    inc = Schedule(np.array(fixed_action[:nf].tolist() + acts), np.concatenate([starts_abs[:nf], sts]), 0.0)
    inc.total_wait = float(sum(s - tr.at[q] for s, q in zip(sts, queued)))
    w_ub = inc.total_wait + 1.0
    tie = np.zeros(len(rows))
    tie[nf] = 0.5 / (2 * cluster.n_pms)  # < 1 s in all: never trades a second of wait for a lower index
    model = DvampModel(inst, "sim", w_ub, fixed_action, fixed_start, tie_break=tie)
    res = model.solve(cfg, [inc])
    if res.schedule is None:
        return acts[0]
    a = int(res.schedule.actions[nf])
    return a if mask[a] else acts[0]


def run_online_milp(trace: Trace, cluster: ClusterConfig, start: int, k: int, lookahead: int = 8,
                    time_limit: float = 1.0) -> float:
    """Online DVAMP as a policy in the scalar simulator: total wait of the K VMs from ``start``.

    Needs the simulator's queue and clock, so it drives a :class:`Simulator` itself instead of being a
    stateless :class:`~edgecloud.vmsched.policies.Policy`."""
    check_episode(trace, start, k)
    cluster.check_trace(trace.slice(start, start + k))
    cfg = MilpConfig(mode="sim", time_limit=time_limit)
    sim = Simulator(trace, cluster)
    sim.reset(start, k)
    while not sim.done:
        sim.place(_online_decision(sim, lookahead, cfg))
    return float(sim.total_wait)


def compare_offline(trace: Trace, cluster: ClusterConfig, start: int, k: int, cfg: MilpConfig = MilpConfig(),
                    lower_bound: bool = True) -> dict:
    """One JSON-able row: the simulator-semantics optimum (``total_wait``, ``status``, ``gap``), the relaxed
    model's dual bound (``lower_bound``, valid for every schedule; 0 when not solved) and the FF/BF totals, all
    on the K VMs from ``start`` run with Simulator.reset(start, K)."""
    make_instance(trace, cluster, start, k)  # validates before any solve
    pool = incumbent_pool(trace, cluster, start, k, seed=cfg.seed)
    ff, bf = pool[0], pool[1]  # First-Fit, Balance-Fit
    sim = solve_offline(trace, cluster, start, k, cfg, pool)
    out = {"start": start, "vms": k, "pms": cluster.n_pms, "cpu": cluster.node_cpu, "mem": cluster.node_mem,
           "status": sim.status, "total_wait": sim.total_wait, "gap": sim.gap,
           "sim_dual_bound": round(sim.dual_bound, 3),
           "solve_time": round(sim.solve_time, 3), "time_limit": cfg.time_limit,
           "first_fit_total_wait": ff.total_wait, "balance_fit_total_wait": bf.total_wait,
           "best_heuristic_total_wait": min(p.total_wait for p in pool),
           "lower_bound": 0.0, "relaxed_status": "not-run", "relaxed_total_wait": None, "relaxed_solve_time": 0.0}
    if lower_bound:
        rel = solve_offline(trace, cluster, start, k, MilpConfig(**{**cfg.__dict__, "mode": "relaxed"}), pool)
        lb = rel.dual_bound
        # waits are integer seconds and a left-justified optimum has integer starts: round the bound up
        out.update(lower_bound=float(max(0.0, math.ceil(lb - 1e-3))) if lb is not None else 0.0,
                   relaxed_status=rel.status, relaxed_total_wait=rel.total_wait,
                   relaxed_solve_time=round(rel.solve_time, 3))
    out["lower_bound"] = min(out["lower_bound"], sim.total_wait) if sim.total_wait is not None else out["lower_bound"]
    return out
