"""`edgecloud llm bench --peer ...`: a peer that is not installed or not reachable fails at once, with one line,
before anything is measured (a peer number is only ever one that was measured)."""

from __future__ import annotations

import importlib.util

import pytest
from typer.testing import CliRunner

from edgecloud.errors import UserError  # the CLI entry point turns it into one line and exit 2
from edgecloud.llm.cli import app


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is not None, reason="llama_cpp is installed here")
def test_llamacpp_absent_is_one_line():
    r = CliRunner().invoke(app, ["bench", "--quick", "--peer", "llamacpp"])
    assert isinstance(r.exception, UserError) and "llama_cpp is not importable" in str(r.exception)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_vllm_unreachable_is_one_line():
    r = CliRunner().invoke(app, ["bench", "--quick", "--peer", "vllm", "--peer-url", "http://127.0.0.1:9"])
    assert isinstance(r.exception, UserError) and "no vLLM server answers" in str(r.exception)


def test_unknown_peer():
    r = CliRunner().invoke(app, ["bench", "--peer", "tgi"])
    assert isinstance(r.exception, UserError) and "choose vllm or llamacpp" in str(r.exception)


def test_bad_result_name():
    r = CliRunner().invoke(app, ["bench", "--name", "../x"])
    assert isinstance(r.exception, UserError) and "--name '../x'" in str(r.exception)


def test_rounds_need_vllm():
    r = CliRunner().invoke(app, ["bench", "--rounds", "3"])
    assert isinstance(r.exception, UserError) and "--rounds 3" in str(r.exception)


def test_peer_rounds_interleave_and_report_medians(monkeypatch):
    """Interleaved rounds: ours and the peer's timings alternate (prefill, prefill, decode, decode, batch 16) in
    every round, medians are reported, and every round's ratios are kept."""
    import edgecloud.llm.bench as bench
    import edgecloud.llm.peers as peers

    calls: list[str] = []
    prompts: list[list[int]] = []
    ours_prefill, ours_dec, ours_b16 = iter([400.0, 300.0, 500.0]), iter([20.0, 30.0, 10.0]), iter([160.0] * 3)
    peer_ttft, peer_dec = iter([1500 / 410, 9.0, 1500 / 200, 9.0, 1500 / 450, 9.0]), iter([21.0, 20.0, 19.0, 18.0])

    class FakePeer:
        root = "fake"

        def __init__(self, url):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *a):
            pass

        def ttft(self, ids):
            calls.append("peer_prefill")
            prompts.append(ids)
            return next(peer_ttft)

        def decode_tok_s(self, ids, steps):
            calls.append("peer_decode")
            return next(peer_dec)

        def prefix_cache_counters(self):
            return {"prefix_cache_hits": 0.0}

    def prefill(engine, n):
        calls.append("prefill")
        return next(ours_prefill)

    def decode(engine, b, steps, prompt):
        calls.append(f"decode{b}")
        return next(ours_b16) if b == 16 else next(ours_dec)

    monkeypatch.setattr(peers, "VLLMPeer", FakePeer)
    monkeypatch.setattr(bench, "prefill_speed", prefill)
    monkeypatch.setattr(bench, "decode_speed", decode)
    monkeypatch.setattr(bench, "_held_out_text", lambda engine, n, skip=0: list(range(n)))
    out = bench.peer_vllm("http://x", None, bench.EngineBenchConfig(settle_s=0.0), rounds=3)
    one = ["prefill", "peer_prefill", "peer_prefill", "decode1", "peer_decode", "decode16"]
    assert calls == ["peer_decode"] + one * 3  # warm-up, then three interleaved rounds
    assert out["prefill_tok_s"] == 400.0 and out["peer_prefill_tok_s"] == 410.0  # medians
    assert out["decode_tok_s_batch1"] == 20.0 and out["peer_decode_tok_s_batch1"] == 19.0
    assert out["batch16_speedup"] == 160.0 / 20.0
    assert out["prefill_ratio_vs_peer_rounds"] == [400 / 410, 300 / 200, 500 / 450]
    assert out["decode_ratio_vs_peer_rounds"] == [20 / 20, 30 / 19, 10 / 18]
    assert out["peer_prefill_cache_hit_tokens"] == 0.0
    # every peer prefill prompt is new to the server (salted first tokens), and the rest is the text's tokens
    assert len({tuple(p) for p in prompts}) == len(prompts) == 6
    assert all(len(p) == 1500 and set(p[4:]) <= set(range(1500)) for p in prompts)
