"""OpenAI-compatible multi-LoRA server: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions`` (SSE too).

``model`` selects the adapter: ``"<base>"`` (no adapter), ``"<base>:<adapter>"`` or ``"<adapter>"``. Adapters
are peft directories under ``adapters_dir``; one that is not loaded yet is read and validated in the request's
worker thread (hot load) and handed to the engine thread, which adds it between two decode steps.

One engine thread runs continuous batching (``edgecloud.llm.batch.Batch``) over every adapter at once with the
VaLoRA policy: the hot adapter is merged when its share of queued + running requests is high, the others are
served in mixture mode through ATMM, chosen per shape by the dispatch table. Requests enter through a queue;
tokens go back to each request's asyncio queue. A bad request (unknown adapter, adapter for another base or of
too high a rank, a directory that is not a peft adapter, malformed JSON, a prompt over the context) gets a 4xx
naming the field and the fix before it reaches the engine, and the server keeps serving the others; a client
that disconnects has its sequence removed from the batch.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from fastapi import Request  # module level: FastAPI resolves handler annotations in module globals
from pydantic import BaseModel, Field

from edgecloud.errors import UserError

log = logging.getLogger("edgecloud.lora.server")


class CompletionIn(BaseModel):
    model: str
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]
    max_tokens: int = Field(16, ge=1, le=2048)
    temperature: float = Field(0.0, ge=0.0, le=2.0)  # default greedy: the served outputs are reproducible
    seed: int = 0
    stream: bool = False
    stop: str | list[str] | None = None


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatIn(BaseModel):
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=2048)
    max_completion_tokens: int | None = Field(None, ge=1, le=2048)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    seed: int = 0
    stream: bool = False
    stop: str | list[str] | None = None


@dataclass
class Job:
    id: int
    adapter: str | None
    prompt: list[int]
    max_tokens: int
    temperature: float
    seed: int
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    new_adapter: object = None  # an Adapter read by the request thread, added by the engine thread
    cancelled: bool = False
    arrival: float = field(default_factory=time.perf_counter)


class EngineThread:
    """Owns the engine, the LoRA layers and the batch; everything that touches them runs on this thread."""

    def __init__(self, engine, lora, max_batch: int = 16, policy=None):
        from edgecloud.lora.orchestrator import Policy

        self.engine, self.lora, self.max_batch = engine, lora, max_batch
        self.policy = policy or Policy("valora", max_batch=max_batch)
        self.inbox: queue.Queue[Job] = queue.Queue()
        self.waiting: list[Job] = []
        self.running: dict[int, Job] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="lora-engine", daemon=True)
        self.served = 0

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=30)

    def _emit(self, job: Job, item) -> None:
        job.loop.call_soon_threadsafe(job.out.put_nowait, item)

    def _run(self) -> None:
        import torch

        from edgecloud.llm.batch import Batch

        torch.set_num_threads(self.engine.threads)
        batch = Batch(self.engine)
        with torch.inference_mode():
            while not self.stop.is_set():
                try:
                    self._tick(batch)
                except Exception as e:  # never let one failure stop the server: fail the jobs in flight
                    log.exception("engine step failed")
                    for j in [*self.running.values(), *self.waiting]:
                        self._emit(j, ("error", f"engine error: {e}"))
                    batch.remove(*list(self.running))
                    self.running.clear()
                    self.waiting.clear()

    def _tick(self, batch) -> None:
        from edgecloud.lora.orchestrator import _valora_mode

        block = not self.running and not self.waiting
        try:
            while True:
                j = self.inbox.get(timeout=0.05) if block else self.inbox.get_nowait()
                block = False
                if j.new_adapter is not None and j.new_adapter.name not in self.lora.adapters:
                    self.lora.add(j.new_adapter)
                self.waiting.append(j)
        except queue.Empty:
            pass
        gone = [i for i, j in self.running.items() if j.cancelled]
        if gone:
            batch.remove(*gone)
            for i in gone:
                self.running.pop(i)
                self.lora.seq_adapter.pop(i, None)
        self.waiting = [j for j in self.waiting if not j.cancelled]
        _valora_mode(self.policy, self.lora, self.waiting, self.running)
        room = self.max_batch - len(self.running)
        admit, self.waiting = self.waiting[:room], self.waiting[room:]
        for temp in sorted({j.temperature for j in admit}):
            group = [j for j in admit if j.temperature == temp]
            for j in group:
                self.lora.seq_adapter[j.id] = j.adapter
                self.running[j.id] = j
            batch.add({j.id: j.prompt for j in group}, max(j.max_tokens for j in group), temp,
                      {j.id: j.seed for j in group})
        if not self.running:
            return
        chosen, fin = {}, []
        for s in batch.active:
            j = self.running[s.id]
            tok = s.choose()
            n = len(s.tokens) + 1
            end = tok in self.engine.eos_ids
            if not end:
                self._emit(j, ("token", tok))
            if end or n >= j.max_tokens:
                fin.append(s.id)
                self._emit(j, ("done", "stop" if end else "length"))
            else:
                chosen[s.id] = tok
        batch.remove(*fin)
        for i in fin:
            self.running.pop(i)
            self.lora.seq_adapter.pop(i, None)
            self.served += 1
        if self.running:
            batch.step(chosen)


@dataclass
class ServeConfig:
    """Server limits, checked once for the CLI and for tests."""

    max_batch: int = 16
    max_body_mb: float = 1.0

    def __post_init__(self) -> None:
        if not 1 <= self.max_batch <= 256:
            raise UserError(f"--max-batch {self.max_batch}: give 1..256")
        if not 0 < self.max_body_mb <= 1024:
            raise UserError(f"--max-body-mb {self.max_body_mb}: give 0 < MB <= 1024")


def build(engine, lora, base: str, adapters_dir: Path | None, cfg: ServeConfig | None = None):
    """The ASGI app (with a body cap) and its engine thread, started and stopped with the app's lifespan."""
    import contextlib

    from fastapi import FastAPI, HTTPException
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool

    from edgecloud.kvcache.server import BodyLimit
    from edgecloud.llm.prompts import chat_messages
    from edgecloud.lora.adapters import load_adapter

    cfg = cfg or ServeConfig()
    worker = EngineThread(engine, lora, cfg.max_batch)
    ids = itertools.count()
    load_lock = threading.Lock()
    adir = Path(adapters_dir) if adapters_dir else None

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        worker.start()
        yield
        worker.close()
        log.info("edgecloud lora server stopped after %d requests", worker.served)

    app = FastAPI(title="edgecloud VaLoRA (OpenAI-compatible)", lifespan=lifespan)

    def error(status: int, msg: str, param: str | None = None) -> JSONResponse:
        """OpenAI's error body, so clients show the message (``detail`` kept for plain HTTP callers)."""
        kind = "not_found_error" if status == 404 else "invalid_request_error"
        return JSONResponse({"error": {"message": msg, "type": kind, "param": param, "code": status},
                             "detail": msg}, status_code=status)

    @app.exception_handler(HTTPException)
    async def http_error(_req, exc: HTTPException):
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid(_req, exc: RequestValidationError):
        e = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in e.get("loc", ())[1:]) or "body"
        return error(422, f"{where}: {e.get('msg', 'invalid request')}", where)

    def on_disk() -> list[str]:
        if adir is None or not adir.is_dir():
            return []
        return sorted(d.name for d in adir.iterdir() if (d / "adapter_config.json").is_file())

    def resolve(model: str):
        """(adapter name or None, a newly read Adapter or None); 404 for an unknown name, 400 for a bad adapter."""
        name = model.split(":", 1)[1] if model.startswith(base + ":") else model
        if name == base:
            return None, None
        if name in lora.adapters:
            return name, None
        if adir is None or not name or "/" in name or name.startswith(".") or not (adir / name).is_dir():
            known = [base] + [f"{base}:{a}" for a in sorted(set(lora.adapters) | set(on_disk()))]
            raise HTTPException(404, f"model {model!r}: no such adapter; available: {', '.join(known[:20])}")
        with load_lock:  # one reader per adapter; the engine thread adds it between steps
            try:
                return name, load_adapter(adir / name, engine.model, base, name)
            except UserError as e:
                raise HTTPException(400, f"model {model!r}: {e}") from None

    def prepare(model: str, text: str, max_tokens: int):
        adapter, new = resolve(model)
        ids_ = engine.encode(text)
        if not ids_:
            raise HTTPException(400, "prompt is empty; send at least one token of text")
        if len(ids_) + max_tokens > engine.context:
            raise HTTPException(400, f"prompt has {len(ids_)} tokens + max_tokens {max_tokens} > the model's "
                                     f"context of {engine.context}; shorten the prompt or lower max_tokens")
        return adapter, new, ids_

    async def run_job(adapter, new, prompt, max_tokens, temperature, seed):
        j = Job(next(ids), adapter, prompt, max_tokens, temperature, seed, asyncio.get_running_loop(),
                asyncio.Queue(), new)
        worker.inbox.put(j)
        return j

    async def tokens(j: Job, request: Request, stop: list[str]):
        """Yield (text delta, finish_reason or None) as tokens arrive; cancels the job on disconnect or stop."""
        toks: list[int] = []
        sent = ""
        try:
            while True:
                kind, val = await j.out.get()
                if kind == "error":
                    raise HTTPException(500, val)
                if kind == "done":
                    yield "", val
                    return
                toks.append(val)
                text = engine.decode_text(toks)
                hit = [text.find(s) for s in stop if s and s in text]
                if hit:
                    text = text[:min(hit)]
                    if len(text) > len(sent):
                        yield text[len(sent):], None
                    yield "", "stop"
                    return
                if len(text) > len(sent) and not text.endswith("\ufffd"):
                    yield text[len(sent):], None
                    sent = text
                if await request.is_disconnected():
                    return
        finally:
            j.cancelled = True  # a no-op for a finished job; otherwise the engine thread drops it

    def stops(stop) -> list[str]:
        return [stop] if isinstance(stop, str) else list(stop or [])

    def usage(j: Job, n: int) -> dict:
        return {"prompt_tokens": len(j.prompt), "completion_tokens": n, "total_tokens": len(j.prompt) + n}

    def sse(obj) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    async def respond(j: Job, request: Request, body, chat: bool):
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:12]}"
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"

        def choice(text, finish, delta=False):
            if not chat:
                return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            msg = {"role": "assistant", "content": text}
            return {"index": 0, ("delta" if delta else "message"): msg, "finish_reason": finish, "logprobs": None}

        if body.stream:
            async def gen():
                async for text, fin in tokens(j, request, stops(body.stop)):
                    yield sse({"id": rid, "object": obj + (".chunk" if chat else ""), "created": created,
                               "model": body.model, "choices": [choice(text, fin, delta=True)]})
                yield "data: [DONE]\n\n"

            return StreamingResponse(gen(), media_type="text/event-stream")
        parts, finish, n = [], "length", 0
        async for text, fin in tokens(j, request, stops(body.stop)):
            parts.append(text)
            n += bool(text)
            finish = fin or finish
        return {"id": rid, "object": obj, "created": created, "model": body.model,
                "choices": [choice("".join(parts), finish)], "usage": usage(j, n)}

    @app.get("/v1/models")
    def models():
        names = [base] + [f"{base}:{a}" for a in sorted(set(lora.adapters) | set(on_disk()))]
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "edgecloud"}
                                           for n in names]}

    @app.get("/health")
    def health():
        return {"ok": True, "base": base, "loaded": sorted(lora.adapters), "merged": lora.merged,
                "running": len(worker.running), "served": worker.served}

    @app.post("/v1/completions")
    async def completions(body: CompletionIn, request: Request):
        text = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
        adapter, new, ids_ = await run_in_threadpool(prepare, body.model, text, body.max_tokens)
        j = await run_job(adapter, new, ids_, body.max_tokens, body.temperature, body.seed)
        return await respond(j, request, body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatIn, request: Request):
        n = body.max_completion_tokens or body.max_tokens or 64
        text = chat_messages([m.model_dump() for m in body.messages], engine.lm.chat)
        adapter, new, ids_ = await run_in_threadpool(prepare, body.model, text, n)
        j = await run_job(adapter, new, ids_, n, body.temperature, body.seed)
        return await respond(j, request, body, chat=True)

    return BodyLimit(app, int(cfg.max_body_mb * (1 << 20)))


def serve(engine, lora, base: str, adapters_dir: Path | None, host: str, port: int,
          cfg: ServeConfig | None = None) -> None:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")
    app = build(engine, lora, base, adapters_dir, cfg)
    log.info("edgecloud lora server: base %s, adapters %s, listening on http://%s:%d", base, adapters_dir, host, port)
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=True)
