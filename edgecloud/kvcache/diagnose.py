"""Why MPIC-k's first token differs from full prefill's, and whether a principled change to the linker fixes it.

Two parts (issue 19, where the passkey prompts miss far more often than SQuAD):

- ``classify``: from a fidelity study's per-request rows (``bench/mpic.py --fidelity --dump``), whether the reference's
  first token starts a *copy of a passage's opening* (the first token of one of the prompt's passages: the 135M model
  answering "Attribute references" by copying a heading) or something else ("The pass key is ..."), and MPIC-k's
  agreement in each class and source.
- ``variants``: alternatives that keep MPIC's shape (k tokens recomputed at each chunk start, one linker pass) on the
  same requests, against full prefill: a larger k; the boundary, i.e. also the last ``b`` tokens of the chunk before
  each chunk; the recent window, i.e. also the last ``r`` chunk tokens before the question; and anchored chunk KV,
  computed behind the system prompt instead of alone (APE's shared prefix, Yang et al. ICLR 2025: the chunk then sees
  the real attention sink and the first passage's KV is exact), re-rotated to positions 0..n-1 for the store.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from edgecloud.kvcache.mpic import link
from edgecloud.kvcache.selection import LinkContext, MPICk
from edgecloud.llm.engine import Engine


@dataclass
class Boundary:
    """MPIC-k plus the last ``b`` tokens of the chunk before each chunk (the seam between two stand-alone chunks)."""

    k: int = 32
    b: int = 16

    @property
    def name(self) -> str:
        return f"mpic-{self.k}+boundary-{self.b}"

    def __call__(self, ctx: LinkContext) -> torch.Tensor:
        sel = MPICk(self.k)(ctx)
        spans = ctx.chunk_spans
        for s0, e0 in spans[:-1]:  # every chunk that has a chunk after it
            if s0 > 0:  # the chunk at position 0 (the system prompt) is exact already
                sel[max(s0, e0 - self.b):e0] = True
        return sel


@dataclass
class Recent:
    """MPIC-k plus the last ``r`` chunk tokens before the question (the positions the question attends to most)."""

    k: int = 32
    r: int = 16

    @property
    def name(self) -> str:
        return f"mpic-{self.k}+recent-{self.r}"

    def __call__(self, ctx: LinkContext) -> torch.Tensor:
        sel = MPICk(self.k)(ctx)
        s, e = ctx.chunk_spans[-1]
        if s > 0:
            sel[max(s, e - self.r):e] = True
        return sel


def anchored_kv(engine: Engine, head: list[int], ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A chunk's KV computed behind ``head`` (the system prompt), the head's rows dropped and the keys re-rotated to
    positions 0..n-1, so the linker places it like a stand-alone chunk."""
    k, v = engine.kv_of(ids=list(head) + list(ids))
    h = len(head)
    return engine.rotate(k[:, :, h:].contiguous(), -h), v[:, :, h:].contiguous()


def first_tokens(segments) -> set[int]:
    """First token of every passage chunk (not the system prompt at position 0, not the question text)."""
    return {s.ids[0] for s in segments[1:] if s.kind == "chunk" and s.ids}


def classify(rows: list[dict], reqs: list, k: int = 32) -> dict:
    """MPIC-k agreement by source and by whether the reference's first token copies a passage's opening."""
    out: dict = {}
    for r, q in zip(rows, reqs):
        cls = "copies a passage opening" if r["ref_token"] in first_tokens(q.segments) else "other"
        for key in (r["source"], f"{r['source']}: {cls}", f"all: {cls}"):
            c = out.setdefault(key, {"n": 0, "agree": 0})
            c["n"] += 1
            c["agree"] += bool(r["methods"][f"mpic-{k}"]["agree"])
    for c in out.values():
        c["agreement"] = c["agree"] / c["n"]
    return dict(sorted(out.items()))


def variant_methods(k: int = 32) -> dict:
    """name -> (anchored chunk KV?, selector)."""
    return {f"mpic-{k}": (False, MPICk(k)), f"mpic-{2 * k}": (False, MPICk(2 * k)),
            Boundary(k, 16).name: (False, Boundary(k, 16)), Recent(k, 16).name: (False, Recent(k, 16)),
            f"anchored mpic-{k}": (True, MPICk(k))}


@torch.inference_mode()
def variants(engine: Engine, reqs: list, k: int = 32, progress=None) -> list[dict]:
    """Per request: full prefill's first token and top-2 gap, each variant's first token and KL(full || variant)."""
    plain: dict = {}
    anch: dict = {}
    methods = variant_methods(k)
    rows = []
    for i, q in enumerate(reqs):
        segs = q.segments
        ids = [t for s in segs for t in s.ids]
        ref, _ = engine.prefill(ids)
        p = torch.log_softmax(ref.float(), -1)
        top = ref.float().topk(2).values
        row = {"source": q.item.source, "ref_token": int(ref.argmax()), "ref_gap": float(top[0] - top[1]),
               "copies_opening": int(ref.argmax()) in first_tokens(segs), "methods": {}}
        head = segs[0].ids
        for name, (anchored, sel) in methods.items():
            kvs = {}
            for j, s in enumerate(segs):
                if s.kind != "chunk":
                    continue
                key = tuple(s.ids)
                if anchored and j > 0:
                    if key not in anch:
                        anch[key] = anchored_kv(engine, head, s.ids)
                    kvs[j] = anch[key]
                else:
                    if key not in plain:
                        plain[key] = engine.kv_of(ids=s.ids)
                    kvs[j] = plain[key]
            got = link(engine, segs, kvs, sel).logits.float()
            lq = torch.log_softmax(got, -1)
            row["methods"][name] = {"agree": int(got.argmax()) == row["ref_token"], "token": int(got.argmax()),
                                    "kl": float((p.exp() * (p - lq)).sum())}
        rows.append(row)
        if progress:
            progress(i + 1, len(reqs))
    return rows


def summarize_variants(rows: list[dict]) -> dict:
    from edgecloud.kvcache.fidelity import wilson

    out = {}
    for name in rows[0]["methods"] if rows else []:
        by = {}
        for src in sorted({r["source"] for r in rows}):
            xs = [r for r in rows if r["source"] == src]
            by[src] = {"n": len(xs), "agree": sum(r["methods"][name]["agree"] for r in xs)}
        a = sum(r["methods"][name]["agree"] for r in rows)
        out[name] = {"n": len(rows), "agree": a, "agreement": a / len(rows), "agreement_ci": wilson(a, len(rows)),
                     "kl_first": sum(r["methods"][name]["kl"] for r in rows) / len(rows), "by_source": by}
    return out


def sample(reqs: list, passkey: int, squad: int, seed: int = 0) -> list:
    """The first ``passkey`` passkey and ``squad`` SQuAD requests of a seeded shuffle (the fidelity study's order)."""
    reqs = list(reqs)
    random.Random(seed).shuffle(reqs)
    pk = [r for r in reqs if r.item.source == "passkey"][:passkey]
    sq = [r for r in reqs if r.item.source == "squad"][:squad]
    return pk + sq


def opens_first_passage(segments, token: int) -> bool:
    """Whether ``token`` is the first token of the prompt's first passage (the text right after the system prompt)."""
    first = next((s for s in segments[1:] if s.kind == "chunk" and s.ids), None)
    return first is not None and first.ids[0] == token


@torch.inference_mode()
def answers_on_misses(engine: Engine, rows: list[dict], reqs: list, k: int = 32, tokens: int = 14) -> list[dict]:
    """Greedy answers of full prefill and MPIC-k where the study's first tokens disagree, scored against gold: is the
    disagreement a loss for MPIC, or is full prefill's own answer the odd one (a copied heading)?"""
    import tempfile

    from edgecloud.kvcache.mpic import MPIC
    from edgecloud.kvcache.qa import contains
    from edgecloud.kvcache.store import KVStore

    out = []
    with tempfile.TemporaryDirectory(prefix="mpic-diag-") as d:
        system = MPIC(engine, KVStore(d, engine.lm.fingerprint))
        for r, q in zip(rows, reqs):
            if r["methods"][f"mpic-{k}"]["agree"]:
                continue
            ids = [t for s in q.segments for t in s.ids]
            ref, cache = engine.prefill(ids)
            full = engine.decode_text(engine.greedy(cache, ref, tokens)[0]).strip().split("\n")[0]
            res = system.prefill(q.segments, MPICk(k))
            mine = engine.decode_text(engine.greedy(res.cache, res.logits, tokens)[0]).strip().split("\n")[0]
            out.append({"source": r["source"], "gold": q.item.answers[:2], "full": full, f"mpic-{k}": mine,
                        "full_correct": bool(contains(full, q.item.answers)),
                        "mpic_correct": bool(contains(mine, q.item.answers)),
                        "ref_opens_first_passage": opens_first_passage(q.segments, r["ref_token"])})
        system.close()
    return out
