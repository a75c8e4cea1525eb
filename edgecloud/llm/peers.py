"""A peer engine over HTTP: a running vLLM OpenAI-compatible server, timed the way we time ourselves.

Prompts go as token ids (the very ids our engine runs, so nothing is re-tokenized and vLLM's prefix cache sees
the same blocks we do), answers are streamed, and TTFT is the time until the first streamed token arrives. The
server is never started here (it is an optional, bench-only install: docs/llm.md, scripts/peers_vllm.sh). A server
that does not answer is a :class:`UserError` before anything is measured, so a peer number is only ever one that
was measured in the same run.
"""

from __future__ import annotations

import json
import time

from edgecloud.errors import UserError


class VLLMPeer:
    """A client of one vLLM server; ``model``/``root`` name what it serves (recorded beside every peer number)."""

    def __init__(self, url: str, timeout: float = 600.0):
        import httpx

        self.url = url.rstrip("/")
        self._http = httpx
        self.client = httpx.Client(base_url=self.url, timeout=timeout)
        try:
            r = self.client.get("/v1/models", timeout=10)
            r.raise_for_status()
            m = r.json()["data"][0]
        except (httpx.HTTPError, ValueError, KeyError, IndexError) as e:
            self.client.close()
            raise UserError(f"--peer vllm: no OpenAI-compatible server answers at {self.url} ({type(e).__name__}); "
                            f"start vLLM there (scripts/peers_vllm.sh) or drop --peer") from None
        self.model, self.root = m["id"], m.get("root", m["id"])

    def __enter__(self) -> VLLMPeer:
        return self

    def __exit__(self, *exc) -> None:
        self.client.close()

    def stream(self, ids: list[int], max_tokens: int = 1) -> tuple[list[float], int]:
        """Greedy completion of ``ids``: arrival times (s after sending) of the streamed chunks, and the number of
        tokens generated (from the usage record; EOS is ignored so ``max_tokens`` are produced)."""
        body = {"model": self.model, "prompt": ids, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "ignore_eos": True, "stream_options": {"include_usage": True}}
        times, n = [], 0
        try:
            t0 = time.perf_counter()
            with self.client.stream("POST", "/v1/completions", json=body) as r:
                r.raise_for_status()
                for line in r.iter_lines():
                    if not line.startswith("data:") or line.strip() == "data: [DONE]":
                        continue
                    d = json.loads(line[5:])
                    if d.get("choices"):
                        times.append(time.perf_counter() - t0)
                    if d.get("usage"):
                        n = d["usage"].get("completion_tokens", n)
        except self._http.HTTPError as e:
            raise UserError(f"--peer vllm: the server at {self.url} failed a request ({type(e).__name__}: {e})"
                            ) from None
        if not times:
            raise UserError(f"--peer vllm: the server at {self.url} streamed no token")
        return times, n or len(times)

    def ttft(self, ids: list[int]) -> float:
        return self.stream(ids, 1)[0][0]

    def decode_tok_s(self, ids: list[int], steps: int) -> float:
        """Batch-1 decode tokens/s: tokens after the first over the time between the first and the last chunk."""
        times, n = self.stream(ids, steps + 1)
        if len(times) < 2 or times[-1] <= times[0]:
            raise UserError("--peer vllm: too few streamed chunks to time decoding")
        return (n - 1) / (times[-1] - times[0])

    def prefix_cache_counters(self) -> dict[str, float]:
        """vLLM's prefix-cache counters from /metrics (tokens queried and hit, summed over labels); {} if absent."""
        try:
            text = self.client.get("/metrics", timeout=10).text
        except self._http.HTTPError:
            return {}
        out: dict[str, float] = {}
        for line in text.splitlines():
            name = line.split("{")[0].split(" ")[0].removeprefix("vllm:").removesuffix("_total")
            if name in ("prefix_cache_queries", "prefix_cache_hits"):  # not *_created (a timestamp)
                try:
                    out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
                except ValueError:
                    pass
        return out
