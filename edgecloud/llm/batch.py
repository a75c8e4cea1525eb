"""Batched prefill and decode over sequences of different lengths, with continuous batching.

Layout: one preallocated KV buffer for the whole batch, (layers, batch, kv_heads, capacity, head_dim),
**left-padded** to a common number of slots, plus a (batch, slots) 0/1 mask of which slots hold a real token; a
decode step writes its keys/values into the next free slot in place (the buffer regrows by half when full). Each
sequence keeps its own position counter, so RoPE sees the same positions as when the sequence runs alone, and
attention never looks at a masked slot: a batched row computes exactly what the sequence computes alone (tested
to 1e-4 in fp32). Two layer loops run on the buffer: the fused one (:mod:`edgecloud.llm.fused`) for a plain Llama
decoder, and transformers' own model (a ``DynamicCache`` over the used slots) for anything else, e.g. a model whose
``q_proj`` carries a LoRA wrapper. Left padding rather than a ragged layout keeps attention one dense SDPA call;
the price is padding slots, kept small by trimming columns that no sequence uses.

Continuous batching: :meth:`Batch.add` prefills newcomers on their own and splices their KV into the running
cache between decode steps; :meth:`Batch.remove` drops finished sequences. Nothing already in flight is
recomputed. :meth:`Batch.rollback` cuts one sequence back to fewer tokens (speculative decoding rejects drafted
tokens): its later slots are masked out, and its next token reuses the freed positions. :meth:`Batch.add_after`
joins a sequence whose prefix KV is already computed (a cached static passage) and prefills only the rest.

Per-sequence metadata during a forward pass: :attr:`Batch.row_ids` lists which sequence each batch row belongs to
while :meth:`Batch.add` / :meth:`Batch.step` run the model (``current_rows()`` returns it), so a wrapper around a
layer (a per-request LoRA adapter, say) can look up its sequence.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from edgecloud.errors import UserError

_ACTIVE = threading.local()  # per thread: two batches stepping in worker threads at once (DRAGON's two sides in
# one process, asyncio.to_thread) must neither see nor, restoring out of order, leak each other's rows


def current_rows() -> list[Hashable] | None:
    """The sequence id of each batch row in the forward pass now running in this thread (None outside one)."""
    return getattr(_ACTIVE, "rows", None)


@contextmanager
def _rows(ids: list[Hashable]):
    prev, _ACTIVE.rows = current_rows(), list(ids)
    try:
        yield
    finally:
        _ACTIVE.rows = prev


@dataclass
class Sequence_:
    """One sequence in flight: its sampling settings, generated tokens and timings."""

    id: Hashable
    prompt_len: int
    max_new_tokens: int = 32
    temperature: float = 0.0
    seed: int = 0
    length: int = 0  # tokens in the cache (prompt + fed tokens)
    tokens: list[int] = field(default_factory=list)
    logits: torch.Tensor | None = None  # logits for the next token
    ttft_s: float = 0.0
    done: bool = False
    generator: torch.Generator | None = None

    def choose(self) -> int:
        """The next token from :attr:`logits`: argmax at temperature 0, else a seeded sample."""
        if self.temperature > 0:
            if self.generator is None:
                self.generator = torch.Generator().manual_seed(self.seed)
            p = torch.softmax(self.logits / self.temperature, -1)
            return int(torch.multinomial(p, 1, generator=self.generator))
        return int(self.logits.argmax())


def _check_prompts(engine, prompts: Sequence[Sequence[int]], ids: Sequence[Hashable]) -> None:
    for sid, p in zip(ids, prompts):
        if len(p) == 0:
            raise UserError(f"request {sid!r}: empty prompt; give at least one token of text")
        if len(p) > engine.context:
            raise UserError(f"request {sid!r}: prompt has {len(p)} tokens, more than the model's context of "
                            f"{engine.context}; shorten it")


def _left_pad(rows: list[torch.Tensor], width: int, dim: int) -> torch.Tensor:
    """Stack per-sequence tensors along dim 0 after left-padding ``dim`` with zeros to ``width``."""
    out = []
    for r in rows:
        pad = width - r.shape[dim]
        if pad:
            shape = list(r.shape)
            shape[dim] = pad
            r = torch.cat([torch.zeros(shape, dtype=r.dtype), r], dim=dim)
        out.append(r)
    return torch.cat(out, 0)


def _pad_prompts(prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded token ids, 0/1 mask and per-sequence positions (each sequence starts at position 0)."""
    lens = [len(p) for p in prompts]
    width = max(lens)
    tok = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for r, p in enumerate(prompts):
        tok[r, width - lens[r]:] = torch.as_tensor(list(p), dtype=torch.long)
        mask[r, width - lens[r]:] = 1
    return tok, mask, (mask.cumsum(1) - 1).clamp(min=0)


@torch.inference_mode()
def last_logits(engine, prompts: Sequence[Sequence[int]], n: int) -> torch.Tensor:
    """Teacher-forced logits at the last ``n`` positions of every prompt, in one left-padded pass: (batch, n, vocab).

    What :meth:`Engine.logits_for` gives per prompt (same positions, masked padding), for scoring several
    sequences (documents + a target text, say) at once without a cache."""
    ids = list(range(len(prompts)))
    _check_prompts(engine, prompts, ids)
    if any(len(p) < n for p in prompts):
        raise UserError(f"last_logits: every prompt needs at least n={n} tokens")
    tok, mask, pos = _pad_prompts(prompts)
    with _rows(ids):
        out = engine.model(input_ids=tok, attention_mask=mask, position_ids=pos, use_cache=False, logits_to_keep=n)
    return out.logits[:, -n:].float()


class Batch:
    """Sequences decoding together on one :class:`~edgecloud.llm.engine.Engine`."""

    def __init__(self, engine):
        self.engine = engine
        self.seqs: dict[Hashable, Sequence_] = {}
        self.row_ids: list[Hashable] = []
        self.mask = torch.zeros(0, 0, dtype=torch.long)  # (batch, slots)
        # the KV cache, preallocated: (layers, batch, kv_heads, capacity, head_dim); slots 0..mask.shape[1] in use
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.row_ids)

    @property
    def active(self) -> list[Sequence_]:
        return [self.seqs[i] for i in self.row_ids]

    @property
    def kv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (batch, kv_heads, slots, head_dim) views of the cache."""
        w = self.mask.shape[1]
        return [(self.k[i, :, :, :w], self.v[i, :, :, :w]) for i in range(len(self.k))] if self.k is not None else []

    # ------------------------------------------------------------------ cache plumbing
    def _reserve(self, slots: int) -> None:
        """Make room for ``slots`` slots (grown by half again when full, so appends stay amortised O(1))."""
        if self.k is None or slots <= self.k.shape[3]:
            return
        cap = slots + max(16, slots // 2)
        w = self.mask.shape[1]
        k = self.k.new_zeros(*self.k.shape[:3], cap, self.k.shape[4])
        v = torch.zeros_like(k)
        k[:, :, :, :w], v[:, :, :, :w] = self.k[:, :, :, :w], self.v[:, :, :, :w]
        self.k, self.v = k, v

    def _trim(self) -> None:
        """Drop leading slot columns that no sequence uses (after removals and rollbacks)."""
        if self.mask.numel() == 0:
            return
        used = self.mask.any(0).nonzero()
        first = int(used[0]) if len(used) else self.mask.shape[1]
        if first:
            self.mask = self.mask[:, first:]
            self.k, self.v = self.k[:, :, :, first:], self.v[:, :, :, first:]

    def _run_hf(self, tok, mask, pos, start: int, k: torch.Tensor, v: torch.Tensor):
        """The transformers path (any model, any wrapper): a ``DynamicCache`` over slots ``:start`` of ``k``/``v``;
        the pass's new keys/values are written into slots ``start..``. Returns last-position logits."""
        from transformers import DynamicCache

        cache = DynamicCache()
        if start:
            for i in range(len(k)):
                cache.update(k[i, :, :, :start], v[i, :, :, :start], i)
        out = self.engine.model(input_ids=tok, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True,
                                logits_to_keep=1)
        for i, layer in enumerate(cache.layers):
            k[i, :, :, start:start + tok.shape[1]] = layer.keys[:, :, start:]
            v[i, :, :, start:start + tok.shape[1]] = layer.values[:, :, start:]
        return out.logits[:, -1].float()

    # ------------------------------------------------------------------ membership
    @torch.inference_mode()
    def add(self, prompts: dict[Hashable, Sequence[int]], max_new_tokens: int = 32, temperature: float = 0.0,
            seed: int | dict[Hashable, int] = 0) -> dict[Hashable, torch.Tensor]:
        """Prefill new sequences (one left-padded pass) and join them to the batch; returns their next-token
        logits. ``seed`` is one seed for all or one per id."""
        ids = list(prompts)
        clash = [i for i in ids if i in self.seqs]
        if clash:
            raise UserError(f"request {clash[0]!r}: a sequence with this id is already in the batch")
        _check_prompts(self.engine, [prompts[i] for i in ids], ids)
        if not ids:
            return {}
        t0 = time.perf_counter()
        lens = [len(prompts[i]) for i in ids]
        tok, mask, pos = _pad_prompts([prompts[i] for i in ids])
        n = tok.shape[1]
        k, v = self.engine.new_kv(len(ids), n + max(16, max_new_tokens + 1))
        fused = self.engine.fused()
        with _rows(ids):
            if fused is not None:
                valid = mask.bool()
                allowed = None  # no padding: SDPA's causal kernel, no mask
                if not bool(valid.all()):
                    causal = torch.ones(n, n, dtype=torch.bool).tril()
                    # pad rows see themselves
                    allowed = ((valid[:, None, :] & causal) | torch.eye(n, dtype=torch.bool)).unsqueeze(1)
                logits = fused.logits(fused.forward(tok, pos, k, v, 0, allowed))
            else:
                logits = self._run_hf(tok, mask, pos, 0, k, v)
        ttft = time.perf_counter() - t0
        self._splice(ids, mask, k, v)
        res = {}
        for r, i in enumerate(ids):
            s = seed[i] if isinstance(seed, dict) else seed
            self.seqs[i] = Sequence_(i, lens[r], max_new_tokens, temperature, s, lens[r], logits=logits[r],
                                     ttft_s=ttft)
            res[i] = logits[r]
        return res

    @torch.inference_mode()
    def add_after(self, seq_id: Hashable, prefix_kv: tuple[torch.Tensor, torch.Tensor], suffix: Sequence[int],
                  max_new_tokens: int = 32, temperature: float = 0.0, seed: int = 0) -> torch.Tensor:
        """Join a sequence whose first ``P`` tokens' keys/values are already computed (``prefix_kv``: stacked
        (layers, kv_heads, P, head_dim) at positions 0..P-1, e.g. a cached static passage, :meth:`Engine.kv_of`):
        only ``suffix`` is prefilled, at positions P.., attending causally over the prefix and itself. The same
        maths as prefilling prefix + suffix in one pass (a causal prefix's KV does not depend on what follows it;
        tested to 1e-5 in log-probability). Returns the next-token logits."""
        if seq_id in self.seqs:
            raise UserError(f"request {seq_id!r}: a sequence with this id is already in the batch")
        pk, pv = prefix_kv
        want = self.engine.new_kv(1, 1)[0].shape
        if pk.dim() != 4 or pk.shape != pv.shape or (pk.shape[0], pk.shape[1], pk.shape[3]) != \
                (want[0], want[2], want[4]):
            raise UserError(f"request {seq_id!r}: prefix KV of shape {tuple(pk.shape)}/{tuple(pv.shape)} does not fit "
                            f"this model (layers, kv_heads, tokens, head_dim) = ({want[0]}, {want[2]}, P, {want[4]})")
        p, s = pk.shape[2], len(suffix)
        _check_prompts(self.engine, [range(p + s)], [seq_id])
        if s == 0:
            raise UserError(f"request {seq_id!r}: empty suffix after the cached prefix; give at least one token")
        n = p + s
        k, v = self.engine.new_kv(1, n + max(16, max_new_tokens + 1))
        k[:, 0, :, :p], v[:, 0, :, :p] = pk, pv
        tok = torch.as_tensor([list(suffix)], dtype=torch.long)
        pos = torch.arange(p, n).unsqueeze(0)
        mask = torch.ones(1, n, dtype=torch.long)
        t0 = time.perf_counter()
        fused = self.engine.fused()
        with _rows([seq_id]):
            if fused is not None:
                allowed = torch.ones(s, n, dtype=torch.bool).tril(p)[None, None]  # suffix row i sees slots <= p + i
                logits = fused.logits(fused.forward(tok, pos, k, v, p, allowed))
            else:
                logits = self._run_hf(tok, mask, pos, p, k, v)
        self._splice([seq_id], mask, k, v)
        self.seqs[seq_id] = Sequence_(seq_id, n, max_new_tokens, temperature, seed, n, logits=logits[0],
                                      ttft_s=time.perf_counter() - t0)
        return logits[0]

    def _splice(self, ids: list[Hashable], mask: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Join newcomers (their mask (b, n) and KV buffers) to the batch, left-padding the narrower side."""
        if not self.row_ids:
            self.row_ids, self.mask, self.k, self.v = list(ids), mask, k, v
            return
        w0, w1 = self.mask.shape[1], mask.shape[1]
        width = max(w0, w1)
        b0 = len(self.row_ids)
        kk, vv = self.engine.new_kv(b0 + len(ids), width + max(16, k.shape[3] - w1, self.k.shape[3] - w0))
        kk[:, :b0, :, width - w0:width], vv[:, :b0, :, width - w0:width] = self.k[:, :, :, :w0], self.v[:, :, :, :w0]
        kk[:, b0:, :, width - w1:width], vv[:, b0:, :, width - w1:width] = k[:, :, :, :w1], v[:, :, :, :w1]
        self.k, self.v = kk, vv
        self.mask = _left_pad([self.mask, mask], width, 1)
        self.row_ids += ids

    @torch.inference_mode()
    def remove(self, *ids: Hashable) -> list[Sequence_]:
        """Take sequences out of the batch (finished or cancelled); the others keep their cache untouched."""
        gone = [self.seqs.pop(i) for i in ids if i in self.seqs]
        keep = [r for r, i in enumerate(self.row_ids) if i in self.seqs]
        if len(keep) == len(self.row_ids):
            return gone
        idx = torch.tensor(keep, dtype=torch.long)
        self.row_ids = [self.row_ids[r] for r in keep]
        self.mask = self.mask.index_select(0, idx)
        if self.k is not None:
            self.k, self.v = self.k.index_select(1, idx), self.v.index_select(1, idx)
        self._trim()
        return gone
    @torch.inference_mode()
    def rollback(self, seq_id: Hashable, keep: int) -> None:
        """Cut ``seq_id`` back to its first ``keep`` tokens (prompt included): later slots are masked out.

        The next :meth:`step` feeds the token at position ``keep``; call :meth:`logits_at` first if the caller
        needs the distribution there (the last kept token's logits are not stored)."""
        s = self.seqs[seq_id]
        if not 1 <= keep <= s.length:
            raise UserError(f"request {seq_id!r}: rollback to {keep} tokens, but it holds {s.length}")
        r = self.row_ids.index(seq_id)
        slots = self.mask[r].nonzero().flatten()
        self.mask[r, slots[keep:]] = 0
        dropped = s.length - keep
        s.length = keep
        if dropped and s.tokens:
            del s.tokens[max(0, len(s.tokens) - dropped):]
        s.logits = None
        self._trim()

    # ------------------------------------------------------------------ decoding
    @torch.inference_mode()
    def step(self, feed: dict[Hashable, int] | None = None) -> dict[Hashable, torch.Tensor]:
        """One decode step for every sequence in the batch.

        ``feed`` gives the token to append per sequence id; a sequence not named there appends the token it
        chooses itself from its logits (argmax or its seeded sample), which is also recorded in ``tokens``.
        Returns each sequence's logits for the following token."""
        if not self.row_ids:
            return {}
        feed = dict(feed or {})
        toks = []
        for i in self.row_ids:
            s = self.seqs[i]
            if i not in feed:
                if s.logits is None:
                    raise UserError(f"request {i!r}: no logits to choose from after a rollback; feed a token")
                feed[i] = s.choose()
            toks.append(feed[i])
            s.tokens.append(int(feed[i]))
        b = len(self.row_ids)
        pos = torch.tensor([[self.seqs[i].length] for i in self.row_ids])
        for i in self.row_ids:
            s = self.seqs[i]
            if s.length + 1 > self.engine.context:
                raise UserError(f"request {i!r}: reached the model's context of {self.engine.context} tokens")
        w = self.mask.shape[1]
        self._reserve(w + 1)
        self.mask = torch.cat([self.mask, torch.ones(b, 1, dtype=torch.long)], 1)
        tok = torch.tensor(toks).reshape(b, 1)
        fused = self.engine.fused()
        with _rows(self.row_ids):
            if fused is not None:
                allowed = self.mask.bool()[:, None, None, :]
                logits = fused.logits(fused.forward(tok, pos, self.k, self.v, w, allowed))
            else:
                logits = self._run_hf(tok, self.mask, pos, w, self.k, self.v)
        res = {}
        for r, i in enumerate(self.row_ids):
            s = self.seqs[i]
            s.length += 1
            s.logits = logits[r]
            res[i] = logits[r]
        return res

    def finished(self) -> list[Hashable]:
        """Ids whose last token was a stop token or who reached ``max_new_tokens``."""
        stop = self.engine.eos_ids
        out = []
        for i in self.row_ids:
            s = self.seqs[i]
            if s.tokens and (s.tokens[-1] in stop or len(s.tokens) >= s.max_new_tokens):
                s.done = True
                out.append(i)
        return out


@dataclass
class BatchOutput:
    id: Hashable
    tokens: list[int]
    text: str
    ttft_s: float
    first_logits: torch.Tensor


def generate_batch(engine, prompts: Sequence[str | Sequence[int]], max_new_tokens: int = 32,
                   temperature: float | Sequence[float] = 0.0, seed: int | Sequence[int] = 0) -> list[BatchOutput]:
    """Generate for several prompts at once (text or token ids); per-prompt temperature and seed allowed.

    The same tokens as :meth:`Engine.generate` per prompt (greedy exactly; sampling with the same seed)."""
    ids = [p if not isinstance(p, str) else engine.encode_prompt(p) for p in prompts]
    n = len(ids)
    temps = list(temperature) if isinstance(temperature, Sequence) else [temperature] * n
    seeds = list(seed) if isinstance(seed, Sequence) else [seed] * n
    batch = Batch(engine)
    first: dict[int, torch.Tensor] = {}
    for t in sorted(set(temps)):  # sequences sharing a temperature prefill together
        group = [i for i in range(n) if temps[i] == t]
        first.update(batch.add({i: ids[i] for i in group}, max_new_tokens, t, {i: seeds[i] for i in group}))
    results: dict[int, Sequence_] = {}
    while len(batch):
        # choose this step's tokens; sequences that just chose a stop token (or hit the cap) leave first
        chosen = {}
        for s in batch.active:
            chosen[s.id] = s.choose()
        done = []
        for s in batch.active:
            t = chosen[s.id]
            if t in engine.eos_ids or len(s.tokens) + 1 >= s.max_new_tokens:
                s.tokens.append(t)
                done.append(s.id)
        for s in batch.remove(*done):
            results[s.id] = s
        if len(batch):
            batch.step({i: chosen[i] for i in batch.row_ids})
    return [BatchOutput(i, results[i].tokens, engine.decode_text(results[i].tokens) if engine.tok else "",
                        results[i].ttft_s, first[i]) for i in range(n)]
