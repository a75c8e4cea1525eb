"""DRAGON benchmark, one run: perplexity of every baseline, exactness, and latency of two real processes over the
emulated link at several RTTs. ``run(quick=...)`` returns a :class:`~edgecloud.results.Result`.

Exactness measured here: (1) greedy answers of the two-process system in every mode vs centralized REPLUG over the
union computed in one process (fraction identical); (2) max |log p| difference between the cross-side mixture and
the union mixture along the reference answers; (3) a χ² goodness-of-fit test: at fixed prefixes the real
draft-then-verify procedure (cloud drafts from its own mixture, the aggregator accepts with min(1, p/q) or resamples
the residual) is run ``chi2_samples`` times on the cached distributions, and its output counts are tested against
the union mixture p (bins: tokens expected ≥ 5 times, the rest pooled).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from edgecloud.collab.link import LinkConfig
from edgecloud.rag.corpus import make_split
from edgecloud.rag.mix import Side, combine, draft, scored_mixture, target_logprobs, verify
from edgecloud.rag.node import Device, RagConfig, Scheduler, contexts_for
from edgecloud.rag.protocol import local_generate
from edgecloud.rag.store import load_or_build
from edgecloud.results import Result

MODES = ["token-sync", "sequence", "dragon-device", "dragon-cloud", "dragon"]  # dragon: the live scheduler, run
# after the fixed sides at the same RTT so it starts from their measurements (as a deployed device would)


@dataclass(frozen=True)
class BenchConfig:
    articles: int = 16  # 40+ is better but the MiniLM store build alone took > 7 min on the shared 2 cores
    windows: int = 8  # held-out evaluation windows
    window_words: int = 40  # query words, then as many target words
    questions: int = 2  # per (RTT, mode) cell
    max_new: int = 12
    rtts_ms: tuple[int, ...] = (0, 50, 100, 200, 300)
    jitter: float = 0.2
    chi2_samples: int = 5000
    seed: int = 0

    @classmethod
    def quick(cls) -> BenchConfig:
        return cls(articles=16, windows=4, questions=1, max_new=8, rtts_ms=(0, 300), chi2_samples=5000)


def load_all(articles: int, seed: int):
    from edgecloud.llm.engine import Engine
    from edgecloud.llm.models import load_model

    sp = make_split(n_articles=articles, seed=seed)
    return Engine(load_model("smollm2-135m"), threads=1), sp, load_or_build("device", sp.device), \
        load_or_build("cloud", sp.cloud)


def quality(e, sp, dev, cl, cfg: BenchConfig, k: int, tau: float) -> dict:
    """Perplexity of the held-out targets under each condition (Bayesian REPLUG over the chosen documents)."""
    lps = {n: [] for n in ("no_rag", "device_only", "cloud_only", "dragon")}
    for _title, _side, text in sp.held_out[: cfg.windows]:
        words = text.split()
        query = " ".join(words[: cfg.window_words])
        target = e.encode(" " + " ".join(words[cfg.window_words : 2 * cfg.window_words]))
        per, prior = {}, {}
        for name, store in (("device", dev), ("cloud", cl)):
            docs, scores = store.retrieve(query, k)
            seqs = [e.encode_prompt(d.text + "\n\n" + query) + target for d in docs]
            per[name], prior[name] = target_logprobs(e, seqs, target), torch.tensor(scores, dtype=torch.float64) / tau
        plain = target_logprobs(e, [e.encode_prompt(query) + target], target)
        lps["no_rag"].append(plain[0])
        lps["device_only"].append(scored_mixture(prior["device"], per["device"], True))
        lps["cloud_only"].append(scored_mixture(prior["cloud"], per["cloud"], True))
        lps["dragon"].append(scored_mixture(torch.cat([prior["device"], prior["cloud"]]),
                                            torch.cat([per["device"], per["cloud"]]), True))
    return {n: float(torch.exp(-torch.cat(v).mean())) for n, v in lps.items()}


def reference(e, dev, cl, question: str, rc: RagConfig) -> dict:
    """Centralized REPLUG over the union (greedy), plus the cross-side vs union log-prob gap along it and the
    cached distributions at the first three positions for the χ² test."""
    cd, sd, _ = contexts_for(e, dev, question, rc.k)
    cc, sc, _ = contexts_for(e, cl, question, rc.k)
    u, ds, cs = Side(e, cd + cc, sd + sc, rc.tau), Side(e, cd, sd, rc.tau), Side(e, cc, sc, rc.tau)
    for s in (u, ds, cs):
        s.start([])
    toks = local_generate(u, rc.max_new, True, rc.seed)
    u.rollback(0)  # replay along the answer on all three to compare the mixtures position by position
    diff, cached = 0.0, []
    for i, t in enumerate(toks):
        p = u.dist()[1]
        mixed = combine([ds.dist(), cs.dist()])
        diff = max(diff, float((mixed - p).abs().max()))
        if i < 3:
            cached.append((p.clone(), cs.dist()[1].clone()))
        if i < len(toks) - 1:
            for s in (u, ds, cs):
                s.advance(t)
    return {"tokens": toks, "max_logprob_diff": diff, "cached": cached}


def chi2_test(cached, samples: int, seed: int) -> dict:
    from scipy.stats import chisquare

    gen = torch.Generator().manual_seed(seed)
    ps = []
    for logp, logq in cached:
        n = samples // len(cached)
        counts: dict[int, int] = {}
        for _ in range(n):
            tok, _ = verify(logp, logq, draft(logq, False, gen), False, gen)
            counts[tok] = counts.get(tok, 0) + 1
        p = logp.double().exp().numpy()
        big = np.flatnonzero(p * n >= 5)
        obs = [counts.get(int(i), 0) for i in big]
        exp = list(p[big] * n)
        obs.append(n - sum(obs))
        exp.append(n - sum(exp))
        if exp[-1] < 5:  # pool a tiny remainder into the largest bin
            j = int(np.argmax(exp[:-1]))
            obs[j] += obs.pop()
            exp[j] += exp.pop()
        ps.append(float(chisquare(obs, exp).pvalue))
    return {"p_values": ps, "samples": samples, "p_min_bonferroni": min(1.0, min(ps) * len(ps))}


def start_cloud(cfg: BenchConfig) -> tuple[subprocess.Popen, int]:
    env = dict(os.environ, EDGECLOUD_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "edgecloud", "rag", "cloud", "--port", "0", "--articles",
                             str(cfg.articles), "--seed", str(cfg.seed)], stdout=subprocess.PIPE, env=env, text=True)
    line = proc.stdout.readline()
    if "listening" not in line:
        proc.kill()
        raise RuntimeError(f"cloud process did not start: {line!r}")
    return proc, int(line.rsplit(":", 1)[1])


def start_link(port: int, rtt: float, jitter: float, seed: int) -> tuple[subprocess.Popen, int]:
    LinkConfig(rtt, jitter)
    proc = subprocess.Popen([sys.executable, "-m", "edgecloud.collab.link", "--listen", "0", "--to",
                             f"127.0.0.1:{port}", "--rtt-ms", str(rtt), "--jitter", str(jitter), "--seed", str(seed)],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    return proc, int(line.split()[2].lstrip(":"))


def latency(e, dev, cfg: BenchConfig, rc: RagConfig, questions: list[str], refs: list[list[int]]) -> dict:
    cloud, port = start_cloud(cfg)
    rows, identical = [], []
    sched = Scheduler()  # one device, one scheduler, learning live as the link changes under it
    try:
        asyncio.run(_ask_all(Device(e, dev, ("127.0.0.1", port), rc, Scheduler()), questions[:1], "dragon-cloud"))
        for rtt in cfg.rtts_ms:  # (above: warm-up, untimed: the cloud's first retrieval loads MiniLM's kernels)
            link, lport = start_link(port, rtt, cfg.jitter if rtt else 0.0, cfg.seed)
            try:
                for mode in MODES:
                    d = Device(e, dev, ("127.0.0.1", lport), rc, sched)
                    res = asyncio.run(_ask_all(d, questions, mode))
                    for a, ref in zip(res, refs):
                        identical.append(a.tokens == ref)
                    rows.append({"rtt_ms": rtt, "mode": mode,
                                 "per_token_s": float(np.mean([a.per_token_s for a in res])),
                                 "ttft_s": float(np.mean([a.ttft_s for a in res])),
                                 "acceptance": float(np.mean([a.acceptance for a in res])),
                                 "window": ",".join(str(a.window) for a in res),
                                 "agg": ",".join(a.agg for a in res),
                                 "bytes": int(sum(a.traffic["sent_bytes"] + a.traffic["recv_bytes"] for a in res))})
            finally:
                link.kill()
                link.wait()
    finally:
        cloud.kill()
        cloud.wait()
    return {"rows": rows, "greedy_identical": float(np.mean(identical)) if identical else 0.0}


async def _ask_all(d: Device, questions, mode):
    out = []
    try:
        for q in questions:
            out.append(await d.ask(q, mode))
    finally:
        await d.close()
    return out


def local_latency(e, stores: list, questions: list[str], rc: RagConfig) -> dict:
    """Centralized RAG in this one process over ``stores``' documents (no link): TTFT (retrieval + one batched
    prefill + first token) and time per output token after the first. Device-only = [dev], cloud-only = [cloud]
    (its compute; over a link add the RTT to TTFT), centralized = [dev, cloud] (the union, one batch)."""
    ttft, tpot = [], []
    for q in questions:
        t0 = time.perf_counter()
        parts = [contexts_for(e, st, q, rc.k)[:2] for st in stores]
        side = Side(e, [c for p in parts for c in p[0]], [s for p in parts for s in p[1]], rc.tau)
        side.start([])
        draft(side.dist()[1], True, None)
        t1 = time.perf_counter()
        toks = local_generate(side, rc.max_new, True, rc.seed)
        ttft.append(t1 - t0)
        tpot.append((time.perf_counter() - t1) / max(1, len(toks) - 1))
    return {"ttft_s": float(np.mean(ttft)), "per_token_s": float(np.mean(tpot))}


def run(cfg: BenchConfig) -> Result:
    t0 = time.time()
    load0 = list(os.getloadavg())  # the machine is shared: say how busy it was
    torch.manual_seed(cfg.seed)
    e, sp, dev, cl = load_all(cfg.articles, cfg.seed)
    rc = RagConfig(max_new=cfg.max_new, seed=cfg.seed)
    ppl = quality(e, sp, dev, cl, cfg, rc.k, rc.tau)
    questions = [f"What do you know about {t}?" for t, _, _ in sp.held_out[: cfg.questions]]
    refs = [reference(e, dev, cl, q, rc) for q in questions]
    chi = chi2_test([c for r in refs for c in r["cached"]][:3], cfg.chi2_samples, cfg.seed)
    lat = latency(e, dev, cfg, rc, questions, [r["tokens"] for r in refs])
    local = {name: local_latency(e, st, questions, rc)
             for name, st in (("device_only", [dev]), ("cloud_only", [cl]), ("centralized", [dev, cl]))}
    ttft_dev = local["device_only"]["ttft_s"]
    by = {(r["rtt_ms"], r["mode"]): r for r in lat["rows"]}
    top = max(cfg.rtts_ms)
    best_fixed = {rtt: min(by[(rtt, "dragon-device")]["per_token_s"], by[(rtt, "dragon-cloud")]["per_token_s"])
                  for rtt in cfg.rtts_ms}
    sched_ratio = max(by[(rtt, "dragon")]["per_token_s"] / best_fixed[rtt] for rtt in cfg.rtts_ms)
    best_top = best_fixed[top]
    data = {
        "greedy_identical_to_centralized": lat["greedy_identical"],
        "max_logprob_diff": max(r["max_logprob_diff"] for r in refs),
        "chi2_p_value": chi["p_min_bonferroni"],
        "chi2": chi,
        **{f"ppl_{k}": v for k, v in ppl.items()},
        f"latency_ratio_vs_token_sync_{top}ms": by[(top, "dragon")]["per_token_s"] / by[(top, "token-sync")][
            "per_token_s"],
        f"latency_ratio_vs_sequence_{top}ms": by[(top, "dragon")]["per_token_s"] / by[(top, "sequence")][
            "per_token_s"],
        "best_fixed_vs_token_sync": best_top / by[(top, "token-sync")]["per_token_s"],
        "scheduler_vs_best_fixed": sched_ratio,
        "ttft_device_only_rag_s": ttft_dev,
        "ttft_dragon_vs_device_only": float(np.mean([by[(r, "dragon")]["ttft_s"] for r in cfg.rtts_ms])) / ttft_dev,
        "ttft_dragon_vs_device_only_by_rtt": {r: by[(r, "dragon")]["ttft_s"] / ttft_dev for r in cfg.rtts_ms},
        "local_rag": local,  # in-process baselines (no link)
        "per_token_dragon_vs_centralized_by_rtt": {r: by[(r, "dragon")]["per_token_s"] / local["centralized"][
            "per_token_s"] for r in cfg.rtts_ms},
        "load_average": {"start": load0, "end": list(os.getloadavg())},
        "latency": lat["rows"],
        "config": asdict(cfg), "rag_config": asdict(rc),
        "corpus": {"device_passages": len(dev.passages), "cloud_passages": len(cl.passages),
                   "held_out": len(sp.held_out)},
    }
    name = "dragon-quick" if cfg == BenchConfig.quick() else "dragon"
    res = Result(name, data, seed=cfg.seed, title="DRAGON: distributed RAG with speculative aggregation",
                 started=t0)
    res.table([{"condition": k, "perplexity": v} for k, v in ppl.items()])
    res.table([{"baseline (one process, no link)": k, **v} for k, v in local.items()])
    res.table(lat["rows"], ["rtt_ms", "mode", "per_token_s", "ttft_s", "acceptance", "agg", "window", "bytes"])
    res.figure = _plot(lat["rows"], cfg.rtts_ms, ppl)
    return res


def _plot(rows, rtts, ppl):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for mode in MODES:
        a.plot(rtts, [next(r["per_token_s"] for r in rows if r["rtt_ms"] == t and r["mode"] == mode) * 1000
                      for t in rtts], "o-", label=mode)
    a.set_xlabel("emulated RTT (ms, ±20% jitter)")
    a.set_ylabel("per-token latency at the device (ms)")
    a.legend(fontsize=7)
    b.bar(list(ppl), list(ppl.values()), color=["#999", "#68a", "#a86", "#4a7"])
    b.set_ylabel("perplexity on held-out windows")
    fig.tight_layout()
    return fig
