"""Per-side REPLUG mixing, the exact cross-side mixture, and the speculative acceptance rule.

A side holds ``n`` retrieved documents, each decoded as its own sequence (document + prompt + generated tokens).
Document ``i`` has log weight ``log w_i = s_i / tau + sum_{t' < t} log p_i(y_t')``: its retrieval prior times the
likelihood of the text generated so far (the Bayesian form of REPLUG, so a document that explains the answer gains
weight; ``reweight=False`` keeps the static REPLUG weights). The side's next-token distribution is
``q_s = sum_i w_i p_i / W_s`` with ``W_s = sum_i w_i``, and the mixture of the two sides by ``W_s`` is REPLUG over
the union of their documents exactly: ``sum_s W_s q_s / sum_s W_s = sum_{i in union} w_i p_i / sum w_i``.
Everything is in log space (logsumexp), so a side ships ``(log W_s, log q_s)`` and nothing is lost.
"""

from __future__ import annotations

import math

import torch

from edgecloud.errors import UserError


def combine(parts: list[tuple[float, torch.Tensor]]) -> torch.Tensor:
    """Log of the cross-side mixture from each side's (log W_s, log q_s)."""
    lw = torch.tensor([float(w) for w, _ in parts], dtype=torch.float64)
    stacked = torch.stack([q.double() for _, q in parts])
    return (torch.logsumexp(lw[:, None] + stacked, 0) - torch.logsumexp(lw, 0)).float()


def draft(logq: torch.Tensor, greedy: bool, gen: torch.Generator) -> int:
    if greedy:
        return int(logq.argmax())
    return int(torch.multinomial(logq.double().exp(), 1, generator=gen))


def verify(logp: torch.Tensor, logq: torch.Tensor, token: int, greedy: bool,
           gen: torch.Generator) -> tuple[int, bool]:
    """Speculative acceptance: keep ``token`` (drawn from q) with probability min(1, p/q), else draw from the
    normalized residual max(0, p - q). The output is distributed exactly as p. Greedy: keep iff it is argmax p."""
    if greedy:
        best = int(logp.argmax())
        return best, best == token
    p, q = logp.double().exp(), logq.double().exp()
    u = float(torch.rand((), generator=gen, dtype=torch.float64))
    if u < min(1.0, float(p[token] / q[token])):
        return token, True
    res = (p - q).clamp_min(0)
    if float(res.sum()) <= 0:  # p == q up to rounding: acceptance was certain in exact arithmetic
        return token, True
    return int(torch.multinomial(res / res.sum(), 1, generator=gen)), False


def accept_distribution(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """The output distribution of draft-then-:func:`verify`, computed in closed form (it equals p)."""
    p, q = logp.double().exp(), logq.double().exp()
    keep = torch.minimum(p, q)
    res = (p - q).clamp_min(0)
    rej = 1 - keep.sum()
    return keep + (rej * res / res.sum() if float(res.sum()) > 0 else 0)


class Side:
    """One side's documents decoding in step. ``contexts``: token ids per document (may be empty: no retrieval)."""

    def __init__(self, engine, contexts: list[list[int]], scores, tau: float = 0.05, reweight: bool = True):
        if not contexts:
            raise UserError("a side needs at least one context (an empty one means no retrieval)")
        self.e, self.contexts, self.reweight = engine, contexts, reweight
        self.prior = torch.tensor([float(s) / tau for s in scores], dtype=torch.float64)
        self.caches: list = []
        self.lens: list[int] = []
        self.n = 0  # generated tokens fed so far
        self.hist: list[tuple[torch.Tensor, torch.Tensor]] = []  # (logw, logp) before each fed token

    def start(self, prompt_ids: list[int]) -> None:
        self.caches, self.lens, rows = [], [], []
        self.prompt = list(prompt_ids)
        for ctx in self.contexts:
            ids = list(ctx) + list(prompt_ids)
            self.e.check_length(ids.__len__() + 1, "document + prompt")
            logits, cache = self.e.prefill(ids)
            self.caches.append(cache)
            self.lens.append(len(ids))
            rows.append(logits)
        self.logp = torch.log_softmax(torch.stack(rows).double(), -1)
        self.logw = self.prior.clone()
        self.n, self.hist = 0, []

    def dist(self) -> tuple[float, torch.Tensor]:
        """(log W_s, log q_s) for the next token."""
        lw = torch.logsumexp(self.logw, 0)
        return float(lw), (torch.logsumexp(self.logw[:, None] + self.logp, 0) - lw).float()

    def advance(self, token: int) -> None:
        self.hist.append((self.logw, self.logp))
        if self.reweight:
            self.logw = self.logw + self.logp[:, token]
        for i in range(len(self.caches)):
            self.e.check_length(self.lens[i] + self.n + 2, "document + prompt + answer")
        self.logp = torch.log_softmax(step_docs(self.e, self.caches, token).double(), -1)
        self.n += 1

    def rollback(self, keep: int) -> None:
        """Back to the state after ``keep`` generated tokens: KV caches cropped, document scores restored."""
        if keep >= self.n:
            return
        self.logw, self.logp = self.hist[keep]
        del self.hist[keep:]
        for c, n in zip(self.caches, self.lens):
            extra = c.get_seq_length() - (n + keep)
            if extra > 0:
                c.crop(-extra)  # transformers 5: a negative count removes that many trailing tokens
        self.n = keep

    def score(self, prompt_ids: list[int], target: list[int]) -> torch.Tensor:
        """Teacher-forced log-probability of each target token under this side's mixture (one pass per doc)."""
        rows = []
        for ctx in self.contexts:
            ids = list(ctx) + list(prompt_ids) + list(target)
            self.e.check_length(len(ids), "document + window")
            rows.append(torch.log_softmax(self.e.logits_for(ids, _fresh_cache())[-len(target) - 1 : -1].double(), -1))
        lp = torch.stack(rows)  # (docs, T, V)
        tok = torch.as_tensor(target)
        per = lp[:, torch.arange(len(target)), tok]  # (docs, T)
        return scored_mixture(self.prior, per, self.reweight)


def scored_mixture(prior: torch.Tensor, per: torch.Tensor, reweight: bool) -> torch.Tensor:
    """Mixture log-prob per position from per-document log-probs of the observed tokens (docs, T)."""
    before = torch.cumsum(per, 1) - per if reweight else torch.zeros_like(per)
    lw = prior[:, None] + before
    return torch.logsumexp(lw + per, 0) - torch.logsumexp(lw, 0)


def _fresh_cache():
    from transformers import DynamicCache

    return DynamicCache()


def step_docs(engine, caches: list, token: int) -> torch.Tensor:
    """Next-token logits (docs, vocab) after feeding ``token`` to every document's sequence. The one place a
    side's per-document model calls happen, so the batched engine replaces this loop in one change."""
    return torch.stack([engine.logits_for([token], c)[-1] for c in caches])


def log_ppl(token_logprobs: list[torch.Tensor]) -> float:
    lp = torch.cat(token_logprobs)
    return math.exp(-float(lp.mean()))
