"""`edgecloud kvcache serve` as a user runs it: a real uvicorn process on a loopback port, bounded requests."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_live_server_round_trip(tmp_path):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgecloud.cli", "kvcache", "serve", "--host", "127.0.0.1", "--port", str(port),
         "--store", str(tmp_path / "kv"), "--k", "8"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240  # the first load may convert the model
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited early: {proc.stdout.read()[-2000:]}")
            try:
                if httpx.get(f"{base}/health", timeout=2).json()["ok"]:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                pytest.fail("server did not come up within 240 s")
            time.sleep(0.5)
        docs = ["Paris is the capital of France.", "Berlin is the capital of Germany."]
        body = {"chunks": docs, "question": "What is the capital of Germany?", "max_new_tokens": 6}
        first = httpx.post(f"{base}/generate", json=body, timeout=120).json()
        again = httpx.post(f"{base}/generate", json={**body, "chunks": docs[::-1]}, timeout=120).json()
        assert first["chunks_computed"] == 3  # system prompt + two documents, all new
        assert again["chunks_computed"] == 0  # reordered: every chunk comes from the store
        assert (tmp_path / "kv").exists() and any((tmp_path / "kv").rglob("*.safetensors"))
        r = httpx.post(f"{base}/generate", json={"question": "x", "selector": "bogus"}, timeout=30)
        assert r.status_code == 422
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
