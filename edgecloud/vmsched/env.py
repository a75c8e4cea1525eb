"""A Gymnasium environment over the reference simulator: one VM placement per step.

Observation (a dict of fresh arrays, never views of live state):
  ``cluster`` (N, 2, 2) remaining cpu/mem per PM and node, normalised by node capacity;
  ``vm`` (3,) the head VM's cpu/cap, mem/cap, is_double;
  ``action_mask`` (2N,) int8, 1 where the action is valid (also returned by :meth:`action_masks`).
Reward: ``-log1p(wait)`` of the VM just placed (configurable). An episode ends after N_vm placements.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from edgecloud.vmsched.cluster import ClusterConfig
from edgecloud.vmsched.simulator import Simulator, check_start, episode_length
from edgecloud.vmsched.trace import Trace

TRAIN_START_RANGE = (0, 50_000)  # SPANE samples training starts uniformly from here


def log_wait_reward(wait: float) -> float:
    return -float(np.log1p(wait))


def observation_space(trace: Trace, cluster: ClusterConfig) -> spaces.Dict:
    """One placement's observation: shared by this env and the batched vector env (``vector_env.py``)."""
    N, cap = cluster.n_pms, cluster.capacity
    vm_high = np.array([trace.cpu.max() / cap[0], trace.mem.max() / cap[1], 1.0], dtype=np.float32)
    return spaces.Dict({
        "cluster": spaces.Box(0.0, 1.0, (N, 2, 2), dtype=np.float32),
        "vm": spaces.Box(0.0, vm_high, (3,), dtype=np.float32),
        "action_mask": spaces.MultiBinary(2 * N),
    })


class DVAMPEnv(gym.Env):
    metadata = {"render_modes": []}

    def __init__(self, trace: Trace, cluster: ClusterConfig | None = None,
                 reward_fn: Callable[[float], float] = log_wait_reward,
                 start_range: tuple[int, int] = TRAIN_START_RANGE) -> None:
        self.cluster = cluster or ClusterConfig()
        self.cluster.check_trace(trace)
        self.trace = trace
        self.reward_fn = reward_fn
        lo, hi = start_range
        self.start_range = (max(0, lo), min(hi, len(trace) - 1))
        self.sim = Simulator(trace, self.cluster)
        self._lengths: dict[int, int] = {}
        self.observation_space = observation_space(trace, self.cluster)
        self.action_space = spaces.Discrete(self.cluster.n_actions)
        self._started = False

    def episode_length(self, start: int) -> int:
        if start not in self._lengths:
            self._lengths[start] = episode_length(self.trace, self.cluster, start)
        return self._lengths[start]

    def _obs(self) -> dict[str, np.ndarray]:
        t, r, cap = self.trace, self.sim.row, self.cluster.capacity
        return {
            "cluster": (self.sim.free / cap).astype(np.float32),  # a new array: never a view of live state
            "vm": np.array([t.cpu[r] / cap[0], t.mem[r] / cap[1], float(self.sim.double[r])], dtype=np.float32),
            "action_mask": self.sim.mask().astype(np.int8),
        }

    def action_masks(self) -> np.ndarray:
        if not self._started or self.sim.done:
            return np.ones(self.action_space.n, dtype=bool)
        return self.sim.mask().copy()

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        options = options or {}
        if "start" in options:
            start = int(options["start"])
        else:
            start = int(self.np_random.integers(*self.start_range))
        check_start(self.trace, start)
        n_vm = int(options["n_vm"]) if options.get("n_vm") is not None else self.episode_length(start)
        self.sim.reset(start, n_vm)
        self._started = True
        return self._obs(), {"start": start, "n_vm": n_vm, "clock": self.sim.clock}

    def step(self, action):
        if not self._started or self.sim.done:
            raise RuntimeError("call reset() before step(), and again after an episode ends")
        wait = self.sim.place(int(action))
        terminated = self.sim.done
        info = {"wait": wait, "total_wait": self.sim.total_wait, "clock": self.sim.clock}
        if terminated:  # no head VM any more: a zero observation with an all-valid mask
            N = self.cluster.n_pms
            obs = {"cluster": (self.sim.free / self.cluster.capacity).astype(np.float32),
                   "vm": np.zeros(3, np.float32),
                   "action_mask": np.ones(2 * N, np.int8)}
        else:
            obs = self._obs()
        return obs, self.reward_fn(wait), terminated, False, info
