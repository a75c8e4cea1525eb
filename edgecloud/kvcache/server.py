"""FastAPI app for generation with chunk reuse: one engine, one MPIC system, requests served one at a time.

A request must never stall the others: the body is capped before it is parsed, text is tokenized in a worker
thread (never on the event loop), every length is checked against the model's context before any compute, and
the model lock is taken only for the compute itself. Bad requests get a 4xx naming the field and the fix.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass
from typing import Annotated

from pydantic import BaseModel, Field, StringConstraints

from edgecloud.errors import UserError
from edgecloud.kvcache.mpic import MPIC, Segment
from edgecloud.kvcache.selection import CacheBlend, MPICk
from edgecloud.kvcache.store import KVStore
from edgecloud.llm.prompts import chat_head, chat_tail
from edgecloud.paths import cache_root

log = logging.getLogger("edgecloud.kvcache.server")

Text = Annotated[str, StringConstraints(min_length=1, pattern=r"\S")]  # empty or blank text is a 422


class GenerateIn(BaseModel):
    system: Text = "You are a helpful assistant. Answer using the documents."
    chunks: list[Text] = Field(min_length=1, max_length=64)
    question: Text
    max_new_tokens: int = Field(32, ge=1, le=512)
    selector: str = Field("mpic", pattern="^(mpic|cacheblend|full-reuse)$")
    k: int | None = Field(None, ge=0, le=4096)


class ChunksIn(BaseModel):
    chunks: list[Text] = Field(min_length=1, max_length=256)


@dataclass
class ServeConfig:
    """Server limits; every field is checked here, once, for the CLI and for tests."""

    k: int = 32  # MPIC-k default for /generate
    mem_mb: int = 256  # memory tier of the KV store
    max_body_mb: float = 2.0  # larger request bodies are refused with 413 before they are read in full

    def __post_init__(self) -> None:
        if not 0 <= self.k <= 4096:
            raise UserError(f"--k {self.k}: give 0..4096 recomputed tokens")
        if self.mem_mb < 1:
            raise UserError(f"--mem-mb {self.mem_mb}: give a memory budget of at least 1 MB")
        if not 0 < self.max_body_mb <= 1024:
            raise UserError(f"--max-body-mb {self.max_body_mb}: give 0 < MB <= 1024")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * (1 << 20))


class BodyLimit:
    """ASGI middleware: 413 for a body over ``limit`` bytes, by Content-Length or while it streams in."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for k, v in scope.get("headers", []):
            if k == b"content-length" and v.isdigit() and int(v) > self.limit:
                return await self._refuse(send)
        seen = 0

        async def capped():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return msg

        try:
            await self.app(scope, capped, send)
        except _TooLarge:
            await self._refuse(send)

    async def _refuse(self, send):
        import json

        body = json.dumps({"detail": f"request body over {self.limit} bytes; send fewer or shorter chunks"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


def build(engine, store_dir=None, k: int = 32, mem_mb: int = 256, max_body_mb: float = 2.0):
    from fastapi import FastAPI, HTTPException

    cfg = ServeConfig(k=k, mem_mb=mem_mb, max_body_mb=max_body_mb)
    store = KVStore(store_dir or cache_root() / "kvstore", engine.lm.fingerprint, mem_bytes=cfg.mem_mb << 20)
    system = MPIC(engine, store, MPICk(cfg.k))
    lock = threading.Lock()

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        system.close()
        log.info("edgecloud kvcache server stopped (store: %s)", store.stats)

    app = FastAPI(title="edgecloud MPIC", lifespan=lifespan)

    def chunk(s: str, label: str) -> Segment:
        seg = Segment("chunk", engine.encode(s + "\n\n"), label=label)
        engine.check_length(len(seg), label)
        return seg

    def segments(req: GenerateIn) -> list[Segment]:
        """Tokenize and check every length (per chunk and in total) before any compute; no lock held."""
        head = chat_head(req.system, engine.lm.chat)
        segs = [Segment("chunk", engine.encode(head), label="system")]
        engine.check_length(len(segs[0]), "system")
        segs += [chunk(c, f"chunks[{i}]") for i, c in enumerate(req.chunks)]
        tail = f"Question: {req.question}" + chat_tail(engine.lm.chat)
        segs.append(Segment("text", engine.encode(tail), label="question"))
        engine.check_length(sum(len(s) for s in segs) + req.max_new_tokens,
                            "prompt (system + chunks + question + max_new_tokens)")
        return segs

    @app.get("/health")
    def health():
        return {"ok": True, "model": engine.lm.name, "store": store.stats}

    # Sync handlers run in Starlette's worker threads: tokenizing and checking never block the event loop.
    @app.post("/chunks")
    def ingest(body: ChunksIn):
        try:
            segs = [chunk(c, f"chunks[{i}]") for i, c in enumerate(body.chunks)]
            with lock:
                keys = [system.ingest(s) for s in segs]
        except UserError as e:
            raise HTTPException(400, str(e)) from None
        return {"keys": keys}

    @app.post("/generate")
    def generate(req: GenerateIn):
        sel = {"mpic": MPICk(req.k if req.k is not None else cfg.k), "cacheblend": CacheBlend(0.15),
               "full-reuse": MPICk(0)}[req.selector]
        try:
            segs = segments(req)
            with lock:
                out = system.generate(segs, req.max_new_tokens, selector=sel)
        except UserError as e:
            raise HTTPException(400, str(e)) from None
        out.pop("tokens")
        return out

    return BodyLimit(app, cfg.max_body_bytes)


def serve(engine, host: str, port: int, store_dir=None, k: int = 32, mem_mb: int = 256,
          max_body_mb: float = 2.0) -> None:
    """Run with uvicorn's logging: a 'listening on' line, one access-log line per request, a shutdown line."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")
    app = build(engine, store_dir, k=k, mem_mb=mem_mb, max_body_mb=max_body_mb)
    log.info("edgecloud kvcache server: model %s, k=%d, store %s, listening on http://%s:%d",
             engine.lm.name, k, store_dir or cache_root() / "kvstore", host, port)
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=True)
