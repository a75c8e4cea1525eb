"""Load test of the kvcache server on a loopback port: 50 concurrent valid requests mixed with oversized and
malformed ones. Every malformed one is a 4xx, valid latency stays bounded (an oversized body never makes a valid
request wait for it), and the server answers afterwards. Bounded: ~70 requests, short prompts, 2 new tokens."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import pytest

DOCS = ["Paris is the capital of France.", "Berlin is the capital of Germany.", "Rome is the capital of Italy.",
        "Madrid is the capital of Spain.", "Lisbon is the capital of Portugal."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import uvicorn

    from edgecloud.kvcache.server import build
    from edgecloud.llm.engine import Engine
    from edgecloud.llm.models import load_model

    engine = Engine(load_model("smollm2-135m"), threads=1)
    app = build(engine, tmp_path_factory.mktemp("kv"), k=8, max_body_mb=0.25)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while not srv.started:
        assert time.time() < deadline and th.is_alive(), "server did not start"
        time.sleep(0.1)
    yield base, engine
    srv.should_exit = True
    th.join(timeout=20)


def valid(i: int) -> dict:
    return {"chunks": [DOCS[i % 5], DOCS[(i + 1) % 5]], "question": f"Which capital is number {i}?",
            "max_new_tokens": 2}


def malformed(engine) -> list[tuple[str, bytes | dict]]:
    too_long = " ".join(["capital"] * (engine.context + 100))  # > context tokens, but under the body cap
    return [
        ("/generate", b"{not json"),
        ("/generate", {"chunks": [], "question": "q"}),
        ("/generate", {"chunks": [""], "question": "q"}),
        ("/generate", {"chunks": ["a"], "question": ""}),
        ("/generate", {"chunks": ["a"]}),
        ("/generate", {"chunks": ["a"], "question": "q", "selector": "bogus"}),
        ("/generate", {"chunks": ["a"], "question": "q", "max_new_tokens": 0}),
        ("/generate", {"chunks": "not a list", "question": "q"}),
        ("/generate", {"chunks": [too_long], "question": "q"}),
        ("/generate", {"chunks": [DOCS[0]] * 2 + [" ".join(["x"] * (engine.context // 2))] * 2, "question": "q"}),
        ("/chunks", {"chunks": []}),
        ("/chunks", {"chunks": [""]}),
        ("/chunks", {"chunks": ["ok", too_long]}),
        ("/generate", {"chunks": ["x" * 400_000], "question": "q"}),  # oversized body: 413 before parsing
        ("/chunks", {"chunks": ["y" * 100_000] * 4}),
    ]


async def post(client: httpx.AsyncClient, path: str, body) -> tuple[int, float, str]:
    t0 = time.perf_counter()
    if isinstance(body, bytes):
        r = await client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = await client.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})
    return r.status_code, time.perf_counter() - t0, r.text


@pytest.mark.slow  # 65 requests against the real model (~15-80 s)
def test_server_load(server):
    base, engine = server
    bad = malformed(engine)

    async def run():
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=base, timeout=300, limits=limits) as c:
            # the oversized and too-long requests go first, so valid ones arrive while they are being refused
            tasks = [post(c, p, b) for p, b in bad[::-1]] + [post(c, "/generate", valid(i)) for i in range(50)]
            return await asyncio.gather(*tasks)

    t0 = time.perf_counter()
    results = asyncio.run(run())
    wall = time.perf_counter() - t0
    bad_res, ok_res = results[:len(bad)], results[len(bad):]
    for (path, body), (code, _, text) in zip(bad[::-1], bad_res, strict=True):
        assert 400 <= code < 500, (path, str(body)[:80], code, text[:200])
    assert bad_res[0][0] == 413 and bad_res[1][0] == 413
    assert "chunks[1]" in bad_res[2][2]  # the too-long /chunks entry is named by its index
    assert all(code == 200 for code, _, _ in ok_res), [t[:200] for c, _, t in ok_res if c != 200]
    lat = sorted(t for _, t, _ in ok_res)
    median = lat[len(lat) // 2]
    # Refusals are decided before any compute, so none waits behind the valid requests being served: every one is
    # answered faster than the median valid request. Relative, not in seconds: the same test ran 137 s at p99 on a
    # 2-core machine at load 20 and must pass there too. The absolute bound is only a hang guard.
    slowest_refusal = max(t for _, t, _ in bad_res)
    assert slowest_refusal < median, f"a refusal took {slowest_refusal:.1f} s, valid median {median:.1f} s"
    assert wall < 900
    r = httpx.get(f"{base}/health", timeout=10)
    assert r.status_code == 200 and r.json()["ok"]
    r = httpx.post(f"{base}/generate", json=valid(99), timeout=60)
    assert r.status_code == 200 and r.json()["text"] is not None


def test_rejected_before_compute(server):
    """Sizes are checked before any compute: a prompt over the context is refused in well under a second of
    model time, and the store does not grow."""
    base, engine = server
    before = httpx.get(f"{base}/health", timeout=10).json()["store"]
    long = " ".join(["word"] * (engine.context // 2 + 50))
    t0 = time.perf_counter()
    r = httpx.post(f"{base}/generate", json={"chunks": [long, long], "question": "q"}, timeout=60)
    took = time.perf_counter() - t0
    assert r.status_code == 400 and "context" in r.json()["detail"]
    assert took < 15, took  # tokenizing only; computing two 4k-token chunks takes minutes on this machine
    assert httpx.get(f"{base}/health", timeout=10).json()["store"] == before
