"""Per-side REPLUG mixing, the exact cross-side mixture, and the speculative acceptance rule.

A side holds ``n`` retrieved documents, each its own sequence (document + prompt + generated tokens), decoded
together as one batch on :mod:`edgecloud.llm.batch`.
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
from edgecloud.llm.batch import Batch, last_logits


def combine(parts: list[tuple[float, torch.Tensor]], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Log of the cross-side mixture from each side's (log W_s, log q_s), computed in float64, returned as
    ``dtype`` (float32: what the protocol verifies with; float64: for exactness measurements)."""
    lw = torch.tensor([float(w) for w, _ in parts], dtype=torch.float64)
    stacked = torch.stack([q.double() for _, q in parts])
    return (torch.logsumexp(lw[:, None] + stacked, 0) - torch.logsumexp(lw, 0)).to(dtype)


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
    """One side's documents decoding in step, as one batch on the shared batched engine (one model call per token
    for all of them). ``contexts``: token ids per document (may hold a single no-retrieval prompt)."""

    def __init__(self, engine, contexts: list[list[int]], scores, tau: float = 0.05, reweight: bool = True,
                 kv=None, prefix: list[int] | None = None):
        if not contexts:
            raise UserError("a side needs at least one context (an empty one means no retrieval)")
        self.e, self.contexts, self.reweight = engine, contexts, reweight
        # static-prefix KV reuse (the cloud's passages, :mod:`edgecloud.rag.prefix`): ``prefix[i]`` tokens of
        # context i come from ``kv`` (a PassageKV); 0 = prefill it all
        self.kv, self.prefix = kv, list(prefix) if prefix is not None else [0] * len(contexts)
        if len(self.prefix) != len(contexts):
            raise UserError(f"a side with {len(contexts)} contexts got {len(self.prefix)} prefix lengths")
        self.prior = torch.tensor([float(s) / tau for s in scores], dtype=torch.float64)
        self.batch: Batch | None = None
        self.lens: list[int] = []
        self.n = 0  # generated tokens fed so far
        self.hist: list[tuple[torch.Tensor, torch.Tensor]] = []  # (logw, logp) before each fed token

    def start(self, prompt_ids: list[int]) -> None:
        """Prefill every document + prompt, each on its own, into one batch. One left-padded pass would compute
        every document at the longest one's length (retrieved passages here differ up to 2x: 154 vs 320 tokens),
        and prefill is the bulk of time to first token; decode steps still run all documents as one batch. With a
        passage KV cache only each document's suffix after its cached prefix is prefilled."""
        self.prompt = list(prompt_ids)
        seqs = [list(ctx) + self.prompt for ctx in self.contexts]
        for ids in seqs:
            self.e.check_length(len(ids) + 1, "document + prompt")
        self.lens = [len(ids) for ids in seqs]
        self.batch = Batch(self.e)
        logits = {}
        for i, ids in enumerate(seqs):
            p = self.prefix[i] if self.kv is not None else 0
            if p:  # only the suffix after the cached passage is prefilled: exact (a causal prefix's KV)
                logits[i] = self.batch.add_after(i, self.kv.kv(ids[:p]), ids[p:])
            else:
                logits |= self.batch.add({i: ids})
        self.logp = _rows_logp(logits, len(seqs))
        self.logw = self.prior.clone()
        self.n, self.hist = 0, []

    def dist(self, dtype: torch.dtype = torch.float32) -> tuple[float, torch.Tensor]:
        """(log W_s, log q_s) for the next token; float32 is what travels, float64 keeps every bit computed."""
        lw = torch.logsumexp(self.logw, 0)
        return float(lw), (torch.logsumexp(self.logw[:, None] + self.logp, 0) - lw).to(dtype)

    def advance(self, token: int) -> None:
        """Feed ``token`` to every document's sequence (one batched decode step) and update the scores."""
        self.hist.append((self.logw, self.logp))
        if self.reweight:
            self.logw = self.logw + self.logp[:, token]
        self.e.check_length(max(self.lens) + self.n + 2, "document + prompt + answer")
        self.logp = _rows_logp(self.batch.step(dict.fromkeys(range(len(self.lens)), token)), len(self.lens))
        self.n += 1

    def rollback(self, keep: int) -> None:
        """Back to the state after ``keep`` generated tokens: every document's KV cut back (the batch masks the
        dropped slots), document scores and next-token distributions restored."""
        if keep >= self.n:
            return
        self.logw, self.logp = self.hist[keep]
        del self.hist[keep:]
        for i, n in enumerate(self.lens):
            held = self.batch.seqs[i].length
            if held > n + keep:
                self.batch.rollback(i, n + keep)
        self.n = keep

    def score(self, prompt_ids: list[int], target: list[int]) -> torch.Tensor:
        """Teacher-forced log-probability of each target token under this side's mixture (one batched pass)."""
        seqs = [list(ctx) + list(prompt_ids) + list(target) for ctx in self.contexts]
        for ids in seqs:
            self.e.check_length(len(ids), "document + window")
        return scored_mixture(self.prior, target_logprobs(self.e, seqs, target), self.reweight)


def target_logprobs(engine, seqs: list[list[int]], target: list[int]) -> torch.Tensor:
    """Log-probability (docs, T) of ``target`` (the last T tokens of every sequence) per sequence, one batched
    pass on the shared engine."""
    logits = last_logits(engine, seqs, len(target) + 1)[:, :-1].double()
    lp = torch.log_softmax(logits, -1)
    return lp[:, torch.arange(len(target)), torch.as_tensor(target)]


def _rows_logp(logits: dict, n: int) -> torch.Tensor:
    return torch.log_softmax(torch.stack([logits[i] for i in range(n)]).double(), -1)


def scored_mixture(prior: torch.Tensor, per: torch.Tensor, reweight: bool) -> torch.Tensor:
    """Mixture log-prob per position from per-document log-probs of the observed tokens (docs, T)."""
    before = torch.cumsum(per, 1) - per if reweight else torch.zeros_like(per)
    lw = prior[:, None] + before
    return torch.logsumexp(lw + per, 0) - torch.logsumexp(lw, 0)


def log_ppl(token_logprobs: list[torch.Tensor]) -> float:
    lp = torch.cat(token_logprobs)
    return math.exp(-float(lp.mean()))
