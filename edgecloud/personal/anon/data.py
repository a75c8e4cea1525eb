"""Users, their examples split in time, and the reply-selection task.

An example is (context, reply): the turn before one of the user's turns in a chitchat conversation, and the user's
turn. Each user's examples are ordered in time; the first ``train_frac`` of them form the training period and the
rest the held-out period, from which ``n_train`` / ``n_eval`` examples are taken evenly spaced (equal numbers per
user, so no user dominates the loss or the attack). Each held-out example gets ``n_candidates - 1`` negatives:
replies by *other* selected users in the held-out period whose contexts are the most BM25-similar to this one, so
the candidates fit the context and what separates the real reply is who wrote it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgecloud.errors import UserError


@dataclass(frozen=True)
class DataConfig:
    users: int = 32  # the top senders by number of replies
    n_train: int = 24  # training examples per user (training period)
    n_eval: int = 4  # held-out examples per user (held-out period)
    train_frac: float = 0.8  # the first 80% of a user's replies in time are the training period
    n_candidates: int = 10  # the real reply + 9 negatives
    negative_pool: int = 200  # held-out replies per user that negatives are drawn from
    ctx_tokens: int = 20  # context: its last tokens
    reply_tokens: int = 12  # reply: its first tokens
    min_replies: int = 50  # a user with fewer replies cannot be split into a distribution and a held-out set

    def __post_init__(self):
        if self.users < 2:
            raise UserError(f"users={self.users}: need at least 2 users")
        if self.n_train < 2 or self.n_eval < 1:
            raise UserError(f"n_train={self.n_train}, n_eval={self.n_eval}: need n_train >= 2 and n_eval >= 1")
        if not 0 < self.train_frac < 1:
            raise UserError(f"train_frac={self.train_frac}: must be in (0, 1)")
        if self.n_candidates < 2:
            raise UserError(f"n_candidates={self.n_candidates}: need the real reply and at least one negative")
        if self.min_replies < 2:
            raise UserError(f"min_replies={self.min_replies}: need at least 2")


@dataclass(frozen=True)
class Example:
    user: int  # index into Dataset.user_ids (never uploaded)
    context: str
    reply: str
    timestamp: str


@dataclass
class Dataset:
    cfg: DataConfig
    user_ids: list[str]  # the chitchat sender ids of the selected users
    train: list[Example]
    eval: list[Example]
    candidates: list[list[str]]  # per eval example: candidate replies, the real one first

    def summary(self) -> dict:
        return {"users": len(self.user_ids), "train_examples": len(self.train), "eval_examples": len(self.eval),
                "candidates": self.cfg.n_candidates}


def replies_by_sender(convs) -> dict[str, list[Example]]:
    """Every (previous turn, turn) pair keyed by the turn's sender, in time order (user index filled later)."""
    out: dict[str, list[Example]] = {}
    for conv in convs:
        for prev, t in zip(conv, conv[1:]):
            out.setdefault(t.sender, []).append(Example(-1, prev.text, t.text, t.timestamp))
    for v in out.values():
        v.sort(key=lambda e: e.timestamp)
    return out


def evenly(items: list, n: int) -> list:
    """``n`` items evenly spaced over the list (all of it when shorter)."""
    if n >= len(items):
        return list(items)
    idx = np.linspace(0, len(items) - 1, n).round().astype(int)
    return [items[i] for i in idx]


def split_user(examples: list[Example], cfg: DataConfig, who: str = "user") -> tuple[list[Example], list[Example]]:
    """(training-period, held-out-period) examples of one user; too little data is a UserError naming the user."""
    if len(examples) < cfg.min_replies:
        raise UserError(f"{who}: {len(examples)} replies, need at least {cfg.min_replies} to fit a distribution "
                        f"and hold out {cfg.n_eval} (lower --min-replies or pick another user)")
    cut = int(round(len(examples) * cfg.train_frac))
    tr, ho = examples[:cut], examples[cut:]
    if len(tr) < cfg.n_train or len(ho) < cfg.n_eval:
        raise UserError(f"{who}: {len(tr)} training-period and {len(ho)} held-out replies, need {cfg.n_train} "
                        f"and {cfg.n_eval} (lower --n-train/--n-eval or pick another user)")
    return tr, ho


def select_users(cfg: DataConfig, convs=None) -> tuple[list[str], dict[str, list[Example]]]:
    """The ``cfg.users`` senders with the most replies (each with enough for both periods), and all replies."""
    from edgecloud.personal.chitchat import load_conversations

    by = replies_by_sender(convs if convs is not None else load_conversations())
    ranked = sorted(by, key=lambda s: (-len(by[s]), s))
    need = max(cfg.min_replies, int(np.ceil(cfg.n_train / cfg.train_frac)),
               int(np.ceil(cfg.n_eval / (1 - cfg.train_frac))))
    eligible = [s for s in ranked if len(by[s]) >= need]
    if len(eligible) < cfg.users:
        raise UserError(f"users={cfg.users}: only {len(eligible)} senders have at least {need} replies "
                        f"(lower --users or --n-train)")
    return eligible[:cfg.users], by


def user_periods(cfg: DataConfig, index: int, convs=None) -> tuple[list[Example], list[Example]]:
    """What one device holds: the ``index``-th selected user's (training-period, held-out-period) examples."""
    chosen, by = select_users(cfg, convs)
    if not 0 <= index < len(chosen):
        raise UserError(f"--user {index}: choose 0..{len(chosen) - 1} (the selected users, most replies first)")
    tr, ho = split_user(by[chosen[index]], cfg, f"user {index}")
    return evenly(tr, cfg.n_train), evenly(ho, cfg.n_eval)


def build(cfg: DataConfig, convs=None) -> Dataset:
    """Select users, split in time, pick per-user examples and the candidate sets (deterministic, no seed)."""
    from edgecloud.llm.retrieval import BM25

    chosen, by = select_users(cfg, convs)
    train, evals, pool = [], [], []
    for u, s in enumerate(chosen):
        tr, ho = split_user(by[s], cfg, f"sender {u}")
        train += [Example(u, e.context, e.reply, e.timestamp) for e in evenly(tr, cfg.n_train)]
        picked = evenly(ho, cfg.n_eval)
        evals += [Example(u, e.context, e.reply, e.timestamp) for e in picked]
        pool += [Example(u, e.context, e.reply, e.timestamp) for e in evenly(ho, cfg.negative_pool)]
    bm = BM25([e.context for e in pool])
    cands = []
    for e in evals:
        order = np.argsort(-bm.scores(e.context), kind="stable")
        got, seen = [e.reply], {e.reply.strip().lower()}
        for i in order:
            p = pool[i]
            key = p.reply.strip().lower()
            if p.user != e.user and key not in seen:
                got.append(p.reply)
                seen.add(key)
                if len(got) == cfg.n_candidates:
                    break
        cands.append(got)
    return Dataset(cfg, chosen, train, evals, cands)
