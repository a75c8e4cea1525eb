"""The real upload path: a device process sends (text, sampled embedding) to the cloud over ``edgecloud.collab``.

Why the collaboration core's framed TCP (not HTTP): the embedding travels as raw float32 bytes with a typed header,
and the transport already gives timeouts, versioning and a trace of every byte, which the privacy test reads.

Messages (device -> cloud): ``upload`` {context, text} + tensor ``embedding`` (dim,) -> ``ack`` {stored};
``score`` {context, candidates} + ``embedding`` -> ``scores`` {nll} (needs a trained cloud model); ``bye``.
A bad message gets a typed ``rejected`` {message} reply naming the field and the fix, and the session goes on.
Uploads carry no identifier: any field beyond the allowed ones (``user``, ``device_id``, ...) is refused, the log
records only message types, sizes and outcomes, and a record is appended with one ``write`` of a complete line
(rolled back if the write comes up short), so the store never holds a partial record.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import torch

from edgecloud.collab.wire import Connection, PeerGone, ProtocolError, Trace
from edgecloud.errors import UserError

UPLOAD_FIELDS = {"type", "context", "text"}
SCORE_FIELDS = {"type", "context", "candidates"}
MAX_TEXT = 4000


class UploadStore:
    """Append-only JSON-lines store of (context, text, embedding) records."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.path = self.root / "uploads.jsonl"

    def append(self, record: dict) -> None:
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            start = os.fstat(fd).st_size
            n = os.write(fd, line)
            if n != len(line):  # a short write (disk full): cut back to the last complete record
                os.ftruncate(fd, start)
                raise OSError(f"short write ({n} of {len(line)} bytes)")
            os.fsync(fd)
        finally:
            os.close(fd)

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(x) for x in self.path.read_text(encoding="utf-8").splitlines() if x]


def check_upload(msg: dict, tensors: dict, dim: int, allowed: set[str]) -> torch.Tensor:
    """The embedding of a valid message; else UserError naming the field and the fix."""
    extra = sorted(set(msg) - allowed)
    if extra:
        raise UserError(f"field(s) {', '.join(extra)} refused: uploads carry no identifiers; send only "
                        f"{', '.join(sorted(allowed - {'type'}))} and the embedding tensor")
    for f in sorted(allowed - {"type", "candidates"}):
        v = msg.get(f)
        if not isinstance(v, str) or not v.strip() or len(v) > MAX_TEXT:
            raise UserError(f"field {f}: need a non-empty string of at most {MAX_TEXT} characters")
    if set(tensors) != {"embedding"}:
        raise UserError(f"tensors {sorted(tensors) or 'none'}: send exactly one tensor named 'embedding' "
                        "(a fresh sample of the device's distribution)")
    z = tensors["embedding"]
    if z.dtype != torch.float32 or tuple(z.shape) != (dim,):
        raise UserError(f"embedding: {str(z.dtype).removeprefix('torch.')} of shape {tuple(z.shape)}, this cloud "
                        f"expects float32 of shape ({dim},) (the basis dimension)")
    if not torch.isfinite(z).all():
        raise UserError("embedding: holds NaN or inf; sample it again")
    return z


class AnonServer:
    """The cloud: stores anonymous uploads; scores candidates when it has a trained model (``scorer``)."""

    def __init__(self, store: UploadStore, dim: int, scorer=None, host: str = "127.0.0.1", port: int = 0,
                 log_path: str | Path | None = None, idle_timeout: float = 600.0):
        self.store, self.dim, self.scorer = store, dim, scorer
        self.host, self.port, self.idle_timeout = host, port, idle_timeout
        self.log_path = Path(log_path) if log_path else store.root / "server.log"
        self.server = None

    def log(self, what: str) -> None:
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {what}\n")

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._session, self.host, self.port)
        self.port = self.server.sockets[0].getsockname()[1]
        self.log(f"listening dim={self.dim}")
        return self.port

    async def _session(self, r, w) -> None:
        conn = Connection(r, w, Trace("cloud"), timeout=self.idle_timeout)
        try:
            while True:
                msg, tensors = await conn.recv()
                t = msg["type"]
                if t == "bye":
                    break
                try:
                    if t == "upload":
                        z = check_upload(msg, tensors, self.dim, UPLOAD_FIELDS)
                        self.store.append({"context": msg["context"], "text": msg["text"],
                                           "embedding": [float(x) for x in z]})
                        await conn.send("ack", stored=True)
                    elif t == "score":
                        await self._score(conn, msg, tensors)
                    else:
                        raise UserError(f"type {t!r}: send upload, score or bye")
                    self.log(f"{t} ok")
                except UserError as e:
                    self.log(f"{t} rejected")
                    await conn.send("rejected", message=str(e))
        except ProtocolError as e:
            self.log("protocol error")
            await conn.send_error(str(e))
        except PeerGone:
            pass
        finally:
            await conn.close()

    async def _score(self, conn: Connection, msg: dict, tensors: dict) -> None:
        if self.scorer is None:
            raise UserError("score: this cloud has no trained model; start it with --cloud-model")
        z = check_upload({k: v for k, v in msg.items() if k != "candidates"}, tensors, self.dim,
                         SCORE_FIELDS - {"candidates"})
        cands = msg.get("candidates")
        if not isinstance(cands, list) or not cands or not all(isinstance(c, str) and c.strip() for c in cands):
            raise UserError("field candidates: need a non-empty list of non-empty strings")
        nll = self.scorer(msg["context"], cands, z)
        await conn.send("scores", nll=[float(x) for x in nll])

    async def close(self) -> None:
        if self.server:
            self.server.close()
            await self.server.wait_closed()


class DeviceClient:
    """A device: samples a fresh embedding from its distribution per request; sends no identifier."""

    def __init__(self, conn: Connection, dist, basis, seed: int = 0):
        self.conn, self.dist, self.basis = conn, dist, basis
        self.gen = torch.Generator().manual_seed(seed)
        self.embed_s: list[float] = []

    @classmethod
    async def connect(cls, host: str, port: int, dist, basis, seed: int = 0, timeout: float = 30.0) -> DeviceClient:
        return cls(await Connection.open(host, port, Trace("device"), timeout=timeout), dist, basis, seed)

    def embedding(self) -> torch.Tensor:
        t = time.perf_counter()
        z = self.dist.sample(1, self.basis, self.gen)[0].float().contiguous()
        self.embed_s.append(time.perf_counter() - t)
        return z

    async def request(self, type_: str, **fields) -> dict:
        await self.conn.send(type_, {"embedding": self.embedding()}, **fields)
        msg, _ = await self.conn.recv()
        if msg["type"] == "rejected":
            raise UserError(f"cloud rejected the {type_}: {msg['message']}")
        return msg

    async def upload(self, context: str, text: str) -> dict:
        return await self.request("upload", context=context, text=text)

    async def score(self, context: str, candidates: list[str]) -> list[float]:
        return (await self.request("score", context=context, candidates=candidates))["nll"]

    async def close(self) -> None:
        try:
            await self.conn.send("bye")
        except PeerGone:
            pass
        await self.conn.close()
