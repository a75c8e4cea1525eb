"""The cloud's passage KV cache: its public passages are static, so each one's KV is computed once and reused.

Per-document prompts are laid out ``[chat head][system text + passage]<|im_end|>[question turn][assistant tail]``
(:func:`edgecloud.rag.node.contexts_for`): everything up to the ``<|im_end|>`` that closes the passage is the same
for every question, and it is a *prefix* of the prompt, so its keys/values (causal attention: a prefix's KV does
not depend on what follows) are exactly those a full prefill computes. A question then prefills only the suffix after
it (:meth:`edgecloud.llm.batch.Batch.add_after`). The prefix is used only when its own tokenization is a token
prefix of the whole prompt's (``<|im_end|>`` is a special token, so BPE never merges across it; a model whose
template would merge gets a full prefill, counted as ``unaligned``).

Entries live in the memory tier of the shared :class:`edgecloud.kvcache.store.KVStore` (LRU under a byte budget),
keyed by sha256(model fingerprint, prefix token ids): another model, another passage text or another template is
another key, so a stale entry is never used. The device keeps no such cache (docs/dragon.md says why).
"""

from __future__ import annotations

import torch

from edgecloud.errors import UserError
from edgecloud.kvcache.store import KVStore, chunk_key


class PassageKV:
    """``kv(prefix_ids)``: the cached (K, V) of a static prompt prefix, computed on a miss; ``mem_bytes`` caps it."""

    def __init__(self, engine, mem_bytes: int = 1 << 30):
        if mem_bytes <= 0:
            raise UserError(f"passage KV cache of {mem_bytes} bytes: give a budget > 0 (or no cache at all)")
        self.e = engine
        self.fingerprint = engine.lm.fingerprint
        self.store = KVStore(None, self.fingerprint, mem_bytes=mem_bytes)
        self.stats = {"hits": 0, "misses": 0, "unaligned": 0, "tokens_reused": 0}

    def key(self, prefix_ids) -> str:
        return chunk_key(self.fingerprint, ids=prefix_ids)

    def kv(self, prefix_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        key = self.key(prefix_ids)
        hit = self.store.get(key)
        if hit is not None and hit[0].shape[2] == len(prefix_ids):
            self.stats["hits"] += 1
            self.stats["tokens_reused"] += len(prefix_ids)
            return hit
        self.stats["misses"] += 1
        k, v = self.e.kv_of(prefix_ids)
        self.store.put(key, k, v, disk=False)
        return k, v

    @property
    def bytes_used(self) -> int:
        return self.store.mem_used

    def precompute(self, prefixes) -> int:
        """Fill the cache with these prefixes (in order; later ones evict earlier ones past the budget)."""
        for ids in prefixes:
            self.kv(list(ids))
        return self.bytes_used


def prefix_len(engine, ids: list[int], prefix_text: str) -> int:
    """Tokens of ``prefix_text`` when they are a token prefix of ``ids`` (with at least one token after), else 0."""
    p = engine.encode_prompt(prefix_text)
    return len(p) if 0 < len(p) < len(ids) and ids[: len(p)] == p else 0
