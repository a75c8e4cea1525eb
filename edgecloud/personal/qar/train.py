"""Training a dual-tower responder: LM loss on the reply + weighted cluster-contrastive loss; safetensors checkpoints
with resume.

The frozen layers below the towers are identical for every arm, so their output for every training exchange is
computed once (:func:`bottom_states`) and reused by every step, arm and seed; a step runs only the top layers. A
checkpoint holds the trainable tensors, the AdamW moments, the memory bank and, in its metadata, every config, the
step, the base model's fingerprint and the (responder, questioner) pairs, so ``respond`` needs nothing else.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edgecloud import atomic
from edgecloud.errors import UserError
from edgecloud.personal.qar.contrastive import MemoryBank, contrastive_loss, project
from edgecloud.personal.qar.exchanges import Exchange, prompt_text
from edgecloud.personal.qar.model import Batch, DualTower


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 100
    batch_size: int = 8
    lr: float = 4e-3  # high for LoRA, on purpose: a run is a few dozen steps, not thousands
    warmup: int = 3
    tower_lr_mult: float = 5.0  # the specific tower starts at zero and has a few dozen steps to grow: faster lr
    contrastive_weight: float = 0.5  # against the LM loss; 0 = the no-contrastive ablation
    temperature: float = 0.1
    bank_slots: int = 8  # memory-bank slots per (cluster, pair)
    named: bool = True  # the questioner's name in the prompt
    clustered: bool = True  # False: one cluster per responder (the no-clustering ablation)
    k_min: int = 5
    k_max: int = 10
    ckpt_every: int = 50
    seed: int = 0

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise UserError("train config: steps >= 1, batch_size >= 1 and lr > 0 are needed")
        if self.contrastive_weight < 0 or self.temperature <= 0:
            raise UserError("train config: contrastive_weight >= 0 and temperature > 0 are needed")
        if not 2 <= self.k_min <= self.k_max:
            raise UserError(f"k range {self.k_min}..{self.k_max}: need 2 <= k_min <= k_max")


def encode(tok, ex: Exchange, named: bool) -> tuple[list[int], list[int]]:
    """(prompt ids, reply ids ending with <|im_end|>)."""
    end = tok.convert_tokens_to_ids("<|im_end|>")
    return tok(prompt_text(ex, named))["input_ids"], tok(ex.reply)["input_ids"] + [end]


@torch.no_grad()
def bottom_states(model: DualTower, seqs: list[list[int]], batch_size: int = 16) -> list[torch.Tensor]:
    """Hidden states entering the top layers for each token sequence, unpadded (T_i, hidden). Left padding with
    per-row positions makes them independent of the batch they were computed in."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out: list[torch.Tensor | None] = [None] * len(seqs)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        b = Batch.left_pad([seqs[i] for i in idx])
        h = model.bottom(b)
        for r, i in enumerate(idx):
            out[i] = h[r, h.shape[1] - len(seqs[i]):].clone()
    return out


def pad_states(states: list[torch.Tensor]) -> tuple[torch.Tensor, Batch]:
    t = max(x.shape[0] for x in states)
    h = torch.zeros(len(states), t, states[0].shape[1])
    for i, x in enumerate(states):
        h[i, t - x.shape[0]:] = x
    b = Batch.left_pad([[0] * x.shape[0] for x in states])
    return h, b


def forward_batch(model: DualTower, states, prompt_lens, reply_lens, pairs):
    """Top layers over a batch of precomputed states. Returns (reply-token logits, targets-mask index, pooled
    general, pooled specific or None): pooled = mean of the final-normed states over the reply tokens."""
    h, b = pad_states(states)
    g, s = model.top(h, b, torch.tensor(pairs))
    t = h.shape[1]
    lens = torch.tensor([p + r for p, r in zip(prompt_lens, reply_lens, strict=True)])
    start = t - lens + torch.tensor(prompt_lens)  # first reply token column
    cols = torch.arange(t).unsqueeze(0)
    reply = (cols >= start.unsqueeze(1))  # (B, T) reply-token positions
    pred = torch.zeros_like(reply)
    pred[:, :-1] = reply[:, 1:]  # the state before each reply token predicts it
    w = reply.float().unsqueeze(-1)
    pooled_g = (g * w).sum(1) / w.sum(1)
    pooled_s = (s * w).sum(1) / w.sum(1) if s is not None else None
    logits = model.logits(g[pred], None if s is None else s[pred])
    return logits, reply, pooled_g, pooled_s


@torch.no_grad()
def warm_bank(model: DualTower, bank: MemoryBank, states, enc, exs: list[Exchange], batch_size: int = 16) -> None:
    """Fill the memory bank with one pass over the training set before the first step, so every (cluster, pair)
    cell has a prototype from the start (with one epoch of training, a cold bank would leave most exchanges with
    nothing to contrast against)."""
    for s in range(0, len(exs), batch_size):
        idx = list(range(s, min(len(exs), s + batch_size)))
        _, _, _, ps = forward_batch(model, [states[i] for i in idx], [len(enc[i][0]) for i in idx],
                                    [len(enc[i][1]) for i in idx], [exs[i].pair for i in idx])
        cl, pr = torch.tensor([exs[i].cluster for i in idx]), torch.tensor([exs[i].pair for i in idx])
        z1, z2 = project(ps, model.proj1, model.proj2, cl)
        bank.update(z1, z2, cl, pr)


def batch_order(n: int, steps: int, bs: int, seed: int) -> np.ndarray:
    """Indices of every step's batch: a fresh permutation each epoch (seeded), so a resumed run sees the same."""
    need = steps * bs
    perms = [np.random.default_rng([seed, e]).permutation(n) for e in range(need // n + 1)]
    return np.concatenate(perms)[:need].reshape(steps, bs)


def save_checkpoint(path: Path, model: DualTower, opt, bank: MemoryBank | None, step: int, meta: dict) -> None:
    from safetensors.torch import save_file

    tensors = {f"param/{n}": p.detach().contiguous() for n, p in model.trainable().items()}
    for n, p in model.trainable().items():
        st = opt.state.get(p, {})
        for k in ("exp_avg", "exp_avg_sq"):
            if k in st:
                tensors[f"opt/{k}/{n}"] = st[k].contiguous()
        if "step" in st:
            tensors[f"opt/step/{n}"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1)
    if bank is not None:
        tensors["bank/bank"], tensors["bank/count"] = bank.bank.contiguous(), bank.count.contiguous()
    md = {"step": str(step), "base_fingerprint": model.fingerprint, "model_config": json.dumps(model.cfg.to_dict()),
          **{k: json.dumps(v) for k, v in meta.items()}}
    with atomic.atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=md)


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise UserError(f"checkpoint {path}: not a readable safetensors file ({str(e)[:100]}); train again") from None
    if "base_fingerprint" not in md or "model_config" not in md:
        raise UserError(f"checkpoint {path}: not a QAR checkpoint (no base_fingerprint/model_config metadata)")
    meta = {k: (v if k in ("step", "base_fingerprint") else json.loads(v)) for k, v in md.items()}
    return tensors, meta


def check_base(meta: dict, model_fingerprint: str, path: Path) -> None:
    if meta["base_fingerprint"] != model_fingerprint:
        raise UserError(f"checkpoint {path} was trained on base model {meta['base_fingerprint']}, not the loaded "
                        f"{model_fingerprint}; pass the matching --model or train again with qar-train")


def load_params(model: DualTower, tensors: dict[str, torch.Tensor], path: Path) -> None:
    own = model.trainable()
    got = {k[len("param/"):]: v for k, v in tensors.items() if k.startswith("param/")}
    if set(got) != set(own):
        raise UserError(f"checkpoint {path}: its tensors do not match this model config "
                        f"({len(set(got) ^ set(own))} names differ); train again")
    with torch.no_grad():
        for n, p in own.items():
            if got[n].shape != p.shape:
                raise UserError(f"checkpoint {path}: {n} has shape {tuple(got[n].shape)}, expected {tuple(p.shape)}")
            p.copy_(got[n])


def train(model: DualTower, train_set: list[Exchange], tcfg: TrainConfig, states: list[torch.Tensor] | None = None,
          ckpt: Path | None = None, meta: dict | None = None, log=None, stop_after: int | None = None) -> dict:
    """Train in place. ``states``: precomputed :func:`bottom_states` of the encoded exchanges (else computed here).
    With ``ckpt``: resume from it when it exists (same configs), save every ``ckpt_every`` steps and at the end.
    ``stop_after``: stop (checkpoint saved) once that many steps are done, as an interrupted run would."""
    torch.manual_seed(tcfg.seed)
    enc = [encode(model.tok, e, tcfg.named) for e in train_set]
    if states is None:
        states = bottom_states(model, [p + r for p, r in enc])
    cfg = model.cfg
    use_con = cfg.towers and tcfg.contrastive_weight > 0
    bank = MemoryBank(cfg.n_clusters, cfg.n_pairs, cfg.proj_dim, tcfg.bank_slots) if use_con else None
    tr = model.trainable()
    general = [p for n, p in tr.items() if "lora_" in n]
    tower = [p for n, p in tr.items() if "lora_" not in n]
    groups = [{"params": general, "mult": 1.0}] + ([{"params": tower, "mult": tcfg.tower_lr_mult}] if tower else [])
    opt = torch.optim.AdamW(groups, lr=tcfg.lr, weight_decay=0.0)
    sched = lambda s: min(1.0, (s + 1) / tcfg.warmup) * max(0.1, 1 - s / tcfg.steps)  # noqa: E731 warm-up, decay
    start = 0
    meta = {**(meta or {}), "train_config": asdict(tcfg)}
    if ckpt is not None and ckpt.exists():
        tensors, old = read_checkpoint(ckpt)
        check_base(old, model.fingerprint, ckpt)
        if old.get("train_config") != meta["train_config"] or old["model_config"] != cfg.to_dict():
            raise UserError(f"checkpoint {ckpt}: trained with other settings; delete it or use another --out")
        load_params(model, tensors, ckpt)
        for n, p in model.trainable().items():
            if f"opt/exp_avg/{n}" in tensors:
                opt.state[p] = {"exp_avg": tensors[f"opt/exp_avg/{n}"].clone(),
                                "exp_avg_sq": tensors[f"opt/exp_avg_sq/{n}"].clone(),
                                "step": tensors[f"opt/step/{n}"].reshape(())}
        if bank is not None:
            bank.load({"bank": tensors["bank/bank"], "count": tensors["bank/count"]})
        start = int(old["step"])
    if bank is not None and start == 0:
        warm_bank(model, bank, states, enc, train_set)
    order = batch_order(len(train_set), tcfg.steps, tcfg.batch_size, tcfg.seed)
    pairs = [e.pair for e in train_set]
    clusters = [e.cluster for e in train_set]
    hist = {"lm": [], "con": []}
    t0 = time.time()
    model.train()
    for step in range(start, tcfg.steps):
        idx = order[step].tolist()
        for gr in opt.param_groups:
            gr["lr"] = tcfg.lr * gr["mult"] * sched(step)
        logits, reply, _, pooled_s = forward_batch(
            model, [states[i] for i in idx], [len(enc[i][0]) for i in idx], [len(enc[i][1]) for i in idx],
            [pairs[i] for i in idx])
        targets = torch.cat([torch.tensor(enc[i][1]) for i in idx])
        lm = F.cross_entropy(logits, targets)
        loss, con = lm, torch.zeros(())
        if use_con:
            cl, pr = torch.tensor([clusters[i] for i in idx]), torch.tensor([pairs[i] for i in idx])
            z1, z2 = project(pooled_s, model.proj1, model.proj2, cl)
            protos, valid = bank.prototypes()
            con = contrastive_loss(z1, z2, cl, pr, protos, valid, tcfg.temperature)
            loss = lm + tcfg.contrastive_weight * con
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if use_con:
            bank.update(z1, z2, cl, pr)
        hist["lm"].append(float(lm.detach()))
        hist["con"].append(float(con.detach()))
        if log and (step % 10 == 0 or step == tcfg.steps - 1):
            log(f"step {step + 1}/{tcfg.steps} lm {hist['lm'][-1]:.3f} con {hist['con'][-1]:.3f} "
                f"({time.time() - t0:.0f} s)")
        last = step + 1 == tcfg.steps or (stop_after is not None and step + 1 >= stop_after)
        if ckpt is not None and ((step + 1) % tcfg.ckpt_every == 0 or last):
            save_checkpoint(ckpt, model, opt, bank, step + 1, meta)
        if last:
            break
    model.eval()
    done = len(hist["lm"])
    return {"steps_run": done, "resumed_from": start, "train_s": round(time.time() - t0, 1),
            "lm_first": hist["lm"][0] if hist["lm"] else None, "lm_last": float(np.mean(hist["lm"][-10:]))
            if hist["lm"] else None, "con_last": float(np.mean(hist["con"][-10:])) if hist["con"] else None}


@torch.no_grad()
def pooled_states(model: DualTower, exs: list[Exchange], named: bool, states=None, batch_size: int = 16):
    """Teacher-forced pooled reply states of both towers, (N, hidden) each (specific None without towers)."""
    enc = [encode(model.tok, e, named) for e in exs]
    if states is None:
        states = bottom_states(model, [p + r for p, r in enc])
    gs, ss = [], []
    for s in range(0, len(exs), batch_size):
        idx = list(range(s, min(len(exs), s + batch_size)))
        _, _, pg, ps = forward_batch(model, [states[i] for i in idx], [len(enc[i][0]) for i in idx],
                                     [len(enc[i][1]) for i in idx], [exs[i].pair for i in idx])
        gs.append(pg)
        if ps is not None:
            ss.append(ps)
    return torch.cat(gs).numpy(), (torch.cat(ss).numpy() if ss else None)
