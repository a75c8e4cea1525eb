"""Replay for n-step double DQN, one ring column per lockstep environment.

Row t of column e is step t of environment e's stream of transitions (episodes back to back, ``done`` marks the
last step of each), so an n-step return is a contiguous window of one column, computed when a batch is sampled.
Each state is stored once, as a **copy** of the simulator's arrays: the published SPANE code stored a reference
to the live cluster array, so every stored state of an episode silently became the episode's final state.
"""

from __future__ import annotations

import numpy as np
import torch

STATE_FIELDS = ("pm", "vm", "mask")


class NStepReplay:
    def __init__(self, capacity: int, n_envs: int, n_pms: int, n_step: int, gamma: float) -> None:
        self.T = max(capacity // n_envs, n_step + 2)
        self.E, self.N, self.n, self.gamma = n_envs, n_pms, n_step, gamma
        T, E = self.T, n_envs
        self.pm = np.zeros((T, E, n_pms, 4), np.float32)
        self.vm = np.zeros((T, E, 3), np.float32)
        self.mask = np.zeros((T, E, 2 * n_pms), bool)
        self.action = np.zeros((T, E), np.int64)
        self.reward = np.zeros((T, E), np.float32)
        self.done = np.zeros((T, E), bool)
        self.head = 0  # next row to write
        self.size = 0  # rows written, at most T
        self.discount = (gamma ** np.arange(n_step)).astype(np.float32)

    def __len__(self) -> int:
        return self.size * self.E

    def add(self, pm, vm, mask, action, reward, done) -> None:
        """One collector step: arrays with a leading axis of n_envs. Copies (``np.asarray`` into our rows)."""
        h = self.head
        self.pm[h] = pm
        self.vm[h] = vm
        self.mask[h] = mask
        self.action[h] = action
        self.reward[h] = reward
        self.done[h] = done
        self.head = (h + 1) % self.T
        self.size = min(self.size + 1, self.T)

    def can_sample(self) -> bool:
        return self.size > self.n

    def sample(self, batch: int, rng: np.random.Generator, permute: bool = False) -> dict[str, torch.Tensor]:
        """A batch of n-step transitions: state, action, discounted n-step return, bootstrap state and
        ``boot`` = gamma^n where the window holds no episode end (else 0, the return is complete)."""
        oldest = (self.head - self.size) % self.T
        i = rng.integers(0, self.size - self.n, batch)
        e = rng.integers(0, self.E, batch)
        rows = (oldest + i[:, None] + np.arange(self.n + 1)) % self.T  # (batch, n+1)
        r = self.reward[rows[:, :-1], e[:, None]]
        d = self.done[rows[:, :-1], e[:, None]]
        alive = np.cumprod(np.concatenate([np.ones((batch, 1), bool), ~d[:, :-1]], 1), 1)  # before an end
        ret = (r * alive * self.discount).sum(1)
        boot = np.where(d.any(1), 0.0, self.gamma ** self.n).astype(np.float32)
        t0, tn = rows[:, 0], rows[:, -1]
        pm, mask, action = self.pm[t0, e], self.mask[t0, e], self.action[t0, e]
        pm2, mask2 = self.pm[tn, e], self.mask[tn, e]
        if permute:  # MLPAUG: a fresh random PM permutation per transition, applied to both states
            perm = np.argsort(rng.random((batch, self.N)), 1)
            inv = np.argsort(perm, 1)
            b = np.arange(batch)[:, None]
            pm, pm2 = pm[b, perm], pm2[b, perm]
            mask = mask.reshape(batch, self.N, 2)[b, perm].reshape(batch, -1)
            mask2 = mask2.reshape(batch, self.N, 2)[b, perm].reshape(batch, -1)
            action = 2 * inv[np.arange(batch), action // 2] + action % 2
        t = torch.from_numpy
        return {"pm": t(pm), "vm": t(self.vm[t0, e]), "mask": t(mask), "action": t(action),
                "ret": t(ret.astype(np.float32)), "boot": t(boot), "pm2": t(pm2), "vm2": t(self.vm[tn, e]),
                "mask2": t(mask2)}

    # --- resume --------------------------------------------------------------------------------------------
    def state_arrays(self, prefix: str = "replay") -> dict[str, np.ndarray]:
        keys = ("pm", "vm", "mask", "action", "reward", "done")
        out = {f"{prefix}.{k}": getattr(self, k) for k in keys}
        out[f"{prefix}.mask"] = out[f"{prefix}.mask"].astype(np.uint8)
        out[f"{prefix}.done"] = out[f"{prefix}.done"].astype(np.uint8)
        out[f"{prefix}.pos"] = np.array([self.head, self.size], np.int64)
        return out

    def load_arrays(self, arrays: dict[str, np.ndarray], prefix: str = "replay") -> None:
        for k in ("pm", "vm", "mask", "action", "reward", "done"):
            a = arrays[f"{prefix}.{k}"]
            cur = getattr(self, k)
            if a.shape != cur.shape:
                raise ValueError(f"{prefix}.{k} has shape {a.shape}, expected {cur.shape}")
            setattr(self, k, a.astype(cur.dtype))
        self.head, self.size = (int(x) for x in arrays[f"{prefix}.pos"])
