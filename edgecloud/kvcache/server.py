"""FastAPI app for generation with chunk reuse: one engine, one MPIC system, requests served one at a time."""

from __future__ import annotations

import threading

from pydantic import BaseModel, Field

from edgecloud.kvcache.mpic import MPIC, Segment, text
from edgecloud.kvcache.selection import CacheBlend, MPICk
from edgecloud.kvcache.store import KVStore
from edgecloud.llm.prompts import chat_head, chat_tail
from edgecloud.paths import cache_root


class GenerateIn(BaseModel):
    system: str = "You are a helpful assistant. Answer using the documents."
    chunks: list[str] = Field(default_factory=list, max_length=64)
    question: str
    max_new_tokens: int = Field(32, ge=1, le=512)
    selector: str = Field("mpic", pattern="^(mpic|cacheblend|full-reuse)$")
    k: int | None = Field(None, ge=0, le=4096)


class ChunksIn(BaseModel):
    chunks: list[str] = Field(max_length=256)


def build(engine, store_dir=None, k: int = 32, mem_mb: int = 256):
    from fastapi import FastAPI, HTTPException

    from edgecloud.errors import UserError

    store = KVStore(store_dir or cache_root() / "kvstore", engine.lm.fingerprint, mem_bytes=mem_mb << 20)
    system = MPIC(engine, store, MPICk(k))
    lock = threading.Lock()
    app = FastAPI(title="edgecloud MPIC")

    def segments(req: GenerateIn) -> list[Segment]:
        head = chat_head(req.system, engine.lm.chat)
        segs = [Segment("chunk", engine.encode(head), label="system")]
        segs += [Segment("chunk", engine.encode(c + "\n\n"), label=f"chunk{i}") for i, c in enumerate(req.chunks)]
        tail = f"Question: {req.question}" + chat_tail(engine.lm.chat)
        segs.append(text(engine, tail))
        return segs

    @app.get("/health")
    def health():
        return {"ok": True, "model": engine.lm.name, "store": store.stats}

    @app.post("/chunks")
    def ingest(body: ChunksIn):
        try:
            with lock:
                keys = [system.ingest(Segment("chunk", engine.encode(c + "\n\n"))) for c in body.chunks]
        except UserError as e:
            raise HTTPException(400, str(e)) from None
        return {"keys": keys}

    @app.post("/generate")
    def generate(req: GenerateIn):
        sel = {"mpic": MPICk(req.k if req.k is not None else k), "cacheblend": CacheBlend(0.15),
               "full-reuse": MPICk(0)}[req.selector]
        try:
            with lock:
                out = system.generate(segments(req), req.max_new_tokens, selector=sel)
        except UserError as e:
            raise HTTPException(400, str(e)) from None
        out.pop("tokens")
        return out

    return app
