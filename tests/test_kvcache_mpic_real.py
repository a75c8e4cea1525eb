"""MPIC on the real SmolLM2: layer-0 exactness of re-rotated keys, the HTTP server, and chunk-too-long errors."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow  # loads the real SmolLM2 (a ~40 s conversion on a machine that has none cached)


@pytest.fixture(scope="module")
def smol():
    from edgecloud.llm.engine import Engine
    from edgecloud.llm.models import load_model

    return Engine(load_model("smollm2-135m"), threads=1)


def test_rerotated_keys_match_fresh_prefill_layer0(smol):
    from edgecloud.llm.corpus import passages

    ps = passages()
    a, b = smol.encode(ps[3].text)[:120], smol.encode(ps[7].text)[:90]
    _, cache = smol.prefill(a + b)
    k, v = smol.kv_of(b)
    fresh_k = cache.layers[0].keys[0][:, len(a):]
    fresh_v = cache.layers[0].values[0][:, len(a):]
    assert torch.allclose(smol.rotate(k[0], len(a)), fresh_k, atol=1e-4)
    assert torch.allclose(v[0], fresh_v, atol=1e-4)


def test_server_generate_with_reuse(smol, tmp_path):
    from fastapi.testclient import TestClient

    from edgecloud.kvcache.server import build

    client = TestClient(build(smol, tmp_path, k=8))
    assert client.get("/health").json()["ok"]
    docs = ["Paris is the capital of France.", "Berlin is the capital of Germany."]
    r = client.post("/chunks", json={"chunks": docs})
    assert r.status_code == 200 and len(r.json()["keys"]) == 2
    body = {"chunks": docs[::-1], "question": "What is the capital of France?", "max_new_tokens": 6}
    r = client.post("/generate", json=body)
    out = r.json()
    assert r.status_code == 200, out
    assert out["chunks_computed"] == 1  # only the system-prompt chunk was new; the documents were ingested
    assert out["recomputed_tokens"] < out["prompt_tokens"]
    assert "Paris" in out["text"]
    out2 = client.post("/generate", json={**body, "chunks": docs}).json()  # other order: everything reused
    assert out2["chunks_computed"] == 0 and out2["prompt_tokens"] == out["prompt_tokens"]
    r = client.post("/generate", json={"chunks": ["word " * 9000], "question": "?", "max_new_tokens": 2})
    assert r.status_code == 400 and "context" in r.json()["detail"]
    assert client.post("/generate", json={"question": "x", "selector": "bogus"}).status_code == 422
