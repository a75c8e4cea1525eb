"""The batched simulator as a Gymnasium vector env: ``num_envs`` DVAMP episodes in lockstep, one VM placement each
per step, with the scalar env's observations (:class:`~edgecloud.vmsched.env.DVAMPEnv`, batched along axis 0).

- Observation: ``cluster`` (B, N, 2, 2), ``vm`` (B, 3) float32 and ``action_mask`` (B, 2N) int8, the same values the
  scalar env gives for the same episode and actions (tested step by step).
- ``info["action_mask"]``: the (B, 2N) bool mask of valid actions (the masking convention of vector-env RL code).
- Autoreset in the same step (``AutoresetMode.SAME_STEP``): an episode that ends is restarted at once, the step
  returns its new first observation, and ``info["final_obs"]`` (with ``info["_final_obs"]`` marking which rows are
  real) holds the terminal observation; ``info["wait"]`` the seconds the placed VMs waited, ``info["start"]`` and
  ``info["n_vm"]`` the episode each row is now in. Every row is always in an episode, so every step acts on all B.
- Starts: ``sampler(k) -> (starts, n_vms)`` (the DQN trainer passes its own, resumable stream); by default uniform
  over ``start_range`` from the env's seeded generator, lengths by the probe. ``reset(options={"starts": [...]})``
  pins the first episodes (for tests and evaluation).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from edgecloud.vmsched.cluster import ClusterConfig
from edgecloud.vmsched.env import TRAIN_START_RANGE, observation_space
from edgecloud.vmsched.fastsim import FastSim, episode_lengths
from edgecloud.vmsched.trace import Trace

Sampler = Callable[[int], tuple[np.ndarray, np.ndarray]]


def log1p_reward(waits: np.ndarray) -> np.ndarray:
    return -np.log1p(waits)


class BatchedDVAMPEnv(VectorEnv):
    metadata = {"render_modes": [], "autoreset_mode": AutoresetMode.SAME_STEP}

    def __init__(self, trace: Trace, cluster: ClusterConfig | None = None, num_envs: int = 64,
                 reward_fn: Callable[[np.ndarray], np.ndarray] = log1p_reward,
                 start_range: tuple[int, int] = TRAIN_START_RANGE, sampler: Sampler | None = None) -> None:
        self.cluster = cluster or ClusterConfig()
        self.cluster.check_trace(trace)
        self.trace, self.num_envs, self.reward_fn, self.sampler = trace, num_envs, reward_fn, sampler
        lo, hi = start_range
        self.start_range = (max(0, lo), min(hi, len(trace) - 1))
        self.single_observation_space = observation_space(trace, self.cluster)
        self.single_action_space = spaces.Discrete(self.cluster.n_actions)
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self.sim: FastSim | None = None
        self._all = np.arange(num_envs)

    def _starts(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.sampler is not None:
            return self.sampler(k)
        s = self.np_random.integers(*self.start_range, k)
        return s, episode_lengths(self.trace, self.cluster, s)

    def _obs(self, mask: np.ndarray) -> dict[str, np.ndarray]:
        sim, t, cap = self.sim, self.trace, self.cluster.capacity
        r = sim.row
        return {"cluster": (sim.free / cap).astype(np.float32),
                "vm": np.stack([t.cpu[r] / cap[0], t.mem[r] / cap[1], sim.double_all[r].astype(np.float64)],
                               axis=1).astype(np.float32),
                "action_mask": mask.astype(np.int8)}

    def _mask(self) -> np.ndarray:
        idx, d = self.sim.decision()
        assert len(idx) == self.num_envs, "every row is in an episode (finished ones restart in the same step)"
        return d.mask.copy()

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        options = options or {}
        if "starts" in options:
            starts = np.asarray(options["starts"], np.int64).reshape(-1)
            if len(starts) != self.num_envs:
                raise ValueError(f"options['starts'] has {len(starts)} rows; the env has num_envs={self.num_envs}")
            n_vms = options.get("n_vms")
            n_vms = episode_lengths(self.trace, self.cluster, starts) if n_vms is None else np.asarray(n_vms)
        else:
            starts, n_vms = self._starts(self.num_envs)
        self.sim = FastSim(self.trace, self.cluster, starts, n_vms)
        mask = self._mask()
        return self._obs(mask), {"action_mask": mask, "start": self.sim.starts.copy(), "n_vm": self.sim.n_vms.copy()}

    def step(self, actions):
        if self.sim is None:
            raise RuntimeError("call reset() before step()")
        sim = self.sim
        waits = sim.step(self._all, np.asarray(actions, np.int64), sim.mask_cache)
        done = ~sim.active
        info: dict[str, Any] = {"wait": waits, "total_wait": sim.total.copy()}
        if done.any():  # the scalar env's terminal observation: the cluster after the last placement, no head VM
            N = self.cluster.n_pms
            final = {"cluster": (sim.free / self.cluster.capacity).astype(np.float32),
                     "vm": np.zeros((self.num_envs, 3), np.float32),
                     "action_mask": np.ones((self.num_envs, 2 * N), np.int8)}
            info["final_obs"], info["_final_obs"] = final, done.copy()
            fin = np.flatnonzero(done)
            sim.reset_episodes(fin, *self._starts(len(fin)))
        mask = self._mask()
        info |= {"action_mask": mask, "start": sim.starts.copy(), "n_vm": sim.n_vms.copy()}
        trunc = np.zeros(self.num_envs, dtype=bool)
        return self._obs(mask), self.reward_fn(waits), done, trunc, info
