"""The worst-case bound for greedy online schedulers, as the issue states SPANE's theorem, and the adversarial
instances that stress it.

Stated bound: gap(greedy) <= (m - 1) / (2m - 1) * (mu - 1) * TR, where gap = W_greedy - W_opt (total waits).
Our definitions (the paper's proof was not available to us; see docs/vmsched_milp.md):

* m: number of PMs.
* mu: lifetime variability, l_max / l_min over the instance's VMs.
* TR: total resource-time in PM-seconds, sum_j rho_j * l_j with rho_j = max(cpu_j / (2 C), mem_j / (2 G)) the
  share of one PM (2 nodes of C cpu, G mem) that VM j holds.
* W_opt: the simulator-semantics optimum (milp mode ``sim``: the best any policy can do in the simulator).

Under these definitions the formula is *not* a valid bound in our model: it is 0 for m = 1 and for mu = 1, yet
First-Fit is strictly suboptimal on instances with one PM (:func:`counterexample_one_pm`) and with equal
lifetimes (:func:`counterexample_equal_lifetimes`); the tests pin both with the exact MILP. The adversarial
family (:func:`adversarial_trace`) makes every greedy that pairs a long and a short VM on each PM wait
(mu - 1) * t per double VM; at m = 2 with one double, gap / bound = 3 / (mu + 2) -> 1 as mu -> 1, so the
family attains the stated bound asymptotically (the bench and a test report 0.9967 at mu = 1.01).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgecloud.errors import UserError
from edgecloud.vmsched.cluster import ClusterConfig
from edgecloud.vmsched.trace import Trace


def greedy_bound(m: int, mu: float, tr: float) -> float:
    """(m - 1) / (2m - 1) * (mu - 1) * TR."""
    if m < 1:
        raise UserError(f"m (number of PMs) is {m}; it must be >= 1")
    if mu < 1:
        raise UserError(f"mu (l_max / l_min) is {mu}; it is >= 1 by definition")
    if tr < 0:
        raise UserError(f"TR (total resource-time) is {tr}; it must be >= 0")
    return (m - 1) / (2 * m - 1) * (mu - 1) * tr


@dataclass(frozen=True)
class BoundInputs:
    m: int
    mu: float
    tr: float

    @property
    def bound(self) -> float:
        return greedy_bound(self.m, self.mu, self.tr)


def bound_inputs(trace: Trace, cluster: ClusterConfig) -> BoundInputs:
    """m, mu and TR of all VMs in ``trace`` on ``cluster`` (definitions in the module docstring)."""
    lt = np.asarray(trace.lt, dtype=np.float64)
    share = np.maximum(trace.cpu / (2 * cluster.node_cpu), trace.mem / (2 * cluster.node_mem))
    return BoundInputs(cluster.n_pms, float(lt.max() / lt.min()), float((share * lt).sum()))


# --- instances -------------------------------------------------------------------------------------------
ADV_CLUSTER = dict(node_cpu=4.0, node_mem=8.0, double_threshold=10.0)  # a single fills a node, a double a PM


def _trace(cpu, mem, at, lt) -> Trace:
    n = len(cpu)
    f = np.asarray
    return Trace(np.arange(n), f(cpu, float), f(mem, float), f(at, float), f(lt, float), "synthetic")


def adversarial_trace(m: int, mu: float, t: int = 10, d: int | None = None,
                      n_double: int | None = None) -> tuple[Trace, ClusterConfig]:
    """The long/short family on m PMs whose nodes each hold exactly one single VM (4 cpu, 8 GB).

    At time 0, 2m single VMs arrive alternating long (lifetime mu*t) and short (t): First-Fit puts one long
    and one short on every PM. At time t, when the shorts end, ``n_double`` double VMs (lifetime d) arrive; each
    needs a whole PM, and under First-Fit every PM still holds a long VM until mu*t: the first m wait (mu - 1) t.
    An optimal schedule pairs the longs on ceil(m/2) PMs, so floor(m/2) PMs are free at time t. ``d`` defaults
    to t, so that l_min = t and the instance's mu is round(mu*t)/t; ``n_double`` defaults to m.

    Tightness: with m = 2 and one double, gap = (mu - 1) t while TR = (mu + 2) t, so gap / bound =
    3 / (mu + 2) -> 1 as mu -> 1 (t = 100, long VMs of 101 s: 0.9967). With m PMs and floor(m/2) doubles
    the limit is (2m - 1) / (3 (m - 1)) for even m (7/9 at m = 4)."""
    d = t if d is None else d
    n_double = m if n_double is None else n_double
    if m < 1 or mu < 1 or t < 1 or d < 1 or n_double < 0:
        raise UserError(f"adversarial family needs m >= 1, mu >= 1, t >= 1, d >= 1, n_double >= 0 "
                        f"(got {m}, {mu}, {t}, {d}, {n_double})")
    cpu, mem, at, lt = [], [], [], []
    long = int(round(mu * t))
    if long < t:
        raise UserError(f"adversarial family: mu * t = {mu * t:g} must be >= t = {t}")
    for _ in range(m):
        for life in (long, t):
            cpu.append(4), mem.append(8), at.append(0), lt.append(life)
    for _ in range(n_double):
        cpu.append(8), mem.append(16), at.append(t), lt.append(d)
    return _trace(cpu, mem, at, lt), ClusterConfig(n_pms=m, **ADV_CLUSTER)


def counterexample_one_pm() -> tuple[Trace, ClusterConfig]:
    """One PM (m = 1, so the stated bound is 0) on which First-Fit waits 3 s and the optimum 0 s.

    Nodes of 2 cpu. A and B (1 cpu each, lifetime 4) arrive at 1 and 2; First-Fit stacks both on node 0. The
    double C (1 cpu and 6 GB per node, arriving at 2) then finds node 0 full and waits for A to end at 5.
    Putting A and B on different nodes leaves 1 cpu on each: C starts at once."""
    return (_trace([1, 1, 2], [1, 1, 12], [1, 2, 2], [4, 4, 1]),
            ClusterConfig(n_pms=1, node_cpu=2, node_mem=10, double_threshold=10))


def counterexample_equal_lifetimes() -> tuple[Trace, ClusterConfig]:
    """Equal lifetimes (mu = 1, so the stated bound is 0) where First-Fit waits 1 s and the optimum 0 s.

    Unit nodes, all lifetimes 20. A, B, C (singles) at 0, 2, 4 take P0n0, P0n1, P1n0. At 21 A has ended and
    D arrives: First-Fit reuses P0n0, so when B ends at 22 no PM is empty and the double E (arriving 23) waits
    for C to end at 24. Putting D beside C on P1n1 leaves P0 empty at 22: E starts at 23."""
    return (_trace([4, 4, 4, 4, 8], [8, 8, 8, 8, 16], [0, 2, 4, 21, 23], [20] * 5),
            ClusterConfig(n_pms=2, **ADV_CLUSTER))
