"""n-step double DQN with dueling heads, trained from many lockstep episodes of the batched simulator.

One collector step acts in all ``n_envs`` episodes with one batched forward pass (epsilon-greedy over the valid
actions), stores the copied states, and restarts finished episodes from fresh training starts, so that the CPU
time goes to simulation and gradient steps rather than Python per-episode overhead. ``updates_per_step``
gradient steps follow each collector step. Validation on the 150-start split every ``valid_every`` finished
episodes keeps the best model (``OUT/best``); ``OUT/resume.safetensors`` holds everything needed to resume
after a kill (weights, target, Adam moments, replay, counters, RNG states) in one atomically written file.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from edgecloud import atomic
from edgecloud.errors import UserError
from edgecloud.vmsched.agents.config import DQNConfig
from edgecloud.vmsched.agents.policy import QPolicy
from edgecloud.vmsched.agents.qnet import build_qnet
from edgecloud.vmsched.agents.replay import NStepReplay
from edgecloud.vmsched.agents.select import select_model
from edgecloud.vmsched.batched import BatchedSim, episode_lengths
from edgecloud.vmsched.checkpoint import save_model
from edgecloud.vmsched.cluster import ClusterConfig
from edgecloud.vmsched.evaluate import evaluate, trimmed_mean
from edgecloud.vmsched.trace import Trace
from edgecloud.vmsched.vector_env import BatchedDVAMPEnv

RESUME = "resume.safetensors"


@dataclass
class Progress:
    episodes: int = 0
    env_steps: int = 0
    grad_steps: int = 0
    wall_s: float = 0.0
    eps: float = 0.0
    loss: float = float("nan")
    valid: float | None = None
    best_valid: float | None = None
    best_episode: int = -1
    next_valid: int = 0
    history: list = field(default_factory=list)


class Trainer:
    """Owns the networks, optimiser, replay and collector of one training run."""

    def __init__(self, cfg: DQNConfig, trace: Trace, valid_starts: np.ndarray, out: Path | None = None) -> None:
        self.cfg, self.trace, self.out = cfg, trace, Path(out) if out is not None else None
        self.cluster = ClusterConfig(n_pms=cfg.n_pms)
        self.cluster.check_trace(trace)
        if cfg.start_hi > len(trace) - 1:
            raise UserError(f"start_hi={cfg.start_hi} is past the trace end ({len(trace)} rows); lower it")
        self.valid_starts = np.asarray(valid_starts, np.int64)
        if cfg.valid_limit:
            self.valid_starts = self.valid_starts[: cfg.valid_limit]
        torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        self.online = build_qnet(cfg)
        self.target = copy.deepcopy(self.online)
        for p in self.target.parameters():
            p.requires_grad_(False)
        self.ema = copy.deepcopy(self.target) if cfg.ema > 0 else None  # the evaluated/saved weights
        self.opt = torch.optim.Adam(self.online.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.replay = NStepReplay(cfg.replay_size, cfg.n_envs, cfg.n_pms, cfg.n_step, cfg.gamma)
        self.rng = np.random.default_rng([cfg.seed, 0])  # exploration and replay sampling
        self.start_rng = np.random.default_rng([cfg.seed, 1])  # training start rows
        self.p = Progress(next_valid=cfg.valid_every)
        self.env: BatchedDVAMPEnv | None = None  # the training episodes (a Gymnasium vector env)
        self._obs: dict | None = None
        self._info: dict | None = None
        self._queue: list[tuple[int, int]] = []
        self._credit = 0.0
        self._ep_len = np.zeros(cfg.n_envs, np.int64)  # steps of each env's current episode (alias_states)
        self.selected: dict | None = None  # what select_model picked at the end of training
        self.demo: NStepReplay | None = None  # demonstrations (cfg.demo), re-collected identically on resume

    # --- episodes --------------------------------------------------------------------------------------------
    def _next_starts(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """k fresh (start, N_vm) pairs; lengths come from the probe, batched over blocks of 256 starts."""
        while len(self._queue) < k:
            s = self.start_rng.integers(self.cfg.start_lo, self.cfg.start_hi, 256)
            self._queue += list(zip(s.tolist(), episode_lengths(self.trace, self.cluster, s).tolist()))
        take, self._queue = self._queue[:k], self._queue[k:]
        return np.array([t[0] for t in take], np.int64), np.array([t[1] for t in take], np.int64)

    def collect_demos(self) -> NStepReplay:
        """Fill a replay with ``cfg.demo`` (a heuristic) acting in ``n_envs`` lockstep training episodes, from a
        start stream of its own (so the agent's training starts, and a resumed run, are unchanged)."""
        from edgecloud.vmsched.policies import make_policy

        c = self.cfg
        rng = np.random.default_rng([c.seed, 2])

        def starts(k: int) -> tuple[np.ndarray, np.ndarray]:
            s = rng.integers(c.start_lo, c.start_hi, k)
            return s, episode_lengths(self.trace, self.cluster, s)

        expert = make_policy(c.demo)
        rep = NStepReplay(c.demo_size, c.n_envs, c.n_pms, c.n_step, c.gamma)
        sim = BatchedSim(self.trace, self.cluster, *starts(c.n_envs))
        while rep.size < rep.T:
            idx, d = sim.decision()
            pm, vm = d.features()
            a = expert(d)
            waits = sim.step(idx, a, d.mask)
            done = ~sim.active[idx]
            rep.add(pm.astype(np.float32), vm.astype(np.float32), d.mask, a, self.reward(waits), done)
            if done.any():
                fin = idx[done]
                sim.reset_episodes(fin, *starts(len(fin)))
        return rep

    def epsilon(self) -> float:
        c = self.cfg
        frac = min(1.0, self.p.episodes / max(1.0, c.eps_episodes * c.episodes))
        return c.eps_start + (c.eps_end - c.eps_start) * frac

    def _act(self, pm: np.ndarray, vm: np.ndarray, mask: np.ndarray, eps: float) -> np.ndarray:
        with torch.no_grad():
            q = self.online(torch.from_numpy(pm), torch.from_numpy(vm), torch.from_numpy(mask))
        a = q.argmax(1).numpy()
        explore = self.rng.random(len(a)) < eps
        if explore.any():
            rand = np.argmax(np.where(mask, self.rng.random(mask.shape), -1.0), axis=1)
            a = np.where(explore, rand, a)
        return a

    def collect_step(self) -> None:
        """One lockstep step of every training episode, through the Gymnasium vector env (autoreset in the same
        step: finished episodes restart at once from the trainer's start stream)."""
        if self.env is None:
            self.env = BatchedDVAMPEnv(self.trace, self.cluster, self.cfg.n_envs, reward_fn=self.reward,
                                       sampler=self._next_starts)
            self._obs, self._info = self.env.reset()
        B, N = self.cfg.n_envs, self.cfg.n_pms
        pm, vm, mask = self._obs["cluster"].reshape(B, N, 4), self._obs["vm"], self._info["action_mask"]
        self.p.eps = self.epsilon()
        a = self._act(pm, vm, mask, self.p.eps)
        self._obs, reward, done, _, self._info = self.env.step(a)
        self.replay.add(pm, vm, mask, a, reward, done)
        self.p.env_steps += B
        self._ep_len += 1
        if done.any():
            fin = np.flatnonzero(done)
            if self.cfg.alias_states:
                self._alias(fin, self._info["final_obs"]["cluster"][fin].reshape(len(fin), N, 4))
            self._ep_len[fin] = 0
            self.p.episodes += len(fin)

    def reward(self, waits: np.ndarray) -> np.ndarray:
        w = waits / self.cfg.reward_scale
        return -np.log1p(w) if self.cfg.reward == "log1p" else -w

    def _alias(self, fin: np.ndarray, final: np.ndarray) -> None:
        """The published defect, for comparison only: the replay held a reference to the live cluster array, so
        every stored state of an episode read as the cluster after the episode's last placement (``final``)."""
        r = self.replay
        for e, f in zip(fin, final):
            rows = (r.head - 1 - np.arange(min(int(self._ep_len[e]), r.T))) % r.T
            r.pm[rows, e] = f

    # --- learning --------------------------------------------------------------------------------------------
    def td_loss(self, b: dict[str, torch.Tensor]) -> torch.Tensor:
        """n-step double-DQN loss; the bootstrap argmax runs over the valid next actions only."""
        c = self.cfg
        q = self.online(b["pm"], b["vm"], b["mask"]).gather(1, b["action"][:, None]).squeeze(1)
        with torch.no_grad():
            q_t = self.target(b["pm2"], b["vm2"], b["mask2"])
            pick = self.online(b["pm2"], b["vm2"], b["mask2"]) if c.double_dqn else q_t
            nxt = q_t.gather(1, pick.argmax(1, keepdim=True)).squeeze(1)  # masked: only valid next actions
            y = b["ret"] + b["boot"] * torch.where(b["boot"] > 0, nxt, torch.zeros_like(nxt))
        return F.mse_loss(q, y) if c.loss == "mse" else F.smooth_l1_loss(q, y)

    def margin_loss(self, b: dict[str, torch.Tensor]) -> torch.Tensor:
        """DQfD's large-margin loss: max_a [Q(s,a) + m * (a is another placement)] - Q(s, a_expert). A double
        VM's two actions on the expert's PM are the same placement, so they carry no margin."""
        q = self.online(b["pm"], b["vm"], b["mask"])
        a = b["action"]
        acts = torch.arange(q.shape[1])
        same = (acts == a[:, None]) | ((b["vm"][:, 2:3] > 0.5) & (acts // 2 == (a // 2)[:, None]))
        q_m = q + self.cfg.demo_margin * (~same).to(q.dtype)
        return (q_m.max(1).values - q.gather(1, a[:, None]).squeeze(1)).mean()

    def demo_weight(self) -> float:
        """The margin loss's weight after pretraining: demo_weight, going linearly to demo_weight_final."""
        c = self.cfg
        if c.demo_weight_final < 0:
            return c.demo_weight
        frac = min(1.0, self.p.episodes / c.episodes)
        return c.demo_weight + (c.demo_weight_final - c.demo_weight) * frac

    def update(self, demo_only: bool = False) -> float:
        """One gradient step: TD on agent transitions (+ the margin loss on a demonstration batch when demos are
        on), or, while pretraining (``demo_only``), TD + margin on demonstrations alone."""
        c = self.cfg
        for g in self.opt.param_groups:  # StepLR, written out so that resuming needs only the step count
            g["lr"] = c.lr * c.lr_decay ** (self.p.grad_steps // c.lr_decay_every)
        if demo_only:
            b = self.demo.sample(c.batch_size, self.rng)
            loss = self.td_loss(b) + c.demo_weight * self.margin_loss(b)
        else:
            loss = self.td_loss(self.replay.sample(c.batch_size, self.rng, permute=c.aug_perms))
            w = self.demo_weight()
            if self.demo is not None and w > 0 and c.demo_batch_frac > 0:
                bd = self.demo.sample(max(1, int(c.batch_size * c.demo_batch_frac)), self.rng, permute=c.aug_perms)
                loss = loss + w * self.margin_loss(bd)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if c.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.online.parameters(), c.grad_clip)
        self.opt.step()
        if self.ema is not None:
            with torch.no_grad():
                for e, o in zip(self.ema.parameters(), self.online.parameters()):
                    e.lerp_(o, 1.0 - c.ema)
        self.p.grad_steps += 1
        if self.p.grad_steps % c.target_update == 0:
            self.target.load_state_dict(self.online.state_dict())
        return float(loss.detach())

    @property
    def policy_net(self) -> torch.nn.Module:
        """The weights that are validated and saved: the EMA when ``cfg.ema`` > 0, else the online net."""
        return self.online if self.ema is None else self.ema

    def validate(self) -> float:
        res = evaluate(self.trace, self.cluster, QPolicy(self.policy_net, self.cfg.agent), self.valid_starts,
                       split_name="valid")
        self.online.train()
        return trimmed_mean(res.totals)

    # --- the loop --------------------------------------------------------------------------------------------
    def train(self, on_progress: Callable[[Progress], None] | None = None) -> Progress:
        c = self.cfg
        t0 = time.perf_counter() - self.p.wall_s
        if c.demo and self.demo is None:
            self.demo = self.collect_demos()
            pretrain = self.p.grad_steps < c.demo_steps  # False when resuming a run that already pretrained
            while self.p.grad_steps < c.demo_steps:
                self.p.loss = self.update(demo_only=True)
            if pretrain:
                self._validation_round(time.perf_counter() - t0)  # the pretrained net is checkpoint ep000000
        while self.p.episodes < c.episodes:
            if c.max_minutes and time.perf_counter() - t0 > 60 * c.max_minutes:
                break
            self.collect_step()
            if len(self.replay) >= max(c.warmup_steps, c.batch_size) and self.replay.can_sample():
                self._credit += c.updates_per_step
                while self._credit >= 1.0:
                    self.p.loss = self.update()
                    self._credit -= 1.0
            if self.p.episodes >= self.p.next_valid:
                self._validation_round(time.perf_counter() - t0)
            if on_progress is not None and self.p.env_steps % (c.n_envs * 50) == 0:
                self.p.wall_s = time.perf_counter() - t0
                on_progress(self.p)
        self.p.wall_s = time.perf_counter() - t0
        if not self.p.history or self.p.history[-1]["episode"] != self.p.episodes:
            self._validation_round(self.p.wall_s)  # a final validation on the last weights
        if self.out is not None and c.keep_checkpoints and self.p.episodes >= c.episodes:
            self.selected = select_model(self.out, self.trace, self.valid_starts)
            self.write_summary()
        if on_progress is not None:
            on_progress(self.p)
        return self.p

    def _validation_round(self, wall: float) -> None:
        p = self.p
        p.wall_s = wall
        v = self.validate()
        p.valid = v
        p.history.append({"episode": p.episodes, "env_steps": p.env_steps, "grad_steps": p.grad_steps,
                          "wall_s": round(wall, 2), "eps": round(p.eps, 4), "valid_trimmed_mean": round(v, 2)})
        meta = {"valid_trimmed_mean": round(v, 4), "episode": p.episodes, "env_steps": p.env_steps,
                "grad_steps": p.grad_steps, "valid_starts": int(len(self.valid_starts))}
        if self.out is not None and self.cfg.keep_checkpoints:
            save_model(self.out / "checkpoints" / f"ep{p.episodes:06d}", self.policy_net, self.cfg, meta)
        if p.best_valid is None or v < p.best_valid:
            p.best_valid, p.best_episode = v, p.episodes
            if self.out is not None:
                save_model(self.out / "best", self.policy_net, self.cfg, meta)
        while p.next_valid <= p.episodes:
            p.next_valid += self.cfg.valid_every
        if self.out is not None:
            self.save_resume()
            self.write_summary()

    # --- persistence -----------------------------------------------------------------------------------------
    def summary(self) -> dict:
        p = self.p
        return {"agent": self.cfg.agent, "seed": self.cfg.seed, "n_pms": self.cfg.n_pms, "episodes": p.episodes,
                "env_steps": p.env_steps, "grad_steps": p.grad_steps, "wall_s": round(p.wall_s, 2),
                "env_steps_per_s": round(p.env_steps / max(p.wall_s, 1e-9), 1),
                "best_valid_trimmed_mean": p.best_valid, "best_episode": p.best_episode,
                "finished": p.episodes >= self.cfg.episodes, "selected": self.selected,
                "config": self.cfg.to_dict(), "history": p.history}

    def write_summary(self) -> None:
        atomic.write_text(self.out / "summary.json", json.dumps(self.summary(), indent=2) + "\n")

    def save_resume(self) -> None:
        """One file, written atomically: a kill at any moment leaves the previous complete state."""
        t: dict[str, torch.Tensor] = {}
        t.update({f"online.{k}": v.detach().clone() for k, v in self.online.state_dict().items()})
        t.update({f"target.{k}": v.detach().clone() for k, v in self.target.state_dict().items()})
        if self.ema is not None:
            t.update({f"ema.{k}": v.detach().clone() for k, v in self.ema.state_dict().items()})
        opt = self.opt.state_dict()
        for i, st in opt["state"].items():
            for k, v in st.items():
                t[f"opt.{i}.{k}"] = torch.as_tensor(v).clone()
        t.update({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in self.replay.state_arrays().items()})
        p = self.p
        meta = {"config": self.cfg.to_dict(), "opt_groups": opt["param_groups"], "credit": self._credit,
                "queue": self._queue, "rng": self.rng.bit_generator.state,
                "start_rng": self.start_rng.bit_generator.state,
                "progress": {k: getattr(p, k) for k in ("episodes", "env_steps", "grad_steps", "wall_s", "eps",
                                                        "valid", "best_valid", "best_episode", "next_valid",
                                                        "history")}}
        with atomic.atomic_path(self.out / RESUME) as tmp:
            save_file(t, str(tmp), metadata={"state": json.dumps(meta)})

    def load_resume(self) -> bool:
        """Restore from OUT/resume.safetensors if present. In-flight episodes are not saved: the collector
        restarts with fresh episodes from the saved start stream (the replay keeps all earlier transitions)."""
        path = self.out / RESUME
        if not path.exists():
            return False
        try:
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                meta = json.loads(f.metadata()["state"])
            t = load_file(str(path))
        except (SafetensorError, OSError, KeyError, ValueError) as e:
            raise UserError(f"{path} is unreadable ({e}); delete it to start over, or drop --resume") from None
        saved = DQNConfig.from_dict(meta["config"])
        if saved != self.cfg:
            diff = [k for k, v in saved.to_dict().items() if self.cfg.to_dict()[k] != v]
            raise UserError(f"--resume: {self.out} was trained with a different config ({', '.join(diff)}); "
                            "resume with the same flags, or use a new --out")
        self.online.load_state_dict({k[7:]: v for k, v in t.items() if k.startswith("online.")})
        self.target.load_state_dict({k[7:]: v for k, v in t.items() if k.startswith("target.")})
        if self.ema is not None:
            self.ema.load_state_dict({k[4:]: v for k, v in t.items() if k.startswith("ema.")})
        state: dict = {}
        for k, v in t.items():
            if k.startswith("opt."):
                _, i, name = k.split(".", 2)
                state.setdefault(int(i), {})[name] = v
        self.opt.load_state_dict({"state": state, "param_groups": meta["opt_groups"]})
        self.replay.load_arrays({k: v.numpy() for k, v in t.items() if k.startswith("replay.")})
        self.rng.bit_generator.state = meta["rng"]
        self.start_rng.bit_generator.state = meta["start_rng"]
        self._queue = [tuple(x) for x in meta["queue"]]
        self._credit = meta["credit"]
        for k, v in meta["progress"].items():
            setattr(self.p, k, v)
        self.env = None
        return True
