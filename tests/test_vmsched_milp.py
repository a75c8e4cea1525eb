"""DVAMP MILP: the simulator-semantics model equals exhaustive search over simulator choices, a MILP solution
replays exactly, bounds are ordered, bad input fails before solving, and the stated greedy bound is checked."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgecloud.errors import UserError
from edgecloud.vmsched.bound import (
    adversarial_trace,
    bound_inputs,
    counterexample_equal_lifetimes,
    counterexample_one_pm,
    greedy_bound,
)
from edgecloud.vmsched.cluster import ClusterConfig
from edgecloud.vmsched.milp import (
    MilpConfig,
    compare_offline,
    replay,
    run_online_milp,
    simulate,
    solve_offline,
)
from edgecloud.vmsched.policies import BalanceFit, FirstFit
from edgecloud.vmsched.simulator import Simulator
from edgecloud.vmsched.trace import Trace

SMALL = ClusterConfig(n_pms=2, node_cpu=10, node_mem=20, double_threshold=10)


def make_trace(cpu, mem, at, lt) -> Trace:
    f = np.asarray
    return Trace(np.arange(len(cpu)), f(cpu, float), f(mem, float), f(at, float), f(lt, float))


def exhaustive(trace: Trace, cluster: ClusterConfig, k: int) -> float:
    """The best total wait over every sequence of valid simulator actions (depth-first, tiny K only)."""
    best = np.inf

    def rec(sim: Simulator) -> None:
        nonlocal best
        if sim.done:
            best = min(best, sim.total_wait)
            return
        for a in np.flatnonzero(sim.mask()):
            child = Simulator(sim.trace, sim.cluster)
            child.free, child.running = sim.free.copy(), list(sim.running)
            child.clock, child.row, child.end_row, child.total_wait = sim.clock, sim.row, sim.end_row, sim.total_wait
            child.place(int(a))
            rec(child)

    root = Simulator(trace, cluster)
    root.reset(0, k)
    rec(root)
    return float(best)


vm = st.tuples(st.sampled_from([1, 2, 4, 8]), st.sampled_from([1, 2, 4, 8, 16, 24]), st.integers(0, 2),
               st.integers(1, 20))


@settings(max_examples=15, deadline=None)
@given(vms=st.lists(vm, min_size=3, max_size=6), n_pms=st.integers(1, 2))
def test_sim_model_is_exact_and_bounds_are_ordered(vms, n_pms):
    cpu, mem, gaps, lt = map(np.array, zip(*vms))
    tr = make_trace(cpu, mem, np.cumsum(gaps), lt)
    c = ClusterConfig(n_pms=n_pms, node_cpu=10, node_mem=20, double_threshold=10)
    k = len(tr)
    cfg = MilpConfig(time_limit=5)
    sim = solve_offline(tr, c, 0, k, cfg)
    fifo = solve_offline(tr, c, 0, k, MilpConfig(mode="fifo", time_limit=5))
    rel = solve_offline(tr, c, 0, k, MilpConfig(mode="relaxed", time_limit=5))
    assert sim.status == fifo.status == rel.status == "optimal"
    assert sim.total_wait == exhaustive(tr, c, k)  # the model's schedules are exactly the simulator's
    assert sim.extra["milp_total_wait"] == pytest.approx(sim.total_wait, abs=1e-6)
    ff = simulate(tr, c, 0, k, FirstFit()).total_wait
    bf = simulate(tr, c, 0, k, BalanceFit()).total_wait
    assert rel.dual_bound <= rel.total_wait + 1e-6 <= fifo.total_wait + 2e-6 <= sim.total_wait + 3e-6
    assert sim.total_wait <= min(ff, bf)


def test_milp_solution_replays_exactly_on_the_real_trace(trace):
    """Trace rows 12867.. on 2 PMs of (16 cpu, 32 GB): the MILP's starts are the simulator's clock."""
    c = ClusterConfig(n_pms=2, node_cpu=16, node_mem=32)
    res = solve_offline(trace, c, 12867, 20, MilpConfig(time_limit=10))
    assert res.status in ("optimal", "feasible")
    rep = replay(trace, c, 12867, res.schedule.actions)
    assert rep.total_wait == res.total_wait == pytest.approx(res.extra["milp_total_wait"], abs=1e-6)
    np.testing.assert_allclose(rep.starts, res.extra["milp_starts"], atol=1e-6)
    assert res.total_wait <= min(simulate(trace, c, 12867, 20, p).total_wait for p in (FirstFit(), BalanceFit()))


def test_optimum_beats_both_heuristics_on_a_real_slice(trace):
    """Rows 46107.. (40 VMs, 2 PMs of 24 cpu / 48 GB): FF waits 11426 s, BF 9658 s, the optimum 0 s."""
    out = compare_offline(trace, ClusterConfig(n_pms=2, node_cpu=24, node_mem=48), 46107, 40,
                          MilpConfig(time_limit=20))
    assert (out["first_fit_total_wait"], out["balance_fit_total_wait"]) == (11426.0, 9658.0)
    assert out["status"] == "optimal" and out["total_wait"] == 0.0
    assert 0.0 <= out["lower_bound"] <= out["total_wait"]


def test_time_limit_returns_best_found_with_gap(trace):
    """A 40-VM instance HiGHS cannot close in 1 s: it stops, keeps the warm start (never worse), reports a gap."""
    c = ClusterConfig(n_pms=2, node_cpu=16, node_mem=32)
    res = solve_offline(trace, c, 99614, 40, MilpConfig(time_limit=1.0))
    assert res.status == "feasible" and res.solve_time < 5
    assert res.total_wait <= 36575.0  # First-Fit's total on this slice
    assert 0 < res.gap <= 1 and res.dual_bound < res.total_wait


def test_bad_input_fails_before_solving(trace):
    tiny = ClusterConfig(n_pms=2, node_cpu=2, node_mem=4)
    with pytest.raises(UserError, match="no PM can ever hold it"):
        solve_offline(trace, tiny, 0, 10)
    with pytest.raises(UserError, match="n_vm=0"):
        solve_offline(trace, SMALL, 0, 0)
    with pytest.raises(UserError, match="outside the trace"):
        solve_offline(trace, SMALL, len(trace), 5)
    with pytest.raises(UserError, match="past the end"):
        solve_offline(trace, SMALL, len(trace) - 3, 5)
    with pytest.raises(UserError, match="time limit"):
        MilpConfig(time_limit=0)
    with pytest.raises(UserError, match="non-integer"):
        solve_offline(make_trace([1, 1], [1, 1], [0, 0.5], [1, 1]), SMALL, 0, 2)


def test_cli_optimal_json_and_bad_input(trace):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "edgecloud.cli", "vmsched", "optimal", *args],
                              capture_output=True, text=True, timeout=120)

    r = run("--start", "12867", "--vms", "12", "--pms", "2", "--cpu", "16", "--mem", "32", "--time-limit", "5",
            "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)  # exactly one JSON object on stdout (the HiGHS banner is silenced)
    for key in ("status", "total_wait", "lower_bound", "first_fit_total_wait", "balance_fit_total_wait", "gap"):
        assert key in out
    assert out["status"] == "optimal"
    assert out["lower_bound"] <= out["total_wait"] <= min(out["first_fit_total_wait"], out["balance_fit_total_wait"])
    bad = run("--start", "0", "--vms", "5", "--pms", "2", "--cpu", "2", "--mem", "4", "--json")
    assert bad.returncode == 2 and "no PM can ever hold it" in bad.stderr and "Traceback" not in bad.stderr
    bad = run("--start", "0", "--vms", "0", "--json")
    assert bad.returncode == 2 and "--vms" in bad.stderr


def test_online_milp_is_a_valid_policy_between_optimum_and_first_fit_here():
    """The online MILP only sees arrived VMs; on this queue-heavy instance it drives the simulator (whose place()
    refuses any invalid action, so finishing is validity) to a schedule between the offline optimum and First-Fit:
    here it reaches the optimum, 22 s, where First-Fit waits 30 s (integer waits, exact)."""
    tr = make_trace([4, 4, 8, 2, 8, 4, 2], [4, 4, 16, 2, 16, 8, 2], [0, 0, 0, 0, 1, 1, 2], [10, 3, 5, 7, 4, 6, 2])
    c = ClusterConfig(n_pms=1, node_cpu=8, node_mem=16, double_threshold=10)
    opt = solve_offline(tr, c, 0, len(tr), MilpConfig(time_limit=5)).total_wait
    online = run_online_milp(tr, c, 0, len(tr), time_limit=2)
    ff = simulate(tr, c, 0, len(tr), FirstFit()).total_wait
    assert opt <= online <= ff
    assert (opt, online, ff) == (22.0, 22.0, 30.0)


# --- the stated greedy bound ---------------------------------------------------------------------------------
def test_greedy_bound_formula_and_inputs():
    assert greedy_bound(2, 3.0, 30.0) == pytest.approx(1 / 3 * 2 * 30)
    assert greedy_bound(1, 50.0, 1e6) == 0.0
    with pytest.raises(UserError):
        greedy_bound(0, 2, 1)
    tr, c = adversarial_trace(2, 4, t=10)
    b = bound_inputs(tr, c)
    assert (b.m, b.mu, b.tr) == (2, 4.0, 2 * (40 / 2 + 10 / 2 + 10))
    with pytest.raises(UserError, match="mu >= 1"):
        adversarial_trace(2, 0.5)


@pytest.mark.parametrize("make", [counterexample_one_pm, counterexample_equal_lifetimes])
def test_stated_bound_fails_in_the_simulator_model(make):
    """m = 1 or mu = 1 makes the stated bound 0, yet First-Fit is strictly worse than the exact optimum."""
    tr, c = make()
    b = bound_inputs(tr, c)
    assert b.bound == 0.0
    ff = simulate(tr, c, 0, len(tr), FirstFit()).total_wait
    opt = solve_offline(tr, c, 0, len(tr), MilpConfig(time_limit=5))
    assert opt.status == "optimal" and ff - opt.total_wait > b.bound


@settings(max_examples=8, deadline=None)
@given(m=st.integers(1, 3), mu=st.integers(1, 6), t=st.integers(2, 20), nd=st.integers(1, 3))
def test_adversarial_family_first_fit_gap_within_stated_bound(m, mu, t, nd):
    """On the long/short family First-Fit waits (mu - 1) t per double (the first m of them) and stays within
    the stated bound."""
    tr, c = adversarial_trace(m, mu, t, n_double=nd)
    ff = simulate(tr, c, 0, len(tr), FirstFit()).total_wait
    if nd <= m:
        assert ff == nd * (mu - 1) * t
    opt = solve_offline(tr, c, 0, len(tr), MilpConfig(time_limit=10))
    assert opt.status == "optimal"
    assert ff - opt.total_wait <= bound_inputs(tr, c).bound + 1e-9


def test_adversarial_family_attains_the_stated_bound_at_two_pms():
    """m = 2, one double, long VMs of 101 s and short ones of 100 s: gap 1 s, bound 1.0033 s (ratio 3/(mu+2))."""
    tr, c = adversarial_trace(2, 1.01, t=100, n_double=1)
    ff = simulate(tr, c, 0, len(tr), FirstFit()).total_wait
    opt = solve_offline(tr, c, 0, len(tr), MilpConfig(time_limit=10))
    b = bound_inputs(tr, c)
    assert (ff, opt.total_wait, opt.status) == (1.0, 0.0, "optimal")
    assert (ff - opt.total_wait) / b.bound == pytest.approx(3 / (1.01 + 2))


@settings(max_examples=25, deadline=None)
@given(vms=st.lists(vm, min_size=2, max_size=12), n_pms=st.integers(1, 3), mode=st.sampled_from(["sim", "fifo",
                                                                                                  "relaxed"]))
def test_every_heuristic_schedule_is_a_feasible_point_of_every_model(vms, n_pms, mode):
    """The MIP start built from a simulator schedule satisfies every row and bound, with objective = its wait
    (so the models contain the simulator's schedules, and warm starts are never silently rejected)."""
    from edgecloud.vmsched.milp import DvampModel, incumbent_pool, make_instance

    cpu, mem, gaps, lt = map(np.array, zip(*vms))
    tr = make_trace(cpu, mem, np.cumsum(gaps), lt)
    c = ClusterConfig(n_pms=n_pms, node_cpu=10, node_mem=20, double_threshold=10)
    pool = incumbent_pool(tr, c, 0, len(tr), n_random=4)
    model = DvampModel(make_instance(tr, c, 0, len(tr)), mode, max(p.total_wait for p in pool))
    m = model.m
    for sched in pool:
        x = np.asarray(model.solution_of(sched))
        assert np.all(x >= np.asarray(m.lb) - 1e-9) and np.all(x <= np.asarray(m.ub) + 1e-9)
        act = np.add.reduceat(np.asarray(m.rval) * x[np.asarray(m.ridx)], np.asarray(m.rstart[:-1])) \
            if m.ridx else np.zeros(0)
        empty = np.diff(np.asarray(m.rstart)) == 0
        act[empty] = 0.0
        assert np.all(act >= np.asarray(m.rlo) - 1e-7) and np.all(act <= np.asarray(m.rhi) + 1e-7)
        assert float(np.dot(m.cost, x)) + model.offset == pytest.approx(sched.total_wait, abs=1e-6)
