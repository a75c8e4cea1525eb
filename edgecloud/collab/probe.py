"""A link probe made of the collab core's own processes: a server that answers, a client that measures.

The client speaks the real wire protocol (:mod:`edgecloud.collab.wire`) and measures what DRAGON's traffic sees:
the round trip of a small message (``ping``/``pong``), the round trip of one message carrying a tensor of a given
size answered by a small ``ack`` (a draft and its verdict), and bulk throughput (``blobs`` tensors back to back,
one ``ack`` at the end: payload bits / time). Run it across any link, the userspace proxy or a kernel-shaped one
(:mod:`edgecloud.collab.netns`), and compare.

    python -m edgecloud.collab.probe server --host 127.0.0.1 --port 0     # prints "probe listening on HOST:PORT"
    python -m edgecloud.collab.probe client --to 127.0.0.1:PORT           # prints one JSON line
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from edgecloud.collab.wire import Connection, PeerGone, ProtocolError, Trace
from edgecloud.errors import UserError


@dataclass(frozen=True)
class ProbeConfig:
    pings: int = 5
    message_bytes: int = 196_608  # one DRAGON draft: 49,152 float32 log-probabilities
    messages: int = 3
    bulk_bytes: int = 2_000_000
    timeout_s: float = 60.0

    def __post_init__(self):
        for f in ("pings", "messages", "message_bytes", "bulk_bytes"):
            if getattr(self, f) < 1:
                raise UserError(f"probe {f}={getattr(self, f)}: must be >= 1")


async def _session(r, w) -> None:
    conn = Connection(r, w, Trace("server"), timeout=120)
    try:
        while True:
            msg, _ = await conn.recv()
            if msg["type"] == "bye":
                break
            if msg["type"] == "ping":
                await conn.send("pong")
            elif msg["type"] == "blob" and msg.get("reply", True):
                await conn.send("ack")
    except (PeerGone, ProtocolError):
        pass
    finally:
        await conn.close()


async def serve(host: str, port: int) -> None:
    server = await asyncio.start_server(_session, host, port)
    print(f"probe listening on {host}:{server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


async def measure(host: str, port: int, cfg: ProbeConfig) -> dict:
    """Round trips and throughput to a probe server; seconds and Mbit/s of tensor payload."""
    conn = await Connection.open(host, port, Trace("client"), timeout=cfg.timeout_s)
    try:
        blob = torch.zeros(cfg.message_bytes // 4, dtype=torch.float32)
        await conn.send("blob", {"x": blob})  # warm-up: connection set-up and TCP slow start off the clock
        await conn.expect("ack")
        pings = []
        for _ in range(cfg.pings):
            t0 = time.perf_counter()
            await conn.send("ping")
            await conn.expect("pong")
            pings.append(time.perf_counter() - t0)
        msgs = []
        for _ in range(cfg.messages):
            t0 = time.perf_counter()
            await conn.send("blob", {"x": blob})
            await conn.expect("ack")
            msgs.append(time.perf_counter() - t0)
        n = max(1, cfg.bulk_bytes // (blob.numel() * 4))
        t0 = time.perf_counter()
        for i in range(n):
            await conn.send("blob", {"x": blob}, reply=i == n - 1)
        await conn.expect("ack")
        bulk_s = time.perf_counter() - t0
        await conn.send("bye")
    finally:
        await conn.close()
    return {"ping_rtt_s": statistics.median(pings), "message_rtt_s": statistics.median(msgs),
            "message_bytes": blob.numel() * 4, "bulk_mbps": n * blob.numel() * 4 * 8 / bulk_s / 1e6,
            "bulk_bytes": n * blob.numel() * 4, "config": asdict(cfg)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("server")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=0)
    c = sub.add_parser("client")
    c.add_argument("--to", required=True, help="HOST:PORT of a probe server")
    for f, v in asdict(ProbeConfig()).items():
        c.add_argument("--" + f.replace("_", "-"), type=type(v), default=v)
    a = ap.parse_args(argv)
    if a.cmd == "server":
        try:
            asyncio.run(serve(a.host, a.port))
        except KeyboardInterrupt:
            pass
        return
    host, _, port = a.to.rpartition(":")
    cfg = ProbeConfig(**{f: getattr(a, f) for f in asdict(ProbeConfig())})
    print(json.dumps(asyncio.run(measure(host, int(port), cfg))), flush=True)


if __name__ == "__main__":
    main()
