"""The collaboration core on loopback: frames, faults (version, truncation, size, silence, peer down), link proxy."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from edgecloud.collab.link import Direction, LinkConfig, LinkProxy
from edgecloud.collab.wire import HEAD, MAGIC, Connection, PeerGone, ProtocolError, Trace, decode_body, encode
from edgecloud.errors import UserError


def test_encode_roundtrip_bit_exact():
    ts = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64), "c": torch.randn(4).half()}
    data = encode({"type": "x", "n": 3}, ts)
    _, _, nh, npay = HEAD.unpack(data[: HEAD.size])
    msg, back = decode_body(data[HEAD.size : HEAD.size + nh], data[HEAD.size + nh :])
    assert msg == {"type": "x", "n": 3}
    for k, t in ts.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t)


def test_decode_rejects_short_payload():
    data = encode({"type": "x"}, {"a": torch.zeros(4)})
    _, _, nh, _ = HEAD.unpack(data[: HEAD.size])
    with pytest.raises(ProtocolError, match="payload holds"):
        decode_body(data[HEAD.size : HEAD.size + nh], data[HEAD.size + nh : -4])


async def _pair(handler, **kw):
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    conn = await Connection.open("127.0.0.1", port, Trace("device"), **kw)
    return server, conn


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_connection_roundtrip_and_trace():
    async def echo(r, w):
        c = Connection(r, w, Trace("cloud"))
        msg, ts = await c.recv()
        await c.send("echo", ts, n=msg["n"])

    async def go():
        server, conn = await _pair(echo)
        t = torch.randn(49152)
        await conn.send("hello", {"logq": t}, n=5)
        msg, back = await conn.expect("echo")
        assert msg["n"] == 5 and torch.equal(back["logq"], t)
        tot = conn.trace.totals()
        assert tot["sent_msgs"] == tot["recv_msgs"] == 1 and tot["sent_bytes"] > 49152 * 4
        await conn.close()
        server.close()

    run(go())


@pytest.mark.parametrize("raw,exc,match", [
    (HEAD.pack(MAGIC, 2, 2, 0) + b"{}", ProtocolError, "version 2"),
    (HEAD.pack(b"XX", 1, 2, 0) + b"{}", ProtocolError, "magic"),
    (HEAD.pack(MAGIC, 1, 10, 1 << 30), ProtocolError, "over the"),
    (HEAD.pack(MAGIC, 1, 100, 0) + b'{"type"', PeerGone, "cut a frame short"),
])
def test_bad_frames_are_clear_errors(raw, exc, match):
    async def bad(r, w):
        w.write(raw)
        await w.drain()
        w.close()

    async def go():
        server, conn = await _pair(bad)
        with pytest.raises(exc, match=match):
            await conn.recv(timeout=5)
        server.close()

    run(go())


def test_silent_peer_times_out_and_down_peer_is_peergone():
    async def silent(r, w):
        await asyncio.sleep(10)

    async def go():
        server, conn = await _pair(silent)
        t0 = time.monotonic()
        with pytest.raises(PeerGone, match="nothing for"):
            await conn.recv(timeout=0.2)
        assert time.monotonic() - t0 < 2
        server.close()
        port = server.sockets[0].getsockname()[1] if server.sockets else 1
        with pytest.raises(PeerGone, match="cannot connect"):
            await Connection.open("127.0.0.1", port, Trace("d"), timeout=1, retries=1, backoff=0.01)

    run(go())


def test_link_model_delay_bandwidth_order():
    import random

    d = Direction(LinkConfig(rtt_ms=100, bandwidth_mbps=8), random.Random(0))
    a = d.arrival(1_000_000, 0.0)  # 1 MB at 8 Mbit/s: 1 s on the wire + 50 ms
    assert a == pytest.approx(1.05)
    b = d.arrival(10, 0.0)  # queued behind the first, never overtakes
    assert b >= a
    with pytest.raises(UserError, match="jitter"):
        LinkConfig(jitter=1.5)


def test_link_proxy_adds_rtt_on_loopback():
    async def echo(r, w):
        while data := await r.read(1024):
            w.write(data)
            await w.drain()

    async def go():
        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        proxy = LinkProxy(("127.0.0.1", server.sockets[0].getsockname()[1]), LinkConfig(rtt_ms=120, jitter=0.2))
        port = await proxy.start()
        r, w = await asyncio.open_connection("127.0.0.1", port)
        rtts = []
        for _ in range(5):
            t0 = time.monotonic()
            w.write(b"ping")
            await r.readexactly(4)
            rtts.append(time.monotonic() - t0)
        w.close()
        await proxy.close()
        server.close()
        return rtts

    rtts = run(go())
    assert all(0.09 < x < 0.4 for x in rtts), rtts
