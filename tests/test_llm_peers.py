"""The vLLM peer client against a fake OpenAI-compatible server: streamed timing, usage, prefix-cache counters."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from edgecloud.errors import UserError
from edgecloud.llm.peers import VLLMPeer

METRICS = """# HELP vllm:prefix_cache_queries Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries counter
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 1000.0
vllm:prefix_cache_queries_created{engine="0",model_name="m"} 1.764e+09
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 250.0
"""


class Fake(BaseHTTPRequestHandler):
    bodies: list[dict] = []

    def log_message(self, *a):
        pass

    def _send(self, code, body, ctype="application/json"):
        self.send_response(code)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802 - http.server's name
        if self.path == "/v1/models":
            self._send(200, json.dumps({"data": [{"id": "m", "root": "/models/m"}]}).encode())
        elif self.path == "/metrics":
            self._send(200, METRICS.encode(), "text/plain")
        else:
            self._send(404, b"{}")

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        Fake.bodies.append(body)
        if body["prompt"] == [0]:
            return self._send(400, b'{"error": "bad prompt"}')
        n = body["max_tokens"]
        chunks = [{"choices": [{"text": f"t{i}"}]} for i in range(n)]
        chunks.append({"choices": [], "usage": {"prompt_tokens": len(body["prompt"]), "completion_tokens": n}})
        out = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
        self._send(200, out.encode(), "text/event-stream")


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Fake)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_peer_streams_token_ids_and_reads_usage_and_counters(server):
    with VLLMPeer(server) as p:
        assert (p.model, p.root) == ("m", "/models/m")
        times, n = p.stream([5, 6, 7], max_tokens=4)
        assert n == 4 and len(times) == 4 and times == sorted(times) and times[0] > 0
        assert p.ttft([1, 2]) > 0
        assert p.decode_tok_s([1, 2], 8) > 0
        assert p.prefix_cache_counters() == {"prefix_cache_queries": 1000.0, "prefix_cache_hits": 250.0}
    sent = Fake.bodies[0]
    assert sent["prompt"] == [5, 6, 7] and sent["temperature"] == 0 and sent["stream"] and sent["ignore_eos"]


def test_peer_failed_request_is_a_user_error(server):
    with VLLMPeer(server) as p, pytest.raises(UserError, match="failed a request"):
        p.ttft([0])
