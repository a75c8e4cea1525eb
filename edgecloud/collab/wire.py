"""Framed, typed, versioned messages over asyncio TCP streams, with tensors as raw bytes (never pickle).

Why asyncio streams and not gRPC: the two sides exchange small messages at token rate and each side must read
while it keeps computing; one stdlib event loop per process, no code generation, no extra dependency, and the frame
format below is fully ours, so the link emulator can sit in the middle as a byte pipe.

Frame: ``b"EC"`` magic, protocol version (u8), header length (u32), payload length (u32), then a JSON header
``{"type": ..., **fields, "tensors": [{"name", "dtype", "shape"}]}`` and the tensors' raw little-endian bytes
back to back. A frame over ``max_frame`` bytes, a bad magic, another version or a stream cut mid-frame is a
:class:`ProtocolError` naming what was wrong; a peer that says nothing for ``timeout`` seconds is a
:class:`PeerGone`. Every message sent and received is recorded in a :class:`Trace`.
"""

from __future__ import annotations

import asyncio
import json
import struct
import time
from dataclasses import dataclass, field

import numpy as np
import torch

VERSION = 1
MAGIC = b"EC"
HEAD = struct.Struct("<2sBII")
MAX_FRAME = 64 << 20
DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64, "int32": torch.int32}


class ProtocolError(Exception):
    """The peer sent something that is not a valid frame of our protocol version."""


class PeerGone(Exception):
    """The peer closed, crashed or went silent past the timeout."""


@dataclass
class TraceEvent:
    side: str
    direction: str  # "send" | "recv"
    type: str
    bytes: int
    t: float  # time.time() when written to / fully read from the socket


@dataclass
class Trace:
    """Every message a side sent or received; wall-clock times so two processes' traces line up on one host."""

    side: str
    events: list[TraceEvent] = field(default_factory=list)

    def add(self, direction: str, type_: str, nbytes: int) -> None:
        self.events.append(TraceEvent(self.side, direction, type_, nbytes, time.time()))

    def totals(self) -> dict:
        out = {"sent_bytes": 0, "recv_bytes": 0, "sent_msgs": 0, "recv_msgs": 0}
        for e in self.events:
            d = "sent" if e.direction == "send" else "recv"
            out[f"{d}_bytes"] += e.bytes
            out[f"{d}_msgs"] += 1
        return out

    def as_rows(self) -> list[dict]:
        return [e.__dict__ for e in self.events]


def encode(msg: dict, tensors: dict[str, torch.Tensor] | None = None) -> bytes:
    metas, blobs = [], []
    for name, t in (tensors or {}).items():
        t = t.detach().contiguous().cpu()
        dt = str(t.dtype).removeprefix("torch.")
        if dt not in DTYPES:
            raise ValueError(f"tensor {name}: dtype {dt} not supported on the wire")
        metas.append({"name": name, "dtype": dt, "shape": list(t.shape)})
        blobs.append(t.numpy().astype(t.numpy().dtype.newbyteorder("<"), copy=False).tobytes())
    head = json.dumps({**msg, "tensors": metas}).encode()
    payload = b"".join(blobs)
    return HEAD.pack(MAGIC, VERSION, len(head), len(payload)) + head + payload


def decode_body(head: bytes, payload: bytes) -> tuple[dict, dict[str, torch.Tensor]]:
    try:
        msg = json.loads(head)
    except ValueError as e:
        raise ProtocolError(f"frame header is not JSON: {e}") from None
    if not isinstance(msg, dict) or "type" not in msg:
        raise ProtocolError("frame header has no message type")
    tensors, off = {}, 0
    for m in msg.pop("tensors", []):
        dt = DTYPES.get(m.get("dtype"))
        if dt is None:
            raise ProtocolError(f"tensor {m.get('name')}: unknown dtype {m.get('dtype')!r}")
        n = int(np.prod(m["shape"])) * torch.empty((), dtype=dt).element_size()
        if off + n > len(payload):
            raise ProtocolError(f"tensor {m['name']}: payload holds {len(payload) - off} bytes, needs {n}")
        arr = np.frombuffer(payload, dtype=np.dtype(str(dt).removeprefix("torch.")).newbyteorder("<"),
                            count=n // torch.empty((), dtype=dt).element_size(), offset=off)
        tensors[m["name"]] = torch.from_numpy(arr.astype(arr.dtype.newbyteorder("="))).reshape(m["shape"])
        off += n
    if off != len(payload):
        raise ProtocolError(f"payload has {len(payload) - off} bytes beyond its tensors")
    return msg, tensors


class Connection:
    """One peer: ``send(type, tensors=..., **fields)`` and ``recv(timeout)`` -> (msg, tensors); traced."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, trace: Trace,
                 timeout: float = 30.0, max_frame: int = MAX_FRAME):
        self.reader, self.writer, self.trace = reader, writer, trace
        self.timeout, self.max_frame = timeout, max_frame

    @classmethod
    async def open(cls, host: str, port: int, trace: Trace, timeout: float = 30.0, retries: int = 3,
                   backoff: float = 0.2) -> Connection:
        """Connect, retrying ``retries`` times with doubling back-off; a peer that is down is one PeerGone."""
        err = None
        for i in range(retries + 1):
            try:
                r, w = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
                return cls(r, w, trace, timeout)
            except (TimeoutError, OSError) as e:
                err = e
                if i < retries:
                    await asyncio.sleep(backoff * 2**i)
        raise PeerGone(f"cannot connect to {host}:{port} after {retries + 1} tries: {err}")

    async def send(self, type_: str, tensors: dict[str, torch.Tensor] | None = None, **fields) -> int:
        data = encode({"type": type_, **fields}, tensors)
        try:
            self.writer.write(data)
            await asyncio.wait_for(self.writer.drain(), self.timeout)
        except (TimeoutError, OSError) as e:
            raise PeerGone(f"send {type_}: peer gone ({type(e).__name__}: {e})") from None
        self.trace.add("send", type_, len(data))
        return len(data)

    async def send_error(self, message: str) -> None:
        """Tell the peer why we give up on it (a protocol error); a peer already gone is not an error here."""
        try:
            await self.send("error", message=message)
        except PeerGone:
            pass

    async def recv(self, timeout: float | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
        t = self.timeout if timeout is None else timeout
        try:
            raw = await asyncio.wait_for(self.reader.readexactly(HEAD.size), t)
            magic, ver, nh, npay = HEAD.unpack(raw)
            if magic != MAGIC:
                raise ProtocolError(f"bad frame magic {magic!r}: the peer is not speaking this protocol")
            if ver != VERSION:
                raise ProtocolError(f"peer speaks protocol version {ver}, this side speaks {VERSION}; "
                                    f"run the same edgecloud version on both sides")
            if nh + npay > self.max_frame:
                raise ProtocolError(f"frame of {nh + npay} bytes is over the {self.max_frame}-byte limit")
            body = await asyncio.wait_for(self.reader.readexactly(nh + npay), t)
        except asyncio.IncompleteReadError as e:
            what = "closed the connection" if not e.partial else f"cut a frame short ({len(e.partial)} bytes)"
            raise PeerGone(f"peer {what}") from None
        except TimeoutError:
            raise PeerGone(f"peer sent nothing for {t:.1f} s") from None
        except OSError as e:
            raise PeerGone(f"connection lost: {e}") from None
        msg, tensors = decode_body(body[:nh], body[nh:])
        self.trace.add("recv", msg["type"], HEAD.size + nh + npay)
        if msg["type"] == "error":
            raise PeerGone(f"peer reported an error: {msg.get('message')}")
        return msg, tensors

    async def expect(self, type_: str, timeout: float | None = None):
        msg, tensors = await self.recv(timeout)
        if msg["type"] != type_:
            raise ProtocolError(f"expected a {type_!r} message, got {msg['type']!r}")
        return msg, tensors

    async def close(self) -> None:
        try:
            self.writer.close()
            await asyncio.wait_for(self.writer.wait_closed(), 2.0)
        except (TimeoutError, OSError):
            pass
