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
from edgecloud.vmsched.agents.qnet import build_qnet
from edgecloud.vmsched.agents.replay import NStepReplay
from edgecloud.vmsched.agents.select import SCORE_METRIC, balance_fit_scores, select_model, valid_score
from edgecloud.vmsched.checkpoint import save_model
from edgecloud.vmsched.cluster import ClusterConfig
from edgecloud.vmsched.fastsim import FastSim, episode_lengths
from edgecloud.vmsched.trace import Trace
from edgecloud.vmsched.vector_env import BatchedDVAMPEnv

RESUME = "resume.safetensors"
@dataclass
class Group:
    """The training episodes at one cluster size: their vector env, replay and start queue (multi-N training has
    one group per N; a single-N run has one group)."""

    n: int
    cluster: ClusterConfig
    n_envs: int
    replay: NStepReplay
    env: BatchedDVAMPEnv | None = None
    obs: dict | None = None
    info: dict | None = None
    queue: list = field(default_factory=list)
    ep_len: np.ndarray | None = None  # steps of each env's current episode (alias_states)


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
        if cfg.init_from:
            self._init_from(cfg.init_from)
        self.opt = torch.optim.Adam(self.online.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        pms = cfg.train_pms or (cfg.n_pms,)
        self.groups: list[Group] = []
        for i, n in enumerate(pms):  # the envs and the replay split evenly over the cluster sizes
            k = cfg.n_envs // len(pms) + (1 if i < cfg.n_envs % len(pms) else 0)
            cl = ClusterConfig(n_pms=n)
            cl.check_trace(trace)
            self.groups.append(Group(n, cl, k, NStepReplay(cfg.replay_size // len(pms), k, n, cfg.n_step, cfg.gamma),
                                     ep_len=np.zeros(k, np.int64)))
        self.replay = self.groups[0].replay
        self.valid_pms = cfg.valid_pms or (cfg.n_pms,)
        self.bf_valid = balance_fit_scores(trace, self.valid_pms, self.valid_starts) if len(self.valid_pms) > 1 \
            else {}
        self.rng = np.random.default_rng([cfg.seed, 0])  # exploration and replay sampling
        self.start_rng = np.random.default_rng([cfg.seed, 1])  # training start rows
        self.p = Progress(next_valid=cfg.valid_every)
        self._credit = 0.0
        self.selected: dict | None = None  # what select_model picked at the end of training
        self.demo: NStepReplay | None = None  # demonstrations (cfg.demo), re-collected identically on resume

    def _init_from(self, path: str) -> None:
        """Start from a saved model's weights (same agent and layer shapes; checked by name and shape)."""
        from edgecloud.vmsched.checkpoint import load_model

        net, cfg, _ = load_model(path)
        want = self.online.state_dict()
        got = net.state_dict()
        if cfg.agent != self.cfg.agent or set(got) != set(want) or any(got[k].shape != v.shape
                                                                        for k, v in want.items()):
            raise UserError(f"init_from={path}: a '{cfg.agent}' model whose weights do not fit this "
                            f"'{self.cfg.agent}' network; use a model of the same agent and widths")
        self.online.load_state_dict(got)
        self.target.load_state_dict(got)
        if self.ema is not None:
            self.ema.load_state_dict(got)

    # --- episodes --------------------------------------------------------------------------------------------
    def _next_starts(self, k: int, g: Group | None = None) -> tuple[np.ndarray, np.ndarray]:
        """k fresh (start, N_vm) pairs for group g; lengths come from the probe, over blocks of 256 starts."""
        g = g or self.groups[0]
        while len(g.queue) < k:
            s = self.start_rng.integers(self.cfg.start_lo, self.cfg.start_hi, 256)
            g.queue += list(zip(s.tolist(), episode_lengths(self.trace, g.cluster, s).tolist()))
        take, g.queue = g.queue[:k], g.queue[k:]
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
        sim = FastSim(self.trace, self.cluster, *starts(c.n_envs))
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
        """One lockstep step of every training episode, through the Gymnasium vector env of each cluster size
        (autoreset in the same step: finished episodes restart at once from the trainer's start stream)."""
        self.p.eps = self.epsilon()
        for g in self.groups:
            if g.env is None:
                g.env = BatchedDVAMPEnv(self.trace, g.cluster, g.n_envs, reward_fn=self.reward,
                                        sampler=lambda k, g=g: self._next_starts(k, g))
                g.obs, g.info = g.env.reset()
            B, N = g.n_envs, g.n
            pm, vm, mask = g.obs["cluster"].reshape(B, N, 4), g.obs["vm"], g.info["action_mask"]
            a = self._act(pm, vm, mask, self.p.eps)
            g.obs, reward, done, _, g.info = g.env.step(a)
            g.replay.add(pm, vm, mask, a, reward, done)
            self.p.env_steps += B
            g.ep_len += 1
            if done.any():
                fin = np.flatnonzero(done)
                if self.cfg.alias_states:
                    self._alias(g, fin, g.info["final_obs"]["cluster"][fin].reshape(len(fin), N, 4))
                g.ep_len[fin] = 0
                self.p.episodes += len(fin)

    def reward(self, waits: np.ndarray) -> np.ndarray:
        w = waits / self.cfg.reward_scale
        return -np.log1p(w) if self.cfg.reward == "log1p" else -w

    def _alias(self, g: Group, fin: np.ndarray, final: np.ndarray) -> None:
        """The published defect, for comparison only: the replay held a reference to the live cluster array, so
        every stored state of an episode read as the cluster after the episode's last placement (``final``)."""
        r = g.replay
        for e, f in zip(fin, final):
            rows = (r.head - 1 - np.arange(min(int(g.ep_len[e]), r.T))) % r.T
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
            replay = self.groups[self.p.grad_steps % len(self.groups)].replay  # one N per step, in turn
            loss = self.td_loss(replay.sample(c.batch_size, self.rng, permute=c.aug_perms))
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

    def validate(self) -> tuple[float, dict[int, float]]:
        """The validation score (lower is better) and the trimmed mean at each validated N."""
        score, by_n = valid_score(self.trace, self.policy_net, self.cfg.agent, self.valid_pms, self.valid_starts,
                                  self.bf_valid)
        self.online.train()
        return score, by_n

    def ready(self) -> bool:
        c = self.cfg
        return (sum(len(g.replay) for g in self.groups) >= max(c.warmup_steps, c.batch_size)
                and all(g.replay.can_sample() for g in self.groups))

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
        if c.init_from and not self.p.history:
            self._validation_round(time.perf_counter() - t0)  # the starting weights are checkpoint ep000000
        while self.p.episodes < c.episodes:
            if c.max_minutes and time.perf_counter() - t0 > 60 * c.max_minutes:
                break
            self.collect_step()
            if self.ready():
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
        if self.out is not None and c.keep_checkpoints and self.p.episodes >= c.episodes and len(self.valid_pms) == 1:
            # (multi-N runs skip the ensembles: they did not pay off at N=5, and cost 8 evaluations each)
            self.selected = select_model(self.out, self.trace, self.valid_starts)
            self.write_summary()
        if on_progress is not None:
            on_progress(self.p)
        return self.p

    def _validation_round(self, wall: float) -> None:
        p = self.p
        p.wall_s = wall
        v, by_n = self.validate()
        p.valid = v
        tm = by_n.get(self.cfg.n_pms, v)
        p.history.append({"episode": p.episodes, "env_steps": p.env_steps, "grad_steps": p.grad_steps,
                          "wall_s": round(wall, 2), "eps": round(p.eps, 4), "valid_trimmed_mean": round(tm, 2)}
                         | ({"valid_score": round(v, 6), "valid_by_n": {str(n): round(x, 2) for n, x in by_n.items()}}
                            if len(by_n) > 1 else {}))
        meta = {"valid_trimmed_mean": round(tm, 4), "episode": p.episodes, "env_steps": p.env_steps,
                "grad_steps": p.grad_steps, "valid_starts": int(len(self.valid_starts))}
        if len(by_n) > 1:
            meta |= {"valid_score": round(v, 6), "valid_metric": SCORE_METRIC,
                     "valid_by_n": {str(n): round(x, 4) for n, x in by_n.items()}}
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
        for i, g in enumerate(self.groups):
            arrays = g.replay.state_arrays("replay" if i == 0 else f"replay{i}")
            t.update({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()})
        p = self.p
        meta = {"config": self.cfg.to_dict(), "opt_groups": opt["param_groups"], "credit": self._credit,
                "queue": self.groups[0].queue, "queues": [g.queue for g in self.groups[1:]],
                "rng": self.rng.bit_generator.state,
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
        for i, g in enumerate(self.groups):
            prefix = "replay" if i == 0 else f"replay{i}"
            g.replay.load_arrays({k: v.numpy() for k, v in t.items() if k.startswith(prefix + ".")}, prefix)
        self.rng.bit_generator.state = meta["rng"]
        self.start_rng.bit_generator.state = meta["start_rng"]
        for g, q in zip(self.groups, [meta["queue"]] + meta.get("queues", [])):
            g.queue = [tuple(x) for x in q]
        self._credit = meta["credit"]
        for k, v in meta["progress"].items():
            setattr(self.p, k, v)
        for g in self.groups:
            g.env = None
        return True
