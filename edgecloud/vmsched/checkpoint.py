"""Trained Q-networks on disk: ``model.safetensors`` (weights) + ``config.json`` (the full DQNConfig and how the
model was selected). Never pickle. ``load_policy`` resolves ``checkpoint:DIR`` and the shipped model names.

A checkpoint dir is either a model dir (holding model.safetensors) or a training run dir, whose ``best/`` (the best
validated checkpoint) is used; a run's ``selected/`` model (see ``select.py``) is loaded by naming it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from edgecloud import atomic
from edgecloud.errors import UserError
from edgecloud.vmsched.agents.config import DQNConfig
from edgecloud.vmsched.agents.policy import GuardedQPolicy, QPolicy
from edgecloud.vmsched.agents.qnet import EnsembleQNet, build_qnet
from edgecloud.vmsched.policies import register_policy, register_prefix

FORMAT = "edgecloud.vmsched.dqn/1"
MODELS_DIR = Path(__file__).resolve().parent / "models"
WEIGHTS, CONFIG = "model.safetensors", "config.json"
# The input layout a network reads (``Decision.features``): per PM [node0 cpu, node0 mem, node1 cpu, node1 mem]
# / node capacity, per VM [cpu / node cpu, mem / node mem, is_double]. Saved with every model; a model saved for
# another layout is refused on load instead of silently reading the wrong numbers.
FEATURES = "pm4:free/cap;vm3:cpu/cap,mem/cap,double"

# The shipped models (``models/<dir>``), by policy name. ``spane`` is our best learner by validation (it is the
# name users reach for): at a cluster size N with a per-N model (``spane-numa-n<N>``: SPANE-NUMA fine-tuned at that N
# and chosen there on validation, shipped only where it beat the N=5 model on the ``select`` split) that model, at
# any other N SPANE-NUMA, whose validation score beats the published architecture's and that of every multi-N
# fine-tune we trained from it (docs/spane.md). The published architecture keeps its own name, ``spane-paper``.
PER_N = "spane-numa-n{n}"  # the per-N models' dir names; a shipped one records supported_pms [N, N]
SHIPPED = {"spane-paper": "spane-paper", "spane-numa": "spane-numa", "mlpdqn": "mlpdqn", "mlpaug": "mlpaug"} | {
    d.name: d.name for d in sorted(MODELS_DIR.glob(PER_N.format(n="*"))) if (d / "config.json").exists()}
ALIASES = {"spane": "spane-numa"}  # the fallback at an N without a per-N model (and when no N is given)
BY_N = {"spane": PER_N}  # aliases that prefer the per-N model of the N asked when one is shipped
# Per-N guards of ``spane`` ({"by_n": {N: {"model", "margin"}}}, written by bench/spane_guard.py --ship): at such an
# N the alias runs that model through GuardedQPolicy (Balance-Fit where the network leads it by < margin in Q).
GUARD_FILE = "spane-guard.json"


def save_model(path: Path, net: torch.nn.Module, cfg: DQNConfig, meta: dict | None = None,
               pms: tuple[int, int] | None = None) -> None:
    """Write weights then config, each atomically (config last: a dir with a config has its weights). ``pms``
    narrows the recorded range of cluster sizes (a per-N model is validated and shipped for its one N)."""
    path = Path(path)
    tensors = {k: v.detach().float().contiguous().clone() for k, v in net.state_dict().items()}
    with atomic.atomic_path(path / WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "agent": cfg.agent})
    doc = {"format": FORMAT, "features": FEATURES, "agent": cfg.agent, "n_pms": cfg.n_pms,
           "supported_pms": list(pms) if pms else supported_pms(cfg), "config": cfg.to_dict(), "meta": meta or {}}
    if isinstance(net, EnsembleQNet):
        doc["members"] = len(net.members)
    atomic.write_text(path / CONFIG, json.dumps(doc, indent=2) + "\n")


def model_dir(path: str | Path) -> Path:
    """The dir holding the weights: ``path`` itself or, for a training run, ``path/best``."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"checkpoint dir {p} does not exist; pass a dir written by `edgecloud vmsched train --out`")
    if (p / WEIGHTS).exists() or (p / CONFIG).exists():
        return p
    if (p / "best" / WEIGHTS).exists():
        return p / "best"
    raise UserError(f"checkpoint dir {p} has no {WEIGHTS} (nor best/{WEIGHTS}); train first, or point at a model dir")


def load_model(path: str | Path) -> tuple[torch.nn.Module, DQNConfig, dict]:
    """Rebuild the network from config.json and load the weights, checking every tensor name and shape."""
    d = model_dir(path)
    try:
        doc = json.loads((d / CONFIG).read_text())
    except FileNotFoundError:
        raise UserError(f"checkpoint {d} has weights but no {CONFIG}; it cannot be rebuilt") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"checkpoint {d / CONFIG} is not valid JSON ({e}); the file is corrupt, retrain") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise UserError(f"checkpoint {d / CONFIG}: format is {doc.get('format') if isinstance(doc, dict) else None!r},"
                        f" expected {FORMAT!r}; it was not written by this version of edgecloud")
    features = doc.get("features", FEATURES)  # models saved before the field existed used today's layout
    if features != FEATURES:
        raise UserError(f"checkpoint {d / CONFIG}: trained on the feature layout {features!r}, but the simulator "
                        f"now produces {FEATURES!r}; retrain it with this version (edgecloud vmsched train)")
    cfg = DQNConfig.from_dict(doc["config"])
    try:
        tensors = load_file(str(d / WEIGHTS))
    except FileNotFoundError:
        raise UserError(f"checkpoint {d} has no {WEIGHTS}") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"checkpoint {d / WEIGHTS} is not a readable safetensors file ({e}); it is corrupt, "
                        "retrain or copy it again") from None
    members = doc.get("members", 1)
    if not isinstance(members, int) or members < 1:
        raise UserError(f"checkpoint {d / CONFIG}: members={members!r} must be a positive integer; the file is corrupt")
    net = build_qnet(cfg, members)
    want = net.state_dict()
    missing, extra = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
    if missing or extra:
        raise UserError(f"checkpoint {d}: weights do not match a '{cfg.agent}' network (missing {missing[:3]}, "
                        f"unexpected {extra[:3]}); config.json and model.safetensors come from different models")
    for k, v in want.items():
        if tuple(tensors[k].shape) != tuple(v.shape):
            raise UserError(f"checkpoint {d}: tensor {k} has shape {tuple(tensors[k].shape)} but the '{cfg.agent}' "
                            f"config needs {tuple(v.shape)} (wrong architecture or N)")
    net.load_state_dict(tensors)
    rng = doc.get("supported_pms", supported_pms(cfg))  # models saved before the field existed: the computed range
    if not (isinstance(rng, list) and len(rng) == 2 and all(isinstance(x, int) for x in rng) and 1 <= rng[0] <= rng[1]):
        raise UserError(f"checkpoint {d / CONFIG}: supported_pms={rng!r} must be [lo, hi] with 1 <= lo <= hi; "
                        "the file is corrupt")
    net.supported_pms = tuple(rng)
    return net.eval(), cfg, doc.get("meta", {})


MAX_PMS = 64  # a symmetric network runs on any N; beyond this its mean-pooled inputs were never seen in training


def supported_pms(cfg: DQNConfig) -> list[int]:
    """[lo, hi]: the cluster sizes a model accepts. A flat MLP: only its N. A symmetric one: 1..MAX_PMS (it is
    trained and validated on ``train_pms`` / ``valid_pms``; docs/spane.md reports every N from 2 to 9)."""
    if cfg.agent in ("mlpdqn", "mlpaug"):
        return [cfg.n_pms, cfg.n_pms]
    return [1, max(MAX_PMS, cfg.n_pms, *cfg.train_pms, *cfg.valid_pms)]


def guard(name: str, n_pms: int | None) -> dict | None:
    """The guard of an alias at ``n_pms`` (``{"model", "margin"}`` from GUARD_FILE), or None: the plain model."""
    key = name.strip().lower()
    path = MODELS_DIR / GUARD_FILE
    if key not in BY_N or n_pms is None or not path.exists():
        return None
    try:
        g = json.loads(path.read_text())["by_n"].get(str(n_pms))
        if g is not None:
            g = {"model": str(g["model"]), "margin": float(g["margin"])}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is corrupt ({e!r}); restore it from git or rerun bench/spane_guard.py --ship"
                        ) from None
    if g is not None and (g["model"] not in SHIPPED or not g["margin"] >= 0):
        raise UserError(f"{path}: N={n_pms} names model {g['model']!r} with margin {g['margin']}; the model must be "
                        f"shipped ({', '.join(SHIPPED)}) and the margin >= 0")
    return g


def resolve(name: str, n_pms: int | None = None) -> str:
    """The shipped model a policy name means at ``n_pms`` PMs: an alias with a guard at that N goes to the guard's
    model; an alias in BY_N to the per-N model of that N when one is shipped, else (and for every other alias) to
    ALIASES; a model name stays itself."""
    key = name.strip().lower()
    if (g := guard(key, n_pms)) is not None:
        return g["model"]
    if key in BY_N and n_pms is not None and BY_N[key].format(n=n_pms) in SHIPPED:
        return BY_N[key].format(n=n_pms)
    return ALIASES.get(key, key)


def shipped_dir(name: str, n_pms: int | None = None) -> Path | None:
    """The model dir of a shipped policy name (aliases resolved at ``n_pms``), or None if it is not a shipped
    model."""
    key = resolve(name, n_pms)
    return MODELS_DIR / SHIPPED[key] if key in SHIPPED else None


def load_policy(name: str, n_pms: int | None = None) -> QPolicy | None:
    """``checkpoint:DIR`` or a shipped model name (``SHIPPED``, ``ALIASES``); None for other names."""
    key = name.strip()
    if key.lower().startswith("checkpoint:"):
        path, label = Path(key.split(":", 1)[1]), key
    elif (path := shipped_dir(key, n_pms)) is not None:
        label = key.lower()
        if not (path / WEIGHTS).exists():
            raise UserError(f"no shipped model for '{label}' (looked in {path}); train one with "
                            "`edgecloud vmsched train` and pass --policy checkpoint:DIR")
    else:
        return None
    net, cfg, _ = load_model(path)
    lo, hi = net.supported_pms
    if n_pms is not None and net.fixed_n is not None and n_pms != net.fixed_n:
        raise UserError(f"policy '{label}' is a flat MLP ({cfg.agent}) trained for N={net.fixed_n} PMs; it cannot "
                        f"run on N={n_pms} (use --pms {net.fixed_n}, or spane / spane-numa, which work for any N)")
    if n_pms is not None and not lo <= n_pms <= hi:
        raise UserError(f"policy '{label}' supports N={lo}..{hi} PMs, not N={n_pms}; use --pms in that range")
    g = guard(key, n_pms) if not key.lower().startswith("checkpoint:") else None
    return GuardedQPolicy(net, label, g["margin"]) if g and g["margin"] > 0 else QPolicy(net, label)


def _factory(name: str, seed: int, n_pms: int | None) -> QPolicy:
    pol = load_policy(name, n_pms)
    assert pol is not None  # registered only for names load_policy knows
    return pol


# The learned policies join the one registry in policies.py (which imports this module only when asked for one).
for _name in [*SHIPPED, *ALIASES]:
    register_policy(_name, _factory)
register_prefix("checkpoint:", _factory)
