"""The OpenAI-compatible LoRA server, driven by the real ``openai`` client against a live server on loopback.

A tiny Llama with SmolLM2's tokenizer keeps it fast; a second, identically initialised copy gives the reference
(each request alone, unbatched). Concurrent requests over several adapters (hot-loaded on first use) must return
exactly their reference tokens, streaming must equal non-streaming, and every bad request gets its 4xx while the
server keeps answering.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from edgecloud.llm.batch import generate_batch
from edgecloud.llm.engine import Engine
from edgecloud.llm.models import LoadedModel, resolve
from edgecloud.lora.adapters import random_adapter, save_adapter
from edgecloud.lora.layer import LoRAModel

openai = pytest.importorskip("openai")
BASE = "tiny"


def tiny_chat_engine(tok, hidden=64) -> Engine:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96)
    return Engine(LoadedModel(LlamaForCausalLM(cfg).eval(), tok, "tiny", BASE, Path("."), chat=True), threads=1)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import uvicorn
    from transformers import AutoTokenizer

    from edgecloud.lora.server import ServeConfig, build

    tok = AutoTokenizer.from_pretrained(resolve("smollm2-135m")[1], local_files_only=True)
    d = tmp_path_factory.mktemp("adapters")
    ref = tiny_chat_engine(tok)
    for i in range(3):
        save_adapter(random_adapter(ref.model, BASE, f"a{i}", rank=4, seed=i, scale=0.3), d / f"a{i}")
    save_adapter(random_adapter(ref.model, "another-model", "other", rank=4), d / "otherbase")
    save_adapter(random_adapter(tiny_chat_engine(tok, hidden=32).model, BASE, "small", rank=4), d / "wrongshape")
    save_adapter(random_adapter(ref.model, BASE, "big", rank=4), d / "bigrank")
    cfg = json.loads((d / "bigrank" / "adapter_config.json").read_text())
    (d / "bigrank" / "adapter_config.json").write_text(json.dumps({**cfg, "r": 128}))
    (d / "notpeft").mkdir()
    (d / "notpeft" / "weights.bin").write_bytes(b"\0" * 16)

    ref_lora = LoRAModel(ref.model, BASE)
    from edgecloud.lora.adapters import load_adapter

    for i in range(3):
        ref_lora.add(load_adapter(d / f"a{i}", ref.model, BASE))
    eng = tiny_chat_engine(tok)
    app = build(eng, LoRAModel(eng.model, BASE), BASE, d, ServeConfig(max_batch=4))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    t0 = time.time()
    while not srv.started:
        assert time.time() - t0 < 30, "server did not start"
        time.sleep(0.05)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
    yield client, ref, ref_lora, port
    srv.should_exit = True
    th.join(timeout=30)


def _reference(ref, ref_lora, prompt_ids, adapter, n):
    ref_lora.seq_adapter = {0: adapter}
    with torch.inference_mode():
        out = generate_batch(ref, [prompt_ids], n)[0]
    toks = [t for t in out.tokens if t not in ref.eos_ids]
    return ref.decode_text(toks)


def test_models_and_concurrent_completions_equal_reference(server):
    client, ref, ref_lora, _ = server
    ids = {m.id for m in client.models.list().data}
    assert {BASE, f"{BASE}:a0", f"{BASE}:a1", f"{BASE}:a2"} <= ids
    jobs = [(f"prompt number {i} about adapters", [None, "a0", "a1", "a2"][i % 4]) for i in range(8)]

    def ask(job):
        text, ad = job
        r = client.completions.create(model=f"{BASE}:{ad}" if ad else BASE, prompt=text, max_tokens=6)
        return r.choices[0].text

    with ThreadPoolExecutor(8) as ex:
        got = list(ex.map(ask, jobs))
    want = [_reference(ref, ref_lora, ref.encode(t), a, 6) for t, a in jobs]
    assert got == want
    assert want[0] != want[1] or want[0] != want[2]  # adapters change the output: the comparison can fail


def test_chat_stream_equals_non_stream(server):
    client, *_ = server
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    full = client.chat.completions.create(model=f"{BASE}:a1", messages=msgs, max_tokens=7)
    parts = [c.choices[0].delta.content or "" for c in
             client.chat.completions.create(model=f"{BASE}:a1", messages=msgs, max_tokens=7, stream=True)]
    assert "".join(parts) == full.choices[0].message.content and full.usage.completion_tokens >= 1


@pytest.mark.parametrize("model,status,words", [
    (f"{BASE}:nope", 404, "no such adapter"), (f"{BASE}:notpeft", 400, "not a peft adapter"),
    (f"{BASE}:otherbase", 400, "trained for base"), (f"{BASE}:wrongshape", 400, "another base"),
    (f"{BASE}:bigrank", 400, "rank")])
def test_bad_adapters_are_4xx_and_server_keeps_serving(server, model, status, words):
    client, *_ = server
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model=model, prompt="hello", max_tokens=2)
    assert e.value.status_code == status and words in str(e.value)
    assert client.completions.create(model=BASE, prompt="hello", max_tokens=2).choices[0].text is not None


def test_malformed_and_oversized_requests(server):
    client, _, _, port = server
    url = f"http://127.0.0.1:{port}/v1/completions"
    assert httpx.post(url, content=b"{not json", headers={"content-type": "application/json"}).status_code == 422
    r = httpx.post(url, json={"model": BASE, "prompt": "x", "max_tokens": 0})
    assert r.status_code == 422 and "max_tokens" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model=BASE, prompt="word " * 200, max_tokens=4)
    r = httpx.post(url, json={"model": BASE, "prompt": "hi", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] >= 1
