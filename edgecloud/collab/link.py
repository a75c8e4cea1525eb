"""A userspace link emulator: a TCP proxy adding one-way delay, jitter, a bandwidth cap and loss.

This kernel has no ``netem`` qdisc, so delay and jitter live here. Each direction is a FIFO: a chunk read at time
``t`` leaves the (emulated) sender after the link is free plus ``bytes * 8 / bandwidth`` (serialization), then
arrives after a one-way delay ``delay * (1 + U(-jitter, jitter))``; arrivals never overtake each other (TCP keeps
order). Loss on a TCP stream is not a missing byte but a retransmission, so a lost chunk arrives one
retransmission timeout (``rto_ms``) late. Seeded: the same seed gives the same delays.

Run: ``python -m edgecloud.collab.link --listen 9001 --to 127.0.0.1:9000 --rtt-ms 100 --jitter 0.2``.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from dataclasses import dataclass

from edgecloud.errors import UserError


@dataclass(frozen=True)
class LinkConfig:
    rtt_ms: float = 0.0  # round trip; each direction gets half
    jitter: float = 0.0  # relative, delay * (1 + U(-jitter, jitter))
    bandwidth_mbps: float = 0.0  # 0 = unlimited
    loss: float = 0.0  # per chunk probability of one retransmission timeout
    rto_ms: float = 200.0
    seed: int = 0

    def __post_init__(self):
        if self.rtt_ms < 0:
            raise UserError(f"link rtt_ms={self.rtt_ms}: must be >= 0")
        if not 0 <= self.jitter < 1:
            raise UserError(f"link jitter={self.jitter}: must be in [0, 1)")
        if self.bandwidth_mbps < 0:
            raise UserError(f"link bandwidth_mbps={self.bandwidth_mbps}: must be >= 0 (0 = unlimited)")
        if not 0 <= self.loss < 1:
            raise UserError(f"link loss={self.loss}: must be in [0, 1)")


class Direction:
    """One direction's timing model; ``arrival(nbytes, now)`` is when a chunk read at ``now`` reaches the far end."""

    def __init__(self, cfg: LinkConfig, rng: random.Random):
        self.cfg, self.rng = cfg, rng
        self.link_free = 0.0
        self.last_arrival = 0.0

    def arrival(self, nbytes: int, now: float) -> float:
        c = self.cfg
        tx = nbytes * 8 / (c.bandwidth_mbps * 1e6) if c.bandwidth_mbps > 0 else 0.0
        self.link_free = max(now, self.link_free) + tx
        delay = c.rtt_ms / 2000 * (1 + self.rng.uniform(-c.jitter, c.jitter))
        if c.loss and self.rng.random() < c.loss:
            delay += c.rto_ms / 1000
        self.last_arrival = max(self.link_free + delay, self.last_arrival)
        return self.last_arrival


async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, model: Direction) -> None:
    q: asyncio.Queue = asyncio.Queue()

    async def deliver():
        while True:
            item = await q.get()
            if item is None:
                break
            at, data = item
            wait = at - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            dst.write(data)
            await dst.drain()
        dst.close()

    task = asyncio.create_task(deliver())
    try:
        while data := await src.read(65536):
            q.put_nowait((model.arrival(len(data), time.monotonic()), data))
    except OSError:
        pass
    q.put_nowait(None)
    try:
        await task
    except OSError:
        pass


class LinkProxy:
    """Listens on ``listen_port``; each accepted connection is piped to ``upstream`` through the emulated link."""

    def __init__(self, upstream: tuple[str, int], cfg: LinkConfig, host: str = "127.0.0.1", listen_port: int = 0):
        self.upstream, self.cfg, self.host, self.listen_port = upstream, cfg, host, listen_port
        self.server: asyncio.base_events.Server | None = None
        self.rng = random.Random(cfg.seed)

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, self.host, self.listen_port)
        self.listen_port = self.server.sockets[0].getsockname()[1]
        return self.listen_port

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection(*self.upstream)
        except OSError:
            w.close()
            return
        up, down = Direction(self.cfg, self.rng), Direction(self.cfg, self.rng)
        await asyncio.gather(_pump(r, uw, up), _pump(ur, w, down))

    async def close(self) -> None:
        if self.server:
            self.server.close()
            await self.server.wait_closed()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", type=int, required=True)
    ap.add_argument("--to", required=True, help="HOST:PORT of the server behind the link")
    ap.add_argument("--rtt-ms", type=float, default=0.0)
    ap.add_argument("--jitter", type=float, default=0.0)
    ap.add_argument("--bandwidth-mbps", type=float, default=0.0)
    ap.add_argument("--loss", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    host, port = a.to.rsplit(":", 1)
    cfg = LinkConfig(a.rtt_ms, a.jitter, a.bandwidth_mbps, a.loss, seed=a.seed)

    async def run():
        p = LinkProxy((host, int(port)), cfg, listen_port=a.listen)
        await p.start()
        print(f"link proxy :{p.listen_port} -> {a.to} {cfg}", flush=True)
        await asyncio.Event().wait()

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
