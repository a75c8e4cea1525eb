"""The Gymnasium environment: API conformance, fresh observations, masks, and agreement with the simulator."""

from __future__ import annotations

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from edgecloud.vmsched.cluster import ClusterConfig
from edgecloud.vmsched.env import DVAMPEnv
from edgecloud.vmsched.policies import BalanceFit
from edgecloud.vmsched.simulator import run_episode


@pytest.fixture(scope="module")
def small_trace(trace):
    return trace.slice(0, 20_000)


def test_check_env(small_trace):
    env = DVAMPEnv(small_trace, ClusterConfig(n_pms=3), start_range=(0, 15_000))
    check_env(env, skip_render_check=True)


def test_observation_is_a_fresh_copy_and_mask_agrees(small_trace):
    env = DVAMPEnv(small_trace, start_range=(0, 15_000))
    obs, info = env.reset(seed=1)
    before = {k: v.copy() for k, v in obs.items()}
    a = int(np.flatnonzero(obs["action_mask"])[0])
    obs2, r, term, trunc, info2 = env.step(a)
    for k in before:
        np.testing.assert_array_equal(obs[k], before[k])  # the old observation did not change under us
    np.testing.assert_array_equal(obs2["action_mask"].astype(bool), env.action_masks())
    assert r == pytest.approx(-np.log1p(info2["wait"]))
    assert env.observation_space.contains(obs2)


def test_seeded_reset_is_deterministic(small_trace):
    e1, e2 = DVAMPEnv(small_trace, start_range=(0, 15_000)), DVAMPEnv(small_trace, start_range=(0, 15_000))
    assert e1.reset(seed=42)[1]["start"] == e2.reset(seed=42)[1]["start"]


def test_env_episode_total_matches_simulator(trace, valid_starts):
    env = DVAMPEnv(trace)
    bf = BalanceFit()
    c = env.cluster
    for s in valid_starts[:3]:
        obs, info = env.reset(options={"start": int(s)})
        term = False
        while not term:
            sim = env.sim
            a = int(bf(sim.decision())[0])
            obs, r, term, trunc, info = env.step(a)
        assert info["total_wait"] == run_episode(trace, c, bf, int(s))


def test_invalid_action_raises(small_trace):
    env = DVAMPEnv(small_trace)
    env.reset(options={"start": 0, "n_vm": 5})
    sim = env.sim
    sim.free[:] = 0  # nothing fits anywhere: every action is invalid
    row, total, free = sim.row, sim.total_wait, sim.free.copy()
    with pytest.raises(ValueError, match="not valid"):
        env.step(0)
    with pytest.raises(ValueError, match="outside"):
        env.step(2 * env.cluster.n_pms)
    # a refused action leaves the episode exactly as it was (nothing placed, no wait counted)
    assert (sim.row, sim.total_wait) == (row, total)
    np.testing.assert_array_equal(sim.free, free)


# --- the batched simulator as a Gymnasium vector env --------------------------------------------------------------


def _scalar_run(trace, cluster, start, n_vm, actions_of):
    """The scalar env's observations (and terminal one) along one episode, acting with ``actions_of(obs, t)``."""
    env = DVAMPEnv(trace, cluster)
    obs, _ = env.reset(options={"start": int(start), "n_vm": int(n_vm)})
    seen, acts, term = [obs], [], False
    while not term:
        a = actions_of(obs, len(acts))
        obs, r, term, _, info = env.step(a)
        seen.append(obs)
        acts.append(a)
    return seen, acts


@pytest.mark.parametrize("n_pms", [3, 5])
def test_vector_env_observations_equal_the_scalar_env(trace, valid_starts, n_pms):
    """Real episodes (validation starts, probe lengths), mixed actions: every row of the vector env shows, step by
    step, exactly the scalar env's observation for that episode, its terminal one in final_obs, then autoresets."""
    from edgecloud.vmsched.batched import episode_lengths
    from edgecloud.vmsched.vector_env import BatchedDVAMPEnv

    cluster = ClusterConfig(n_pms=n_pms)
    starts = valid_starts[:6]
    starts_before = starts.copy()
    n_vms = episode_lengths(trace, cluster, starts)
    rng = np.random.default_rng(0)
    choice = rng.random((len(starts), int(n_vms.max())))

    def pick(obs, t, b):  # a random valid action, the same for both envs
        valid = np.flatnonzero(obs["action_mask"])
        return int(valid[int(choice[b, t] * len(valid))])

    scalar = [_scalar_run(trace, cluster, s, n, lambda o, t, b=b: pick(o, t, b)) for b, (s, n) in
              enumerate(zip(starts, n_vms))]
    venv = BatchedDVAMPEnv(trace, cluster, num_envs=len(starts), sampler=lambda k: (starts[:k], n_vms[:k]))
    obs, info = venv.reset(options={"starts": starts, "n_vms": n_vms})
    assert venv.observation_space.contains(obs)
    finished = np.zeros(len(starts), bool)
    for t in range(int(n_vms.max())):
        for b in np.flatnonzero(~finished):
            for k in ("cluster", "vm", "action_mask"):
                np.testing.assert_array_equal(obs[k][b], scalar[b][0][t][k], err_msg=f"env {b} step {t} {k}")
            np.testing.assert_array_equal(info["action_mask"][b], scalar[b][0][t]["action_mask"].astype(bool))
        acts = np.array([scalar[b][1][t] if not finished[b] and t < len(scalar[b][1])
                         else int(np.argmax(info["action_mask"][b])) for b in range(len(starts))])
        obs, rew, term, trunc, info = venv.step(acts)
        assert not trunc.any()
        np.testing.assert_allclose(rew, -np.log1p(info["wait"]))
        for b in np.flatnonzero(term & ~finished):
            assert t == n_vms[b] - 1  # ends exactly after its N_vm placements
            assert info["_final_obs"][b]
            for k in ("cluster", "vm", "action_mask"):
                np.testing.assert_array_equal(info["final_obs"][k][b], scalar[b][0][-1][k])
            # autoreset in the same step: the row already shows its next episode's first observation
            assert obs["action_mask"][b].any() and obs["vm"][b].any()
        finished |= term
    assert finished.all()
    np.testing.assert_array_equal(valid_starts[:6], starts_before)  # autoreset never writes into the caller's starts


def test_vector_env_seeded_reset_and_masks(small_trace):
    from edgecloud.vmsched.vector_env import BatchedDVAMPEnv

    a = BatchedDVAMPEnv(small_trace, num_envs=4, start_range=(0, 15_000))
    b = BatchedDVAMPEnv(small_trace, num_envs=4, start_range=(0, 15_000))
    (oa, ia), (ob, ib) = a.reset(seed=7), b.reset(seed=7)
    np.testing.assert_array_equal(ia["start"], ib["start"])
    for _ in range(30):
        act = np.argmax(ia["action_mask"], axis=1)
        oa, _, ta, _, ia = a.step(act)
        ob, _, tb, _, ib = b.step(act)
        np.testing.assert_array_equal(oa["cluster"], ob["cluster"])
        assert ia["action_mask"].any(axis=1).all()  # every row always has a valid action (autoreset)
    masked = np.argmin(ia["action_mask"], axis=1)
    if not ia["action_mask"][np.arange(4), masked].all():
        with pytest.raises(ValueError, match="invalid action"):
            a.step(masked)
