"""The Gymnasium environment: API conformance, fresh observations, masks, and agreement with the simulator."""

from __future__ import annotations

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from edgecloud.vmsched.cluster import ClusterConfig
from edgecloud.vmsched.env import DVAMPEnv
from edgecloud.vmsched.policies import BalanceFit, Decision
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
    with pytest.raises(ValueError):
        env.step(0)
    assert isinstance(Decision, type)
