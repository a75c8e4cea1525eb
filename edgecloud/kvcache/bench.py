"""MPIC benchmark: RAG requests over the pydoc corpus, every method side by side on the same requests.

Methods: full prefill (reference), prefix caching (longest exact token prefix shared with an earlier request, like
vLLM's automatic prefix caching, token-granular so generous to it), full reuse (MPIC-0), CacheBlend-r and MPIC-k.
Chunks are ingested (KV computed and stored) before the requests, as MPIC does when documents arrive; loading them
from the store (memory tier over disk) counts in TTFT. Quality is measured against full prefill by teacher-forcing
full prefill's greedy answer through each method's cache: top-1 agreement and KL per answer step; the greedy answer is
identical iff top-1 agrees at every step, which gives the exact-match rate without decoding each method separately.
Decoding a token costs the same whatever built the cache, so total response time = TTFT + the measured decode time.
"""

from __future__ import annotations

import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from edgecloud.kvcache.mpic import MPIC, Segment, text
from edgecloud.kvcache.selection import CacheBlend, MPICk
from edgecloud.kvcache.store import KVStore
from edgecloud.llm.engine import Engine, cache_from_kv, stack_kv
from edgecloud.llm.prompts import chat_head, chat_tail

SYSTEM = "You are a helpful assistant. Answer the question briefly, using the documents the user gives."


@dataclass
class BenchConfig:
    groups: int = 6  # distinct questions
    per_group: int = 4  # requests per question (same passage pool, other subsets and orders)
    pool: int = 8  # passages retrieved per question
    min_chunks: int = 4
    max_chunks: int = 8
    chunk_tokens: int = 256  # passages are cut to this many tokens
    answer_tokens: int = 24
    ks: tuple[int, ...] = (4, 8, 16, 32, 64)
    k: int = 32  # the chosen k reported as ``ttft_mpic_s``
    blend_r: float = 0.15
    mem_mb: int = 64
    seed: int = 0

    @classmethod
    def quick(cls, seed: int = 0) -> BenchConfig:
        return cls(groups=3, per_group=2, pool=5, min_chunks=4, max_chunks=5, chunk_tokens=160, answer_tokens=12,
                   seed=seed)


@dataclass
class Request:
    question: str
    passages: list[str]  # passage ids, in prompt order
    segments: list[Segment] = field(default_factory=list)


def make_workload(engine: Engine, cfg: BenchConfig) -> list[Request]:
    from edgecloud.llm.corpus import passages
    from edgecloud.llm.retrieval import BM25

    ps = passages()
    by_id = {p.id: p for p in ps}
    bm = BM25([p.text for p in ps])
    rng = random.Random(cfg.seed)
    topics = sorted({p.topic for p in ps})
    rng.shuffle(topics)
    head = _system_head(engine)
    reqs = []
    for topic in topics[: cfg.groups]:
        q = f"What does the Python documentation say about {topic.replace('-', ' ')}? Answer in one sentence."
        pool = [ps[i].id for i in bm.top(q, cfg.pool)]
        for _ in range(cfg.per_group):
            n = rng.randint(cfg.min_chunks, min(cfg.max_chunks, len(pool)))
            chosen = rng.sample(pool, n)
            segs = [Segment("chunk", engine.encode(head), label="system")]
            for pid in chosen:
                ids = engine.encode(f"Document [{pid}]:\n{by_id[pid].text}")[: cfg.chunk_tokens]
                segs.append(Segment("chunk", ids + engine.encode("\n\n"), label=pid))
            segs.append(text(engine, _tail(engine, q)))
            reqs.append(Request(q, chosen, segs))
    return reqs


def _system_head(engine: Engine) -> str:
    return chat_head(SYSTEM, engine.lm.chat)


def _tail(engine: Engine, q: str) -> str:
    return f"Question: {q}" + chat_tail(engine.lm.chat)


class PrefixCache:
    """Exact-prefix reuse: the KV of earlier prompts; a new prompt reuses its longest common token prefix."""

    def __init__(self, capacity: int = 16):
        self.entries: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.capacity = capacity

    def prefill(self, engine: Engine, ids: list[int]):
        t = torch.tensor(ids)
        best, hit = 0, None
        for e_ids, k, v in self.entries:
            m = min(len(e_ids), len(t))
            neq = (e_ids[:m] != t[:m]).nonzero()
            lcp = int(neq[0]) if len(neq) else m
            if lcp > best:
                best, hit = lcp, (k, v)
        best = min(best, len(ids) - 1)  # at least one token must run to produce logits
        cache = cache_from_kv(hit[0][:, :, :best], hit[1][:, :, :best]) if best > 0 else None
        logits, cache = engine.prefill(ids[best:], cache=cache)
        return logits, cache, best

    def add(self, ids: list[int], cache) -> None:
        k, v = stack_kv(cache)
        self.entries.append((torch.tensor(ids), k[:, :, : len(ids)].clone(), v[:, :, : len(ids)].clone()))
        self.entries = self.entries[-self.capacity :]


def _quality(engine: Engine, ref_logits: torch.Tensor, answer: list[int], logits0: torch.Tensor, cache) -> dict:
    """Teacher-force ``answer`` through ``cache``: per-step top-1 agreement and KL(ref || method)."""
    rest = engine.logits_for(answer[:-1], cache) if len(answer) > 1 else torch.empty(0, logits0.shape[-1])
    got = torch.cat([logits0[None], rest])
    p, q = torch.log_softmax(ref_logits, -1), torch.log_softmax(got, -1)
    kl = (p.exp() * (p - q)).sum(-1)
    agree = got.argmax(-1) == torch.tensor(answer)
    return {"top1": float(agree.float().mean()), "kl": float(kl.mean()), "exact": bool(agree.all())}


def run(engine: Engine, cfg: BenchConfig, store_dir: str | Path | None = None, progress=None) -> dict:
    torch.manual_seed(cfg.seed)
    reqs = make_workload(engine, cfg)
    tmp = None
    if store_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="mpic-bench-")
        store_dir = tmp.name
    store = KVStore(store_dir, engine.lm.fingerprint, mem_bytes=cfg.mem_mb << 20)
    system = MPIC(engine, store)
    methods = {"full-reuse": MPICk(0), f"cacheblend-{round(cfg.blend_r * 100)}": CacheBlend(cfg.blend_r)}
    methods.update({f"mpic-{k}": MPICk(k) for k in cfg.ks})
    t0 = time.perf_counter()
    for r in reqs:  # documents arrive: compute and store their KV (not part of any request's TTFT)
        for s in r.segments:
            if s.kind == "chunk":
                system.ingest(s)
    ingest_s = time.perf_counter() - t0
    prefix = PrefixCache()
    rows: dict[str, list[dict]] = {m: [] for m in ["full", "prefix", *methods]}
    for i, r in enumerate(reqs):
        ids = [t for s in r.segments for t in s.ids]
        # reference: full prefill, then greedy decode of the answer with per-token times
        t = time.perf_counter()
        logits, cache = engine.prefill(ids)
        ttft = time.perf_counter() - t
        answer, times = engine.greedy(cache, logits, cfg.answer_tokens)
        decode_s = sum(times)
        ref = torch.cat([logits[None], _ref_rest(engine, ids, answer)])
        rows["full"].append({"ttft": ttft, "total": ttft + decode_s, "top1": 1.0, "kl": 0.0, "exact": True,
                             "recomputed": len(ids), "tokens": len(ids)})
        t = time.perf_counter()
        pl, pc, reused = prefix.prefill(engine, ids)
        ttft = time.perf_counter() - t
        prefix.add(ids, pc)
        q = _quality(engine, ref, answer, pl, pc)
        rows["prefix"].append({"ttft": ttft, "total": ttft + decode_s, **q, "recomputed": len(ids) - reused,
                               "tokens": len(ids)})
        for name, sel in methods.items():
            res = system.prefill(r.segments, sel)
            ttft = res.timings["ttft_s"]
            q = _quality(engine, ref, answer, res.logits, res.cache)
            rows[name].append({"ttft": ttft, "total": ttft + decode_s, **q, "recomputed": res.n_recomputed,
                               "tokens": res.n_tokens})
        if progress:
            progress(i + 1, len(reqs))
    system.close()
    if tmp is not None:
        tmp.cleanup()
    return summarize(rows, cfg, reqs, ingest_s, dict(store.stats), engine)


def _ref_rest(engine: Engine, ids: list[int], answer: list[int]) -> torch.Tensor:
    """Full prefill's logits at every answer step (teacher-forced, from a fresh cache: decode mutated the first)."""
    if len(answer) < 2:
        return torch.empty(0, engine.lm_head.weight.shape[0])
    _, cache = engine.prefill(ids)
    return engine.logits_for(answer[:-1], cache)


def summarize(rows, cfg: BenchConfig, reqs, ingest_s: float, store_stats: dict, engine: Engine) -> dict:
    def mean(xs):
        return sum(xs) / len(xs) if xs else float("nan")

    table = {}
    for m, rs in rows.items():
        table[m] = {"ttft_s": mean([r["ttft"] for r in rs]), "total_s": mean([r["total"] for r in rs]),
                    "top1_agreement": mean([r["top1"] for r in rs]), "kl": mean([r["kl"] for r in rs]),
                    "exact_match_rate": mean([float(r["exact"]) for r in rs]),
                    "recompute_frac": mean([r["recomputed"] / r["tokens"] for r in rs])}
    full, pre, mp = table["full"], table["prefix"], table[f"mpic-{cfg.k}"]
    return {
        "model": engine.lm.name, "requests": len(reqs), "k": cfg.k,
        "prompt_tokens_mean": mean([r["tokens"] for r in rows["full"]]),
        "chunks_mean": mean([len(r.passages) for r in reqs]),
        "ttft_full_s": full["ttft_s"], "ttft_prefix_s": pre["ttft_s"], "ttft_mpic_s": mp["ttft_s"],
        "ttft_ratio_vs_full": mp["ttft_s"] / full["ttft_s"], "ttft_ratio_vs_prefix": mp["ttft_s"] / pre["ttft_s"],
        "total_ratio_vs_prefix": mp["total_s"] / pre["total_s"],
        "exact_match_rate": mp["exact_match_rate"], "top1_agreement": mp["top1_agreement"], "kl": mp["kl"],
        "ingest_s": ingest_s, "store": store_stats, "threads": engine.threads, "seed": cfg.seed,
        "methods": table,
    }
