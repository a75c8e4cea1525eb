"""Every hyper-parameter of the DQN learners in one dataclass, overridable from the CLI (``--set key=value``)."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, fields

from edgecloud.errors import UserError

AGENTS = ("spane", "spane-numa", "mlpdqn", "mlpaug")
POOLS = ("mean", "max", "std")


@dataclass
class DQNConfig:
    """Defaults follow the published SPANE run (``SPANE_top_models_hparams.json``, ``train.py``) except lr, loss
    and eps_start (marked), which short runs judged on the validation split favoured; the collector and
    replay-ratio knobs are ours (the published code ran one episode per gradient step)."""

    agent: str = "spane"
    seed: int = 0
    n_pms: int = 5
    train_pms: tuple[int, ...] = ()  # multi-N training: the lockstep episodes are split evenly over these cluster
    # sizes (one replay per N, gradient steps cycle over them); () = n_pms only. Symmetric agents only.
    valid_pms: tuple[int, ...] = ()  # validate at these N; with more than one the score is the geometric mean over
    # N of (trimmed mean / Balance-Fit's on the same starts); () = n_pms only (score = the trimmed mean)
    init_from: str = ""  # a model dir (or run dir) whose weights start the training (same architecture); "" = none
    # --- networks -----------------------------------------------------------------------------------------
    enc_width: int = 8  # SPANE per-PM encoder (nn_width_server), layers = enc_layers hidden ReLU layers
    enc_layers: int = 1
    value_width: int = 8
    value_layers: int = 1
    adv_width: int = 16
    adv_layers: int = 1
    pools: tuple[str, ...] = ("mean",)  # cluster embedding: any of mean, max, std (concatenated)
    mlp_width: int = 32  # MLPDQN / MLPAUG hidden width and depth (published: 32 x 2)
    mlp_layers: int = 2
    tie_double: bool = True  # a double-NUMA VM's two actions on one PM are one placement: give them one Q value
    # --- learner ------------------------------------------------------------------------------------------
    gamma: float = 0.95
    n_step: int = 50
    lr: float = 0.001  # published 0.01; 0.001 was steadier in our short validation runs
    lr_decay: float = 0.99  # StepLR factor every lr_decay_every gradient steps (published: 0.99 / 100)
    lr_decay_every: int = 100
    weight_decay: float = 1e-8
    batch_size: int = 1024
    replay_size: int = 100_000
    target_update: int = 100  # hard copy online -> target every this many gradient steps
    loss: str = "huber"  # huber (ours, steadier) or mse (published)
    grad_clip: float = 10.0  # max gradient norm; 0 disables
    double_dqn: bool = True
    ema: float = 0.0  # >0: validate and save an exponential moving average of the online weights (decay per
    # gradient step), a smoother policy than the last online weights; 0 = the online weights themselves
    aug_perms: bool = False  # MLPAUG: each sampled transition gets a fresh random PM permutation
    alias_states: bool = False  # reproduce the published defect (every stored state = the episode's final state)
    reward: str = "log1p"  # per-step reward from the placed VM's wait w (s): log1p = -log(1 + w/reward_scale),
    # linear = -w/reward_scale (the objective itself; heavy-tailed)
    reward_scale: float = 1.0
    # --- demonstrations (DQfD-style; off unless demo names a heuristic) -----------------------------------
    demo: str = ""  # e.g. balance-fit: collect demo_size transitions with it, pretrain on them, keep a margin loss;
    # a model (spane-numa, checkpoint:DIR) as its own demonstrator keeps a fine-tune (init_from) near its policy
    demo_size: int = 100_000  # demonstration transitions (collected from training starts, own start stream)
    demo_steps: int = 1_000  # pretraining gradient steps on demonstrations only (n-step TD + margin)
    demo_margin: float = 1.0  # the expert's action must beat every other placement by this much in Q
    demo_weight: float = 1.0  # weight of the margin loss, in pretraining and after it
    demo_weight_final: float = -1.0  # after pretraining the weight goes linearly to this by the last episode
    # (-1 = stays demo_weight; 0 = the agent is weaned off the expert)
    demo_batch_frac: float = 0.25  # after pretraining: a demonstration batch of this fraction of batch_size
    # --- collection and schedule --------------------------------------------------------------------------
    episodes: int = 5000  # training episodes (epsilon decays linearly over them)
    n_envs: int = 64  # lockstep training episodes, auto-reset
    updates_per_step: float = 0.25  # gradient steps per collector step (one step = n_envs transitions)
    warmup_steps: int = 2_000  # transitions collected before the first gradient step
    eps_start: float = 0.2  # published 0.6
    eps_end: float = 0.0
    eps_episodes: float = 1.0  # epsilon reaches eps_end after this fraction of `episodes`
    start_lo: int = 0  # training starts drawn uniformly from [start_lo, start_hi)
    start_hi: int = 50_000
    valid_every: int = 100  # validate (150-start split) every this many finished training episodes (published: 250;
    # a validation costs ~1.5 s, and more checkpoints give the validation-based selection more to choose from)
    keep_checkpoints: bool = True  # also save every validated model to OUT/checkpoints/epNNNNNN (a few KB each)
    valid_limit: int = 0  # use only the first k validation starts (0 = all 150); for tests
    threads: int = 1  # torch threads
    max_minutes: float = 0.0  # stop after this wall time (0 = no limit); a stopped run is not bit-reproducible

    def __post_init__(self) -> None:
        self.pools = tuple(self.pools)
        for name in ("train_pms", "valid_pms"):
            try:
                setattr(self, name, tuple(int(x) for x in getattr(self, name)))
            except (TypeError, ValueError):
                raise UserError(f"{name}={getattr(self, name)!r}: give cluster sizes as integers, e.g. "
                                f"--set {name}=2,3,4,5") from None
        self.validate()

    def validate(self) -> None:
        if self.agent not in AGENTS:
            raise UserError(f"agent '{self.agent}' is unknown; choose one of {', '.join(AGENTS)}")
        bad = [p for p in self.pools if p not in POOLS]
        if bad or not self.pools:
            raise UserError(f"pools={list(self.pools)}: use a non-empty subset of {', '.join(POOLS)}")
        if self.n_pms < 1:
            raise UserError(f"n_pms={self.n_pms}: must be >= 1")
        for name in ("train_pms", "valid_pms"):
            bad = [n for n in getattr(self, name) if n < 1]
            if bad:
                raise UserError(f"{name}={list(getattr(self, name))}: every cluster size must be >= 1")
        if len(self.train_pms) > 1 and self.agent not in ("spane", "spane-numa"):
            raise UserError(f"train_pms={list(self.train_pms)}: only the symmetric agents (spane, spane-numa) run "
                            f"on several N; {self.agent} is built for one N")
        if len(self.train_pms) > 1 and self.demo:
            raise UserError("demo with several train_pms is not supported; drop demo or train at one N")
        if len(self.train_pms) > self.n_envs:
            raise UserError(f"n_envs={self.n_envs} < {len(self.train_pms)} train_pms; every N needs an episode")
        if not 0.0 < self.gamma <= 1.0:
            raise UserError(f"gamma={self.gamma}: must be in (0, 1]")
        if self.reward not in ("log1p", "linear"):
            raise UserError(f"reward='{self.reward}': choose log1p or linear")
        if not 0.0 <= self.ema < 1.0:
            raise UserError(f"ema={self.ema}: must be in [0, 1) (0 turns it off)")
        if self.reward_scale <= 0:
            raise UserError(f"reward_scale={self.reward_scale}: must be > 0")
        if self.loss not in ("mse", "huber"):
            raise UserError(f"loss='{self.loss}': choose mse or huber")
        for name in ("n_step", "batch_size", "replay_size", "target_update", "episodes", "n_envs", "valid_every",
                     "enc_width", "value_width", "adv_width", "mlp_width", "lr_decay_every"):
            if getattr(self, name) < 1:
                raise UserError(f"{name}={getattr(self, name)}: must be >= 1")
        if self.replay_size < self.n_envs * (self.n_step + 2):
            raise UserError(f"replay_size={self.replay_size} is too small for n_envs={self.n_envs} and "
                            f"n_step={self.n_step}; raise replay_size")
        if not 0 <= self.start_lo < self.start_hi:
            raise UserError(f"start_lo={self.start_lo}, start_hi={self.start_hi}: need 0 <= start_lo < start_hi")
        if self.demo:
            from edgecloud.vmsched.checkpoint import ALIASES, SHIPPED
            from edgecloud.vmsched.policies import HEURISTICS

            if not (self.demo in HEURISTICS or self.demo in SHIPPED or self.demo in ALIASES
                    or self.demo.startswith("checkpoint:")):
                raise UserError(f"demo='{self.demo}': name a heuristic ({', '.join(sorted(HEURISTICS))}), a shipped "
                                "model (e.g. spane-numa) or checkpoint:DIR, or '' for none")
            if self.demo_size < self.n_envs * (self.n_step + 2):
                raise UserError(f"demo_size={self.demo_size} is too small for n_envs={self.n_envs} and n_step="
                                f"{self.n_step}; raise demo_size")
        if min(self.demo_steps, self.demo_margin, self.demo_weight, self.demo_batch_frac) < 0:
            raise UserError("demo_steps, demo_margin, demo_weight and demo_batch_frac must be >= 0")
        if self.demo_weight_final < 0 and self.demo_weight_final != -1:
            raise UserError(f"demo_weight_final={self.demo_weight_final}: use a weight >= 0, or -1 for demo_weight")
        if self.updates_per_step <= 0:
            raise UserError(f"updates_per_step={self.updates_per_step}: must be > 0")
        bad = [f.name for f in dataclasses.fields(self) if isinstance(getattr(self, f.name), float)
               and not math.isfinite(getattr(self, f.name))]
        if bad:
            raise UserError(f"{bad[0]}={getattr(self, bad[0])}: must be a finite number")
        for name in ("lr", "lr_decay"):
            if getattr(self, name) <= 0:
                raise UserError(f"{name}={getattr(self, name)}: must be > 0")
        if self.lr_decay > 1:
            raise UserError(f"lr_decay={self.lr_decay}: must be in (0, 1]")
        for name in ("weight_decay", "grad_clip", "warmup_steps", "max_minutes", "valid_limit", "demo_size"):
            if getattr(self, name) < 0:
                raise UserError(f"{name}={getattr(self, name)}: must be >= 0")
        for name in ("eps_start", "eps_end"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UserError(f"{name}={getattr(self, name)}: an exploration probability must be in [0, 1]")
        if not 0.0 < self.eps_episodes <= 1.0:
            raise UserError(f"eps_episodes={self.eps_episodes}: a fraction of episodes in (0, 1]")
        if self.threads < 1:
            raise UserError(f"threads={self.threads}: must be >= 1")

    # --- (de)serialisation ------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("pools", "train_pms", "valid_pms"):
            d[k] = list(getattr(self, k))
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DQNConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"unknown config key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")
        return cls(**d)

    def with_overrides(self, items: list[str]) -> DQNConfig:
        """Apply ``key=value`` strings; values parse as JSON when they can (numbers, true/false, lists)."""
        d = self.to_dict()
        types = {f.name: f.type for f in fields(self)}
        for item in items:
            if "=" not in item:
                raise UserError(f"--set {item!r}: write key=value (e.g. --set lr=0.001)")
            key, raw = (s.strip() for s in item.split("=", 1))
            if key not in types:
                raise UserError(f"--set {key}: unknown key; known keys: {', '.join(sorted(types))}")
            d[key] = _parse(key, raw, d[key])
        return DQNConfig.from_dict(d)


def _parse(key: str, raw: str, current):
    if isinstance(current, (list, tuple)):
        vals = [v.strip() for v in raw.strip("[]").split(",") if v.strip()]
        return [v.strip("\"'") for v in vals]
    if isinstance(current, bool):
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise UserError(f"--set {key}={raw}: expected true or false")
    if isinstance(current, str):
        return raw
    try:
        v = json.loads(raw)
    except json.JSONDecodeError:
        raise UserError(f"--set {key}={raw}: expected a number") from None
    if isinstance(current, int) and not (isinstance(v, int) or (isinstance(v, float) and v.is_integer())):
        raise UserError(f"--set {key}={raw}: expected an integer")
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise UserError(f"--set {key}={raw}: expected a number")
    return type(current)(v)


def default_config(agent: str, **kw) -> DQNConfig:
    """Per-agent defaults: MLPAUG turns augmentation on; MLP agents use the published lr too."""
    extra: dict = {}
    if agent == "mlpaug":
        extra["aug_perms"] = True
    extra.update(kw)
    return DQNConfig(agent=agent, **extra)


