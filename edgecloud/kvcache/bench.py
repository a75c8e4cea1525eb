"""MPIC benchmark: gold-answer QA requests, every method side by side on the same requests.

Workload (:mod:`edgecloud.kvcache.qa`): SQuAD v1.1 dev questions whose prompt holds the gold paragraph among other
paragraphs of the same article, in varying orders, the article's pool shared by its requests; plus passkey requests
(a number planted in one of several passages). Methods: full prefill (reference), prefix caching (longest exact token
prefix shared with an earlier request, like vLLM's automatic prefix caching, token-granular so generous to it), full
reuse (MPIC-0), CacheBlend-r and MPIC-k. Chunks are ingested before the requests, as MPIC does when documents arrive;
loading them from the store counts in TTFT.

Each method decodes its own greedy answer, scored against gold (accuracy: a gold answer occurs in it; SQuAD F1), with
bootstrap intervals. Fidelity to full prefill that does not compound over a long answer: first-token agreement, and
top-1 agreement and KL(full || method) per step with full prefill's answer teacher-forced through the method's cache.
Whole-answer exact match only for answers of <= ``exact_max_tokens`` tokens, beside the floor that bf16 full prefill
sets against fp32 (near-ties between the top two tokens decide long greedy answers, whatever built the cache).
"""

from __future__ import annotations

import random
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from edgecloud.errors import UserError
from edgecloud.kvcache.mpic import MPIC, Segment, text
from edgecloud.kvcache.qa import QAItem, bootstrap_ci, contains, f1, passkey_items, squad_items, squad_path
from edgecloud.kvcache.selection import CacheBlend, MPICk
from edgecloud.kvcache.store import KVStore
from edgecloud.llm.engine import Engine, cache_from_kv, stack_kv
from edgecloud.llm.prompts import chat_head, chat_tail

SYSTEM = ("You are a helpful assistant. Answer the question with a short phrase copied from the documents the "
          "user gives; no explanation.")
INSTRUCTION = "Answer with a short phrase copied from the documents."


@dataclass
class BenchConfig:
    groups: int = 6  # SQuAD articles; each gives a shared pool of passages
    per_group: int = 4  # questions (requests) per article: the same passages in other subsets and orders
    passkey: int = 6  # passkey requests (a number planted in one of the passages)
    min_chunks: int = 4
    max_chunks: int = 6
    chunk_tokens: int = 200  # only paragraphs up to this length are used (never cut: that could cut the answer)
    answer_tokens: int = 16  # the 135M model often restates the question before the answer span
    ks: tuple[int, ...] = (32,)  # more ks (e.g. 16, 32, 64) add a sweep: ~25 s a request each on busy cores
    k: int = 32  # the MPIC k reported as the headline
    blend_r: float = 0.15
    mem_mb: int = 64
    exact_max_tokens: int = 8  # whole-answer exact match only for answers this short (long ones measure near-ties)
    bf16_floor: int = 2  # first n requests also run full prefill in bf16: the float floor (bf16 is ~8x slower
    # than fp32 on a CPU without native bf16, measured here, so only a few requests)
    seed: int = 0

    def __post_init__(self):
        if not 1 <= self.min_chunks <= self.max_chunks:
            raise UserError(f"min_chunks={self.min_chunks}, max_chunks={self.max_chunks}: need 1 <= min <= max")
        if self.groups < 0 or self.per_group < 1 or self.passkey < 0:
            raise UserError("groups, passkey >= 0 and per_group >= 1 please")

    @classmethod
    def quick(cls, seed: int = 0) -> BenchConfig:
        return cls(groups=3, per_group=2, passkey=2, min_chunks=4, max_chunks=5, chunk_tokens=160, answer_tokens=12,
                   ks=(32,), bf16_floor=2, seed=seed)


@dataclass
class Request:
    item: QAItem
    n_chunks: int  # passages in the prompt
    segments: list[Segment] = field(default_factory=list)


def make_workload(engine: Engine, cfg: BenchConfig, items: list[QAItem] | None = None) -> list[Request]:
    """Requests whose prompt holds the gold passage among distractors of the same source, in varying orders; a
    group's requests draw from one passage pool, so chunks recur across requests at other positions."""
    rng = random.Random(cfg.seed)
    if items is None:
        items = _squad_sample(engine, cfg, rng) + passkey_items(cfg.passkey, cfg.max_chunks, cfg.seed)
    head = _system_head(engine)
    chunk_ids: dict[str, list[int]] = {}

    def ids_of(text: str) -> list[int]:
        if text not in chunk_ids:
            chunk_ids[text] = engine.encode(text.strip()) + engine.encode("\n\n")
        return chunk_ids[text]

    reqs = []
    for it in items:
        n = rng.randint(cfg.min_chunks, cfg.max_chunks)
        others = rng.sample(it.distractors, min(n - 1, len(it.distractors)))
        texts = [it.gold, *others]
        rng.shuffle(texts)
        segs = [Segment("chunk", engine.encode(head), label="system")]
        segs += [Segment("chunk", ids_of(t), label=f"{it.group}:{hash(t) & 0xffff:04x}") for t in texts]
        segs.append(text(engine, _tail(engine, it.question)))
        n_tok = sum(len(s) for s in segs)
        if n_tok + cfg.answer_tokens > engine.context:
            raise UserError(f"question {it.question[:60]!r}: its prompt with the gold passage has {n_tok} tokens, "
                            f"more than the model's context of {engine.context}; shorten the passages")
        reqs.append(Request(it, len(texts), segs))
    return reqs


def _squad_sample(engine: Engine, cfg: BenchConfig, rng: random.Random) -> list[QAItem]:
    """``groups`` SQuAD articles with enough short paragraphs; ``per_group`` questions each, distractors limited to
    the article's short paragraphs (the pool its requests share)."""
    if cfg.groups == 0:
        return []
    by_title: dict[str, list[QAItem]] = {}
    for it in squad_items(squad_path()):
        by_title.setdefault(it.group, []).append(it)
    titles = sorted(by_title)
    rng.shuffle(titles)
    out = []
    for t in titles:
        its = by_title[t]
        short = sorted({i.gold for i in its if len(engine.encode(i.gold)) <= cfg.chunk_tokens})
        if len(short) < cfg.max_chunks + 2:
            continue
        pool = rng.sample(short, cfg.max_chunks + 2)
        cands = [i for i in its if i.gold in pool]
        for it in rng.sample(cands, min(cfg.per_group, len(cands))):
            out.append(QAItem(it.question, it.answers, it.gold, [p for p in pool if p != it.gold], t, "squad"))
        if len(out) >= cfg.groups * cfg.per_group:
            break
    return out


def _system_head(engine: Engine) -> str:
    return chat_head(SYSTEM, engine.lm.chat)


def _tail(engine: Engine, q: str) -> str:
    """The question, then the instruction again right before the answer (SmolLM2-135M drifts into restating the
    question otherwise: 2 of 12 SQuAD requests answered with it vs 1 without, 24-token answers, full prefill)."""
    return f"Question: {q}\n{INSTRUCTION}" + chat_tail(engine.lm.chat)


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
    """Teacher-force ``answer`` through ``cache``: first-token and per-step top-1 agreement, KL(ref || method)."""
    rest = engine.logits_for(answer[:-1], cache) if len(answer) > 1 else torch.empty(0, logits0.shape[-1])
    got = torch.cat([logits0[None].float(), rest.float()])
    p, q = torch.log_softmax(ref_logits, -1), torch.log_softmax(got, -1)
    kl = (p.exp() * (p - q)).sum(-1)
    agree = got.argmax(-1) == torch.tensor(answer)
    return {"first": float(agree[0]), "top1": float(agree.float().mean()), "kl": float(kl.mean())}


def _copy_cache(cache):
    k, v = stack_kv(cache)
    return cache_from_kv(k, v)


def _answer(engine: Engine, cache, logits, cfg: BenchConfig) -> tuple[list[int], str, float]:
    """Greedy answer from a filled cache (which grows), cut at the first line break; and its decode seconds."""
    toks, times = engine.greedy(cache, logits, cfg.answer_tokens)
    return toks, engine.decode_text(toks).strip().split("\n")[0], sum(times)


def _row(engine, cfg, r: Request, ttft, logits, cache, ref, answer, full_toks, recomputed, n, own=None) -> dict:
    """Fidelity (teacher-forced on a copy of the cache), then the method's own greedy answer scored against gold
    (``own``: that answer when it is already decoded, for full prefill, whose fidelity to itself is exact)."""
    if own is None:
        q = _quality(engine, ref, answer, logits, _copy_cache(cache))
        toks, pred, dec = _answer(engine, cache, logits, cfg)
    else:
        q, (toks, pred, dec) = {"first": 1.0, "top1": 1.0, "kl": 0.0}, own
    short = len(full_toks) <= cfg.exact_max_tokens
    return {"ttft": ttft, "decode": dec, **q, "acc": contains(pred, r.item.answers), "f1": f1(pred, r.item.answers),
            "exact_short": float(toks == full_toks) if short else None, "answer": pred, "recomputed": recomputed,
            "tokens": n, "source": r.item.source}


def run(engine: Engine, cfg: BenchConfig, store_dir: str | Path | None = None, progress=None,
        items: list[QAItem] | None = None) -> dict:
    torch.manual_seed(cfg.seed)
    reqs = make_workload(engine, cfg, items)
    tmp = None
    if store_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="mpic-bench-")
        store_dir = tmp.name
    store = KVStore(store_dir, engine.lm.fingerprint, mem_bytes=cfg.mem_mb << 20)
    system = MPIC(engine, store)
    methods = {"full-reuse": MPICk(0), f"cacheblend-{round(cfg.blend_r * 100)}": CacheBlend(cfg.blend_r)}
    methods.update({f"mpic-{k}": MPICk(k) for k in sorted({*cfg.ks, cfg.k})})
    bf16 = _bf16_engine(engine) if cfg.bf16_floor > 0 else None
    t0 = time.perf_counter()
    for r in reqs:  # documents arrive: compute and store their KV (not part of any request's TTFT)
        for s in r.segments:
            if s.kind == "chunk":
                system.ingest(s)
    ingest_s = time.perf_counter() - t0
    prefix = PrefixCache()
    names = ["full", *(["full-bf16"] if bf16 else []), "prefix", *methods]
    rows: dict[str, list[dict]] = {m: [] for m in names}
    for i, r in enumerate(reqs):
        ids = [t for s in r.segments for t in s.ids]
        n = len(ids)
        # reference: full prefill (fp32), its greedy answer, and its logits at every answer step (teacher-forced)
        t = time.perf_counter()
        logits, cache = engine.prefill(ids)
        ttft = time.perf_counter() - t
        own = _answer(engine, _copy_cache(cache), logits, cfg)
        full_toks = own[0]
        ref = torch.cat([logits[None], engine.logits_for(full_toks[:-1], cache)]) if len(full_toks) > 1 \
            else logits[None]
        rows["full"].append(_row(engine, cfg, r, ttft, logits, cache, ref, full_toks, full_toks, n, n, own))
        if bf16 is not None and i < cfg.bf16_floor:
            t = time.perf_counter()
            bl, bc = bf16.prefill(ids)
            rows["full-bf16"].append(_row(bf16, cfg, r, time.perf_counter() - t, bl, bc, ref, full_toks, full_toks,
                                          n, n))
        t = time.perf_counter()
        pl, pc, reused = prefix.prefill(engine, ids)
        ttft = time.perf_counter() - t
        prefix.add(ids, pc)
        rows["prefix"].append(_row(engine, cfg, r, ttft, pl, pc, ref, full_toks, full_toks, n - reused, n))
        for name, sel in methods.items():
            res = system.prefill(r.segments, sel)
            rows[name].append(_row(engine, cfg, r, res.timings["ttft_s"], res.logits, res.cache, ref, full_toks,
                                   full_toks, res.n_recomputed, n))
        if progress:
            progress(i + 1, len(reqs))
    system.close()
    if tmp is not None:
        tmp.cleanup()
    return summarize(rows, cfg, reqs, ingest_s, dict(store.stats), engine)


def _bf16_engine(engine: Engine) -> Engine:
    """The same model in bf16: full prefill through it is the float noise floor for every fidelity metric."""
    import copy

    lm = copy.copy(engine.lm)
    lm.model = copy.deepcopy(engine.model).to(torch.bfloat16)
    return Engine(lm, threads=engine.threads)


def summarize(rows, cfg: BenchConfig, reqs, ingest_s: float, store_stats: dict, engine: Engine) -> dict:
    def mean(xs):
        xs = [x for x in xs if x is not None]
        return sum(xs) / len(xs) if xs else float("nan")

    table = {}
    for m, rs in rows.items():
        acc, f = [r["acc"] for r in rs], [r["f1"] for r in rs]
        table[m] = {"accuracy": mean(acc), "accuracy_ci": bootstrap_ci(acc, seed=cfg.seed), "f1": mean(f),
                    "f1_ci": bootstrap_ci(f, seed=cfg.seed),
                    "accuracy_squad": mean([r["acc"] for r in rs if r["source"] == "squad"]),
                    "accuracy_passkey": mean([r["acc"] for r in rs if r["source"] == "passkey"]),
                    "first_token_agreement": mean([r["first"] for r in rs]),
                    "top1_agreement": mean([r["top1"] for r in rs]), "kl": mean([r["kl"] for r in rs]),
                    "exact_match_short": mean([r["exact_short"] for r in rs]),
                    "ttft_s": mean([r["ttft"] for r in rs]), "total_s": mean([r["ttft"] + r["decode"] for r in rs]),
                    "recompute_frac": mean([r["recomputed"] / r["tokens"] for r in rs])}
    full, pre, mp = table["full"], table["prefix"], table[f"mpic-{cfg.k}"]
    out = {
        "model": engine.lm.name, "requests": len(reqs), "k": cfg.k,
        "accuracy_full": full["accuracy"], "accuracy_mpic": mp["accuracy"],
        "accuracy_delta": mp["accuracy"] - full["accuracy"],
        "accuracy_full_ci": full["accuracy_ci"], "accuracy_mpic_ci": mp["accuracy_ci"],
        "f1_full": full["f1"], "f1_mpic": mp["f1"],
        "first_token_agreement": mp["first_token_agreement"], "top1_agreement": mp["top1_agreement"], "kl": mp["kl"],
        "ttft_full_s": full["ttft_s"], "ttft_prefix_s": pre["ttft_s"], "ttft_mpic_s": mp["ttft_s"],
        "ttft_ratio_vs_full": mp["ttft_s"] / full["ttft_s"], "ttft_ratio_vs_prefix": mp["ttft_s"] / pre["ttft_s"],
        "short_answers": sum(1 for r in rows["full"] if r["exact_short"] is not None),
        "prompt_tokens_mean": mean([r["tokens"] for r in rows["full"]]),
        "chunks_mean": mean([r.n_chunks for r in reqs]),
        "sources": {s: sum(1 for r in reqs if r.item.source == s) for s in sorted({r.item.source for r in reqs})},
        "ingest_s": ingest_s, "store": store_stats, "threads": engine.threads, "seed": cfg.seed,
        "config": asdict(cfg), "methods": table,
        "answers": [{"question": r.item.question, "gold": r.item.answers[:3],
                     **{m: rows[m][i]["answer"] for m in ("full", "prefix", f"mpic-{cfg.k}")}}
                    for i, r in enumerate(reqs)],
    }
    if "full-bf16" in table:
        b = table["full-bf16"]
        keys = ("first_token_agreement", "top1_agreement", "kl", "exact_match_short", "accuracy", "ttft_s")
        out["floor_bf16"] = {"requests": len(rows["full-bf16"]), **{k: b[k] for k in keys}}
    return out


def ttft_run(engine: Engine, cfg: BenchConfig, repeats: int = 2, items: list[QAItem] | None = None,
             progress=None, baselines: bool = True) -> dict:
    """TTFT only (no decoding, no quality): the part of the benchmark to run on quiet cores (``timed``).

    Same workload, store and methods as :func:`run`; per request the methods run back to back and each is timed
    ``repeats`` times, keeping the fastest (scheduler noise only adds). Prefix caching runs once per request (its
    second run would hit the whole prompt it just cached). ``baselines=False`` leaves out full reuse and CacheBlend
    (to fit a short ``timed`` window)."""
    reqs = make_workload(engine, cfg, items)
    methods = {"full-reuse": MPICk(0), f"cacheblend-{round(cfg.blend_r * 100)}": CacheBlend(cfg.blend_r)} \
        if baselines else {}
    methods.update({f"mpic-{k}": MPICk(k) for k in sorted({*cfg.ks, cfg.k})})
    times: dict[str, list[float]] = {m: [] for m in ["full", "prefix", *methods]}
    recomputed: dict[str, list[float]] = {m: [] for m in methods}
    prefix = PrefixCache()
    with tempfile.TemporaryDirectory(prefix="mpic-ttft-") as d:
        system = MPIC(engine, KVStore(d, engine.lm.fingerprint, mem_bytes=cfg.mem_mb << 20))
        for r in reqs:
            for s in r.segments:
                if s.kind == "chunk":
                    system.ingest(s)
        for i, r in enumerate(reqs):
            ids = [t for s in r.segments for t in s.ids]
            best = float("inf")
            for _ in range(repeats):
                t = time.perf_counter()
                engine.prefill(ids)
                best = min(best, time.perf_counter() - t)
            times["full"].append(best)
            t = time.perf_counter()
            _, pc, _ = prefix.prefill(engine, ids)
            times["prefix"].append(time.perf_counter() - t)
            prefix.add(ids, pc)
            for name, sel in methods.items():
                res = min((system.prefill(r.segments, sel) for _ in range(repeats)), key=lambda x: x.timings["ttft_s"])
                times[name].append(res.timings["ttft_s"])
                recomputed[name].append(res.n_recomputed / len(ids))
            if progress:
                progress(i + 1, len(reqs))
        system.close()
    mean = {m: sum(v) / len(v) for m, v in times.items()}
    mp = mean[f"mpic-{cfg.k}"]
    return {"model": engine.lm.name, "threads": engine.threads, "requests": len(reqs), "k": cfg.k,
            "repeats": repeats, "ttft_s": mean, "ttft_over_full": {m: v / mean["full"] for m, v in mean.items()},
            "recompute_frac": {m: sum(v) / len(v) for m, v in recomputed.items()},
            "ttft_full_s": mean["full"], "ttft_prefix_s": mean["prefix"], "ttft_mpic_s": mp,
            "ttft_ratio_vs_full": mp / mean["full"], "ttft_ratio_vs_prefix": mp / mean["prefix"],
            "prompt_tokens_mean": sum(len(s) for r in reqs for s in r.segments) / len(reqs),
            "seed": cfg.seed, "config": asdict(cfg)}


def peer_ttft(engine: Engine, cfg: BenchConfig, peer, items: list[QAItem] | None = None) -> dict:
    """TTFT of MPIC-k and of a vLLM server (automatic prefix caching on) on the same requests, interleaved.

    Both are warmed on the same chunks first: MPIC ingests each chunk; the server prefills each chunk once behind
    the system prompt (its cache keys on the whole prefix, so that is where a chunk can hit again: as the first
    passage of a later prompt). Requests then go in the workload's order, one of ours, then the same token ids to
    the server, so earlier requests' prefixes are in its cache too. MPIC-k is re-timed here, beside the peer, so the
    ratio compares the two under the same machine load; the prefix-cache hit rate is read from the server."""
    reqs = make_workload(engine, cfg, items)
    sel = MPICk(cfg.k)
    with tempfile.TemporaryDirectory(prefix="mpic-peer-") as d:
        system = MPIC(engine, KVStore(d, engine.lm.fingerprint, mem_bytes=cfg.mem_mb << 20))
        seen: set[tuple[int, ...]] = set()
        for r in reqs:
            head = r.segments[0].ids
            for s in r.segments:
                if s.kind == "chunk":
                    system.ingest(s)
                    if s is not r.segments[0] and tuple(s.ids) not in seen:
                        seen.add(tuple(s.ids))
                        peer.ttft(head + s.ids)
        before = peer.prefix_cache_counters()
        ours, theirs = [], []
        for r in reqs:
            ours.append(system.prefill(r.segments, sel).timings["ttft_s"])
            theirs.append(peer.ttft([t for s in r.segments for t in s.ids]))
        after = peer.prefix_cache_counters()
        system.close()
    q = after.get("prefix_cache_queries", 0) - before.get("prefix_cache_queries", 0)
    hits = after.get("prefix_cache_hits", 0) - before.get("prefix_cache_hits", 0)
    mo, mt = sum(ours) / len(ours), sum(theirs) / len(theirs)
    return {"ttft_vllm_s": mt, "ttft_mpic_beside_vllm_s": mo, "ttft_ratio_vs_vllm": mo / mt,
            "vllm_prefix_hit_rate": hits / q if q else None, "warm_chunks": len(seen),
            "peer": {"engine": "vllm", "url": peer.url, "model": peer.root, "requests": len(reqs)}}
