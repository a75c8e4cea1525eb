"""Simulator semantics: the scalar reference and the batched evaluator agree; policies follow the spec."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgecloud.errors import UserError
from edgecloud.vmsched.batched import BatchedSim, episode_lengths, evaluate_totals, probe_lengths, run_policy
from edgecloud.vmsched.cluster import ClusterConfig, action_mask
from edgecloud.vmsched.policies import BalanceFit, BestFit, Decision, FirstFit, RandomFit, WorstFit, make_policy
from edgecloud.vmsched.simulator import Simulator, probe_length, run_episode
from edgecloud.vmsched.trace import Trace


def make_trace(cpu, mem, at, lt) -> Trace:
    n = len(cpu)
    return Trace(np.arange(n), np.asarray(cpu, float), np.asarray(mem, float), np.asarray(at, float),
                 np.asarray(lt, float))


@pytest.mark.parametrize("n_pms,policy", [pytest.param(5, BalanceFit(), marks=pytest.mark.slow),
                                          pytest.param(3, BestFit(), marks=pytest.mark.slow),
                                          pytest.param(7, WorstFit(), marks=pytest.mark.slow), (1, FirstFit())])
def test_scalar_and_batched_agree_on_real_episodes(trace, valid_starts, n_pms, policy):
    """Per-episode totals identical, on real trace episodes (several hundred in all over the parameters)."""
    c = ClusterConfig(n_pms=n_pms)
    starts = valid_starts[:60] if n_pms != 1 else valid_starts[:150]
    n = episode_lengths(trace, c, starts)
    batched = evaluate_totals(trace, c, policy, starts, n)
    scalar = [run_episode(trace, c, policy, int(s), int(k)) for s, k in zip(starts, n)]
    np.testing.assert_array_equal(batched, scalar)
    assert [probe_length(trace, c, int(s)) for s in starts[:20]] == (n[:20] - 40).tolist()


vm = st.tuples(st.sampled_from([1, 2, 4, 8, 12, 16]), st.sampled_from([1, 2, 4, 8, 16, 24, 32]),
               st.integers(0, 5), st.integers(1, 30))


@settings(max_examples=60, deadline=None)
@given(vms=st.lists(vm, min_size=2, max_size=60), n_pms=st.integers(1, 3), pol=st.sampled_from(
    [FirstFit(), BalanceFit(), BestFit(), WorstFit()]))
def test_scalar_and_batched_agree_on_random_traces(vms, n_pms, pol):
    """Small nodes (16 cpu, 32 GB) so that queueing, ties of end times and double VMs all happen."""
    cpu, mem, gaps, lt = map(np.array, zip(*vms))
    tr = make_trace(cpu, mem, np.cumsum(gaps), lt)
    c = ClusterConfig(n_pms=n_pms, node_cpu=16, node_mem=32, double_threshold=10)
    starts = np.array([0, len(vms) // 2])
    n = len(vms) - starts
    batched = run_policy(BatchedSim(tr, c, starts, n), pol)
    scalar = [run_episode(tr, c, pol, int(s), int(k)) for s, k in zip(starts, n)]
    np.testing.assert_array_equal(batched, scalar)


def test_fifo_head_of_line_and_release_ties():
    # one PM, one node of 4 cpu effectively (double threshold high); VM1 blocks VM2 until VM0 ends
    tr = make_trace([4, 4, 1], [1, 1, 1], [0, 1, 2], [10, 5, 1])
    c = ClusterConfig(n_pms=1, node_cpu=4, node_mem=10, double_threshold=100)
    sim = Simulator(tr, c)
    sim.reset(0, 3)
    assert sim.place(0) == 0  # VM0 at t=0 on node 0, ends at 10
    assert sim.clock == 1
    assert sim.place(1) == 0  # VM1 on node 1 at t=1, ends at 6
    # VM2 (1 cpu) cannot fit on either full node: head of line waits for the first end (t=6)
    assert sim.clock == 6
    assert sim.place(1) == 4


def test_release_at_exact_arrival():
    tr = make_trace([4, 4], [1, 1], [0, 10], [10, 1])
    c = ClusterConfig(n_pms=1, node_cpu=4, node_mem=10, double_threshold=100)
    sim = Simulator(tr, c)
    sim.reset(0, 2)
    sim.place(0)
    sim.place(0)  # VM0 ends at 10 == VM1's arrival: released, so node 0 is free again
    assert sim.total_wait == 0


def test_invalid_action_is_an_error():
    tr = make_trace([4, 4], [1, 1], [0, 0], [10, 10])
    c = ClusterConfig(n_pms=1, node_cpu=4, node_mem=10, double_threshold=100)
    sim = Simulator(tr, c)
    sim.reset(0, 2)
    sim.place(0)
    with pytest.raises(ValueError, match="not valid"):
        sim.place(0)
    bsim = BatchedSim(tr, c, [0], [2])
    idx, d = bsim.decision()
    bsim.step(idx, [0], d.mask)
    with pytest.raises(ValueError, match="invalid action"):
        bsim.step(idx, np.array([0]))


def test_double_vm_mask_and_placement():
    c = ClusterConfig(n_pms=2)
    free = c.empty()
    free[0, 1] = [10, 90]  # PM0 node1 has little cpu left
    m = action_mask(free, 16, 32, True)  # double: needs 8 cpu / 16 GB on both nodes
    assert m.tolist() == [True, True, True, True]
    m = action_mask(free, 24, 32, True)  # needs 12 cpu per node: PM0 node1 has 10
    assert m.tolist() == [False, False, True, True]
    m = action_mask(free, 12, 8, False)  # single
    assert m.tolist() == [True, False, True, True]


def decision(free, cpu, mem, double, c):
    free = np.asarray(free, float)[None]
    return Decision(free, np.array([cpu], float), np.array([mem], float), np.array([double]),
                    action_mask(free, np.array([cpu], float), np.array([mem], float), np.array([double])), c)


def test_balance_fit_rules():
    c = ClusterConfig(n_pms=2)
    empty = c.empty()
    assert BalanceFit()(decision(empty, 1, 1, False, c))[0] == 0  # all diffs 0 -> First-Fit
    f = empty.copy()
    f[1, 0] = [20, 90]  # PM1: node values 0.5 vs 1.0 -> diff 0.5, larger value on node 1
    assert BalanceFit()(decision(f, 1, 1, False, c))[0] == 3
    f[1, 1] = [0, 0]  # node 1 full: invalid -> the other node of the same PM
    assert BalanceFit()(decision(f, 1, 1, False, c))[0] == 2
    assert BalanceFit()(decision(f, 2, 16, True, c))[0] == 0  # double -> First-Fit


def test_best_and_worst_fit():
    c = ClusterConfig(n_pms=2)
    f = c.empty()
    f[1, 1] = [4, 8]
    assert BestFit()(decision(f, 2, 4, False, c))[0] == 3
    assert WorstFit()(decision(f, 2, 4, False, c))[0] == 0


def test_random_policy_is_seeded_and_valid():
    c = ClusterConfig(n_pms=3)
    f = c.empty()
    f[0] = 0
    d = decision(f, 1, 1, False, c)
    a = [RandomFit(7)(d)[0] for _ in range(1)] + [int(x) for x in np.concatenate([RandomFit(7)(d) for _ in range(3)])]
    assert all(x >= 2 for x in a)
    p1, p2 = RandomFit(3), RandomFit(3)
    assert [p1(d)[0] for _ in range(10)] == [p2(d)[0] for _ in range(10)]


def test_any_number_of_pms_works(trace, valid_starts):
    for n in (1, 2, 11):
        c = ClusterConfig(n_pms=n)
        tot = evaluate_totals(trace, c, FirstFit(), valid_starts[:5])
        assert tot.shape == (5,) and np.all(tot >= 0)


def test_bad_cluster_and_starts(trace):
    with pytest.raises(UserError, match="n_pms"):
        ClusterConfig(n_pms=0)
    with pytest.raises(UserError, match="outside the trace"):
        probe_lengths(trace, ClusterConfig(), [len(trace) + 5])
    with pytest.raises(UserError, match="past the end"):
        Simulator(trace, ClusterConfig()).reset(len(trace) - 2, 10)
    with pytest.raises(UserError, match="unknown policy"):
        make_policy("nope")


def test_vm_too_big_for_any_pm():
    tr = make_trace([1, 64], [1, 128], [0, 1], [5, 5])
    with pytest.raises(UserError, match="VM 1 .* no PM can ever hold it"):
        ClusterConfig(node_cpu=16, node_mem=32).check_trace(tr)


def test_slot_pool_grows():
    """More simultaneously running VMs than the initial slot pool: the pool grows and results stay exact."""
    n = 300
    tr = make_trace(np.ones(n), np.ones(n), np.arange(n), np.full(n, 1000.0))
    c = ClusterConfig(n_pms=4, node_cpu=40, node_mem=90, double_threshold=10)
    sim = BatchedSim(tr, c, [0, 10], [n - 10, n - 10], slots=8)
    tot = run_policy(sim, FirstFit())
    assert sim.ends.shape[1] >= 160
    assert tot.tolist() == [run_episode(tr, c, FirstFit(), s, n - 10) for s in (0, 10)]


# --- the compiled simulator (fastsim.py) against the scalar reference and the numpy batched one ----------------------
def _stepwise(policy):
    """The same policy without its compiled kernel: forces the step-by-step FastSim path."""
    return lambda d: policy(d)


@pytest.mark.parametrize("n_pms,policy", [(1, FirstFit()), pytest.param(3, BestFit(), marks=pytest.mark.slow),
                                          (5, BalanceFit()), pytest.param(9, WorstFit(), marks=pytest.mark.slow)])
def test_compiled_simulator_equals_the_references_on_real_episodes(trace, valid_starts, n_pms, policy):
    """Probe lengths, and per-episode totals of the compiled whole-episode kernel and of FastSim stepped from Python,
    equal the numpy batched simulator's on 40 real episodes, and the scalar simulator's on the first 8."""
    from edgecloud.vmsched import fastsim

    c = ClusterConfig(n_pms=n_pms)
    starts = valid_starts[:40]
    n = episode_lengths(trace, c, starts)
    np.testing.assert_array_equal(fastsim.episode_lengths(trace, c, starts), n)
    ref = run_policy(BatchedSim(trace, c, starts, n), policy)
    assert fastsim.kernel_of(policy) is not None
    np.testing.assert_array_equal(fastsim.evaluate_totals(trace, c, policy, starts, n), ref)
    np.testing.assert_array_equal(fastsim.evaluate_totals(trace, c, _stepwise(policy), starts, n), ref)
    np.testing.assert_array_equal(ref[:8], [run_episode(trace, c, policy, int(s), int(k))
                                            for s, k in zip(starts[:8], n[:8])])


@settings(max_examples=60, deadline=None)
@given(vms=st.lists(vm, min_size=2, max_size=60), n_pms=st.integers(1, 3), pol=st.sampled_from(
    [FirstFit(), BalanceFit(), BestFit(), WorstFit()]))
def test_compiled_simulator_equals_scalar_on_random_traces(vms, n_pms, pol):
    from edgecloud.vmsched import fastsim

    cpu, mem, gaps, lt = map(np.array, zip(*vms))
    tr = make_trace(cpu, mem, np.cumsum(gaps), lt)
    c = ClusterConfig(n_pms=n_pms, node_cpu=16, node_mem=32, double_threshold=10)
    starts = np.array([0, len(vms) // 2])
    n = len(vms) - starts
    scalar = [run_episode(tr, c, pol, int(s), int(k)) for s, k in zip(starts, n)]
    np.testing.assert_array_equal(fastsim.evaluate_totals(tr, c, pol, starts, n), scalar)
    np.testing.assert_array_equal(fastsim.evaluate_totals(tr, c, _stepwise(pol), starts, n), scalar)


def test_compiled_simulator_never_reuses_a_collected_traces_arrays():
    """Regression: the per-trace array cache was keyed by ``id(trace)``; a new trace of the same length allocated
    where a collected one lived got the old one's arrays (a flaky CI failure). Forty short-lived traces in a row,
    each checked against the scalar simulator."""
    from edgecloud.vmsched import fastsim

    rng = np.random.default_rng(0)
    c = ClusterConfig(n_pms=1, node_cpu=16, node_mem=32, double_threshold=10)
    waited = 0
    for _ in range(40):
        n = 8
        tr = make_trace(rng.integers(4, 17, n), rng.integers(8, 33, n), np.cumsum(rng.integers(0, 3, n)),
                        rng.integers(5, 30, n))
        ref = run_episode(tr, c, WorstFit(), 0, n)
        waited += ref > 0
        assert fastsim.evaluate_totals(tr, c, WorstFit(), np.array([0]), np.array([n]))[0] == ref
        del tr
    assert waited >= 30  # the traces are congested enough for stale arrays to show


def test_fastsim_steps_equal_batched_steps(trace, valid_starts):
    """A seeded random policy through both step APIs: the same decisions (masks, free capacity) and the same waits
    (hence rewards) at every step, on 24 real episodes at N=4."""
    from edgecloud.vmsched.fastsim import FastSim

    c = ClusterConfig(n_pms=4)
    starts = valid_starts[:24]
    n = episode_lengths(trace, c, starts)
    a, b = BatchedSim(trace, c, starts, n), FastSim(trace, c, starts, n)
    pol = RandomFit(5)
    while not a.done:
        ia, da = a.decision()
        ib, db = b.decision()
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(da.mask, db.mask)
        np.testing.assert_array_equal(da.free, db.free)
        act = pol(da)
        np.testing.assert_array_equal(a.step(ia, act, da.mask), b.step(ib, act))
    assert b.done
    np.testing.assert_array_equal(a.total, b.total)


def test_fastsim_errors_and_growth():
    from edgecloud.vmsched import fastsim

    tr = make_trace([4, 4], [1, 1], [0, 0], [10, 10])
    c = ClusterConfig(n_pms=1, node_cpu=4, node_mem=10, double_threshold=100)
    sim = fastsim.FastSim(tr, c, [0], [2])
    idx, d = sim.decision()
    sim.step(idx, [0])
    with pytest.raises(ValueError, match="invalid action"):
        sim.step(idx, np.array([0]))
    with pytest.raises(ValueError, match="invalid action"):
        sim.step(idx, np.array([7]))
    n = 300  # more running VMs than the initial heap: it grows and results stay exact
    tr = make_trace(np.ones(n), np.ones(n), np.arange(n), np.full(n, 1000.0))
    c = ClusterConfig(n_pms=4, node_cpu=40, node_mem=90, double_threshold=10)
    sim = fastsim.FastSim(tr, c, [0, 10], [n - 10, n - 10], slots=8)
    tot = fastsim.run_steps(sim, FirstFit())
    assert sim.h_end.shape[1] >= 160
    assert tot.tolist() == [run_episode(tr, c, FirstFit(), s, n - 10) for s in (0, 10)]
    with pytest.raises(UserError, match="outside the trace"):
        fastsim.episode_lengths(tr, c, [n + 5])
