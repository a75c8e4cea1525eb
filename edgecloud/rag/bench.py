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
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from edgecloud.collab.link import LinkConfig
from edgecloud.errors import UserError
from edgecloud.rag.corpus import make_split
from edgecloud.rag.mix import Side, combine, draft, scored_mixture, target_logprobs, verify
from edgecloud.rag.node import Device, RagConfig, Scheduler, contexts_for, prefixes
from edgecloud.rag.prefix import PassageKV
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
    questions: int = 3  # per (RTT, mode) cell, and the exactness replays
    max_new: int = 12  # 3 x 12 tokens per cell: the latency part fits a ~6 min timed run on a quiet machine
    rtts_ms: tuple[int, ...] = (0, 50, 100, 200, 300)
    jitter: float = 0.2
    chi2_samples: int = 5000
    float64_check: bool = True  # replay the exactness comparison with the model in float64 (isolates rounding)
    pin_cores: bool = True  # device process on one core, cloud process on another (when the machine has two)
    cloud_kv_mb: int = 1024  # the cloud's passage KV cache (MiB; 0 = off); the device never caches (docs/dragon.md)
    seed: int = 0

    @classmethod
    def quick(cls) -> BenchConfig:
        return cls(articles=16, windows=4, questions=1, max_new=8, rtts_ms=(0, 300), chi2_samples=5000)


PARTS = ("quality", "latency", "all")


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


def reference(e, dev, cl, question: str, rc: RagConfig, replay: bool = True) -> dict:
    """Centralized REPLUG over the union (greedy, one batch of all 2k documents); with ``replay``, the exactness
    gaps along it (:func:`replay_gap`) and the cached distributions at the first three positions for the χ² test."""
    cd, sd, _ = contexts_for(e, dev, question, rc.k)
    cc, sc, _ = contexts_for(e, cl, question, rc.k)
    u = Side(e, cd + cc, sd + sc, rc.tau)
    u.start([])
    toks = local_generate(u, rc.max_new, True, rc.seed)
    if not replay:
        return {"tokens": toks}
    return {"tokens": toks, "contexts": (cd, sd, cc, sc), **replay_gap(e, (cd, sd, cc, sc), toks, rc, u)}


def replay_gap(e, ctx, toks: list[int], rc: RagConfig, union: Side | None = None,
               dtype: torch.dtype = torch.float32) -> dict:
    """Replay ``toks`` on the union (one batch of 2k documents) and on each side (one batch of its k) and measure,
    at every position, the max |log p| gap over the vocabulary between

    - ``end_to_end``: the cross-side mixture and centralized REPLUG over the union, each from its own batched model
      calls, as ``dtype`` (float32: the values the protocol ships and verifies). The per-document rows differ
      here by the batch they were computed in (padding, matmul shapes change the float rounding), not by the
      method;
    - ``same_rows``: the cross-side mixture and centralized REPLUG formed from the identical per-document rows the
      two sides computed, in float64: the aggregation alone (exact up to float64 logsumexp)."""
    cd, sd, cc, sc = ctx
    u = union or Side(e, cd + cc, sd + sc, rc.tau)
    if union is None:
        u.start([])
    u.rollback(0)
    ds, cs = Side(e, cd, sd, rc.tau), Side(e, cc, sc, rc.tau)
    for s in (ds, cs):
        s.start([])
    e2e, rows, cached = 0.0, 0.0, []
    for i, t in enumerate(toks):
        p = u.dist(dtype)[1]
        e2e = max(e2e, float((combine([ds.dist(dtype), cs.dist(dtype)], dtype) - p).abs().max()))
        lw, lp = torch.cat([ds.logw, cs.logw]), torch.cat([ds.logp, cs.logp])
        central = torch.logsumexp(lw[:, None] + lp, 0) - torch.logsumexp(lw, 0)
        agg = combine([ds.dist(torch.float64), cs.dist(torch.float64)], torch.float64)
        rows = max(rows, float((agg - central).abs().max()))
        if i < 3:
            cached.append((p.float().clone(), cs.dist()[1].clone()))
        if i < len(toks) - 1:
            for s in (u, ds, cs):
                s.advance(t)
    return {"max_logprob_diff": e2e, "same_rows_diff": rows, "cached": cached}


def float64_engine(e):
    """The same checkpoint with every weight in float64: what is left of the end-to-end gap is rounding."""
    import copy
    from dataclasses import replace

    from edgecloud.llm.engine import Engine

    return Engine(replace(e.lm, model=copy.deepcopy(e.model).double()), threads=1)


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


def _cores(cfg: BenchConfig) -> tuple[set[int], set[int]] | None:
    """(device core, cloud core) when pinning and two cores are available, else None."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    return ({cores[0]}, {cores[1]}) if cfg.pin_cores and len(cores) >= 2 else None


def start_cloud(cfg: BenchConfig, core: set[int] | None = None) -> tuple[subprocess.Popen, int]:
    env = dict(os.environ, EDGECLOUD_THREADS="1")
    pin = (lambda: os.sched_setaffinity(0, core)) if core else None
    proc = subprocess.Popen([sys.executable, "-m", "edgecloud", "rag", "cloud", "--port", "0", "--articles",
                             str(cfg.articles), "--seed", str(cfg.seed), "--kv-cache-mb", str(cfg.cloud_kv_mb)],
                            stdout=subprocess.PIPE, env=env, text=True, preexec_fn=pin)
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


def _mean_of(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def ttft_floor(a) -> float | None:
    """The earliest the first token can be known on the device given when each side had its documents prefilled
    (``cloud_ready_s`` is on the cloud's clock: question transit included) and the measured RTT: the device needs
    the cloud's first-position distribution, ``max(dev, cloud + rtt/2)``, whichever side aggregates (aggregating on
    the device it comes as the cloud's first draft; in the cloud, in its ``ready``, and the device decides the first
    token itself). TTFT minus this is protocol overhead; this minus device-only RAG's TTFT is the other side's
    retrieval + prefill and the link (``cloud + rtt/2`` = the cloud's work + one RTT) and the contention of two
    processes on one machine."""
    dev, cloud = a.timeline.get("device_prefilled_s"), a.timeline.get("cloud_ready_s")
    if dev is None or cloud is None:
        return None
    return max(dev, cloud + a.rtt_s / 2)


def cloud_load(articles: int, seed: int, questions: int, max_new: int, kv_mb: int = 0) -> None:
    """An equal cloud-side load for the contended device-only baseline: the cloud's work for the bench's questions
    (its retrieval + prefill, from its passage KV cache when the cloud has one, + decode) in a loop, forever. Run as
    a process pinned to the cloud's core; the bench stops and continues it (SIGSTOP/SIGCONT) around each contended
    measurement."""
    e, sp, _, cl = load_all(articles, seed)
    rc = RagConfig(max_new=max_new, seed=seed)
    qs = [f"What do you know about {t}?" for t, _, _ in sp.held_out[:questions]]
    kv = PassageKV(e, kv_mb << 20) if kv_mb else None
    print("loaded", flush=True)
    while True:
        local_latency(e, [cl], qs, rc, kv=kv)


def start_load(cfg: BenchConfig, core: set[int] | None) -> subprocess.Popen:
    """Start :func:`cloud_load` (it loads while the cloud process starts); :func:`load_ready` waits for it."""
    env = dict(os.environ, EDGECLOUD_THREADS="1")
    pin = (lambda: os.sched_setaffinity(0, core)) if core else None
    return subprocess.Popen([sys.executable, "-c", "import sys; from edgecloud.rag.bench import cloud_load; "
                             "cloud_load(*map(int, sys.argv[1:]))", str(cfg.articles), str(cfg.seed),
                             str(cfg.questions), str(cfg.max_new), str(cfg.cloud_kv_mb)], stdout=subprocess.PIPE,
                            env=env, text=True, preexec_fn=pin)


def load_ready(proc: subprocess.Popen) -> subprocess.Popen:
    """Wait until the load process has loaded, then stop it until a contended measurement continues it."""
    line = proc.stdout.readline()
    if "loaded" not in line:
        proc.kill()
        raise RuntimeError(f"cloud load process did not start: {line!r}")
    proc.send_signal(signal.SIGSTOP)
    return proc


def contended(load: subprocess.Popen, e, dev, questions, rc: RagConfig) -> dict:
    """Device-only RAG (TTFT only) while the load runs on the other core."""
    load.send_signal(signal.SIGCONT)
    try:
        time.sleep(0.5)  # in its loop, past any page-in
        return local_latency(e, [dev], questions, rc, decode=False)
    finally:
        load.send_signal(signal.SIGSTOP)


def latency(e, dev, cfg: BenchConfig, rc: RagConfig, questions: list[str], refs: list[list[int]],
            cloud_core: set[int] | None = None) -> dict:
    load = start_load(cfg, cloud_core)
    try:
        cloud, port = start_cloud(cfg, cloud_core)
    except BaseException:
        load.kill()
        raise
    try:
        load_ready(load)
    except BaseException:
        cloud.kill()
        raise
    rows, answers, identical, device_only, device_only_contended = [], [], [], {}, {}
    sched = Scheduler()  # one device, one scheduler, learning live as the link changes under it
    try:
        # warm-up, untimed: the cloud's first retrieval loads MiniLM's kernels, and its passage KV cache gets the
        # bench's passages (the steady state of a cloud that precomputed its public corpus; `cloud_cached` says)
        asyncio.run(_ask_all(Device(e, dev, ("127.0.0.1", port), rc, Scheduler()), questions, "dragon-cloud"))
        for rtt in cfg.rtts_ms:
            # device-only RAG in the same cell, just before the modes: TTFT is compared with what the device does
            # alone at the same moment (on a shared machine, minutes apart can differ by 20%)
            device_only[rtt] = local_latency(e, [dev], questions, rc)
            device_only_contended[rtt] = contended(load, e, dev, questions, rc)  # the other core busy alike
            link, lport = start_link(port, rtt, cfg.jitter if rtt else 0.0, cfg.seed)
            try:
                for mode in MODES:
                    d = Device(e, dev, ("127.0.0.1", lport), rc, sched)
                    res = asyncio.run(_ask_all(d, questions, mode))
                    for i, (a, ref) in enumerate(zip(res, refs)):
                        identical.append(a.tokens == ref)
                        answers.append({"rtt_ms": rtt, "mode": mode, "question": i, "agg": a.agg, "rtt_s": a.rtt_s,
                                        "dev_prefill_s": a.timeline.get("device_prefilled_s"),
                                        "cloud_ready_s": a.timeline.get("cloud_ready_s"),
                                        "ttft_floor_s": ttft_floor(a), "ttft_s": a.ttft_s,
                                        "cloud_cached_docs": a.timeline.get("cloud_cached_docs")})
                    tl = [a.timeline for a in res]
                    rows.append({"rtt_ms": rtt, "mode": mode,
                                 "per_token_s": float(np.mean([a.per_token_s for a in res])),
                                 "ttft_s": float(np.mean([a.ttft_s for a in res])),
                                 "dev_prefill_s": _mean_of(t.get("device_prefilled_s") for t in tl),
                                 "cloud_ready_s": _mean_of(t.get("cloud_ready_s") for t in tl),
                                 "ttft_floor_s": _mean_of(ttft_floor(a) for a in res),
                                 "cloud_bound": sum(_cloud_bound(a) for a in res),
                                 "cloud_cached": sum(a.timeline.get("cloud_cached_docs") or 0 for a in res),
                                 "step_dev_s": float(np.mean([a.step_s["device"] for a in res])),
                                 "step_cloud_s": float(np.mean([a.step_s["cloud"] for a in res])),
                                 "acceptance": float(np.mean([a.acceptance for a in res])),
                                 "window": ",".join(str(a.window) for a in res),
                                 "agg": ",".join(a.agg for a in res),
                                 "tokens": int(sum(len(a.tokens) for a in res)),
                                 "bytes": int(sum(a.traffic["sent_bytes"] + a.traffic["recv_bytes"] for a in res))})
            finally:
                link.kill()
                link.wait()
    finally:
        for proc in (load, cloud):
            proc.kill()
            proc.wait()
    return {"rows": rows, "answers": answers, "greedy_identical": float(np.mean(identical)) if identical else 0.0,
            "greedy_answers": len(identical), "device_only_by_rtt": device_only,
            "device_only_contended_by_rtt": device_only_contended}


def _cloud_bound(a) -> bool:
    """The first token waited for the cloud (its retrieval + prefill + one RTT ends after the device's prefill)."""
    dev, cloud = a.timeline.get("device_prefilled_s"), a.timeline.get("cloud_ready_s")
    return dev is not None and cloud is not None and cloud + a.rtt_s / 2 > dev


async def _ask_all(d: Device, questions, mode):
    """One device session (connected before the first question, as a running device would be) asking in turn."""
    out = []
    try:
        await d.connect()
        for q in questions:
            out.append(await d.ask(q, mode))
    finally:
        await d.close()
    return out


def local_latency(e, stores: list, questions: list[str], rc: RagConfig, decode: bool = True,
                  kv: PassageKV | None = None) -> dict:
    """Centralized RAG in this one process over ``stores``' documents (no link): TTFT (retrieval + one batched
    prefill + first token) and time per output token after the first. Device-only = [dev], cloud-only = [cloud]
    (its compute; over a link add the RTT to TTFT), centralized = [dev, cloud] (the union, one batch). ``kv``:
    passages' KV from this cache (warm it first: a miss computes and stores the passage, at full cost)."""
    ttft, tpot = [], []
    for q in questions:
        t0 = time.perf_counter()
        parts = [contexts_for(e, st, q, rc.k) for st in stores]
        ctx = [c for p in parts for c in p[0]]
        side = Side(e, ctx, [s for p in parts for s in p[1]], rc.tau, kv=kv,
                    prefix=prefixes(e, ctx, [d for p in parts for d in p[2]], kv))
        side.start([])
        draft(side.dist()[1], True, None)
        t1 = time.perf_counter()
        ttft.append(t1 - t0)
        if decode:
            toks = local_generate(side, rc.max_new, True, rc.seed)
            tpot.append((time.perf_counter() - t1) / max(1, len(toks) - 1))
    return {"ttft_s": float(np.mean(ttft)), "ttft_by_question_s": ttft} | (
        {"per_token_s": float(np.mean(tpot))} if decode else {})


def exactness(e, dev, cl, cfg: BenchConfig, rc: RagConfig, questions: list[str]) -> tuple[dict, list[dict]]:
    """Greedy references, the three mixture gaps, and the χ² test (see the module docstring)."""
    refs = [reference(e, dev, cl, q, rc) for q in questions]
    chi = chi2_test([c for r in refs for c in r["cached"]][:3], cfg.chi2_samples, cfg.seed)
    out = {"max_logprob_diff": max(r["max_logprob_diff"] for r in refs),
           "max_logprob_diff_same_rows": max(r["same_rows_diff"] for r in refs)}
    if cfg.float64_check:
        e64 = float64_engine(e)
        gaps = [replay_gap(e64, r["contexts"], r["tokens"], rc, dtype=torch.float64) for r in refs]
        out["max_logprob_diff_float64"] = max(g["max_logprob_diff"] for g in gaps)
    out |= {"chi2_p_value": chi["p_min_bonferroni"], "chi2": chi}
    return out, refs


def run(cfg: BenchConfig, part: str = "all") -> Result:
    """``part``: quality (perplexities, exactness, χ²: run it under ``low``), latency (two processes over the
    emulated link: run it under ``timed``), or all (one run, what ``edgecloud rag bench`` does)."""
    if part not in PARTS:
        raise UserError(f"part={part!r}: use one of {', '.join(PARTS)}")
    t0 = time.time()
    load0 = list(os.getloadavg())  # the machine is shared: say how busy it was
    torch.manual_seed(cfg.seed)
    cores = _cores(cfg) if part != "quality" else None
    old_aff = os.sched_getaffinity(0) if cores else None
    if cores:
        os.sched_setaffinity(0, cores[0])  # this process is the device (and the one-process baselines)
    try:
        e, sp, dev, cl = load_all(cfg.articles, cfg.seed)
        rc = RagConfig(max_new=cfg.max_new, seed=cfg.seed)
        questions = [f"What do you know about {t}?" for t, _, _ in sp.held_out[: cfg.questions]]
        data, tables, ppl, refs = {}, [], None, None
        if part in ("quality", "all"):
            ppl = quality(e, sp, dev, cl, cfg, rc.k, rc.tau)
            ex, refs = exactness(e, dev, cl, cfg, rc, questions)
            data |= ex | {f"ppl_{k}": v for k, v in ppl.items()}
            tables.append(([{"condition": k, "perplexity": v} for k, v in ppl.items()], None))
        if part in ("latency", "all"):
            toks = [r["tokens"] for r in refs] if refs else \
                [reference(e, dev, cl, q, rc, replay=False)["tokens"] for q in questions]
            lat = latency(e, dev, cfg, rc, questions, toks, cores[1] if cores else None)
            local = {name: local_latency(e, st, questions, rc)
                     for name, st in (("device_only", [dev]), ("cloud_only", [cl]), ("centralized", [dev, cl]))}
            for name, st in (("device_only", [dev]), ("cloud_only", [cl])):  # with each side's own passages'
                kv = PassageKV(e, max(cfg.cloud_kv_mb, 256) << 20)  # KV cached (second pass: all hits), for honesty
                local_latency(e, st, questions, rc, decode=False, kv=kv)
                local[f"{name}_passages_cached"] = local_latency(e, st, questions, rc, kv=kv)
            data = {"greedy_identical_to_centralized": lat["greedy_identical"],
                    "greedy_answers_compared": lat["greedy_answers"], **data,
                    **latency_summary(lat["rows"], local, lat["device_only_by_rtt"], cfg.rtts_ms,
                                      lat["device_only_contended_by_rtt"]),
                    "latency": lat["rows"], "latency_answers": lat["answers"]}
            tables.append(([{"baseline (one process, no link)": k, "ttft_s": v["ttft_s"],
                             "per_token_s": v["per_token_s"]} for k, v in local.items()], None))
            tables.append((data["ttft_breakdown"], None))
            tables.append((lat["rows"], ["rtt_ms", "mode", "per_token_s", "ttft_s", "ttft_floor_s", "dev_prefill_s",
                                         "cloud_ready_s", "cloud_bound", "cloud_cached",
                                         "step_dev_s", "step_cloud_s", "acceptance", "agg", "window", "bytes"]))
    finally:
        if old_aff:
            os.sched_setaffinity(0, old_aff)
    data |= {"part": part, "pinned_cores": [sorted(c) for c in cores] if cores else None,
             "load_average": {"start": load0, "end": list(os.getloadavg())},
             "config": asdict(cfg), "rag_config": asdict(rc),
             "corpus": {"device_passages": len(dev.passages), "cloud_passages": len(cl.passages),
                        "held_out": len(sp.held_out)}}
    quick = cfg == replace(BenchConfig.quick(), seed=cfg.seed)
    name = "dragon" + ("" if part == "all" else f"-{part}") + ("-quick" if quick else "")
    res = Result(name, data, seed=cfg.seed, title="DRAGON: distributed RAG with speculative aggregation"
                 + ("" if part == "all" else f" ({part})"), started=t0)
    for rows, cols in tables:
        res.table(rows, cols)
    res.figure = _plot(data.get("latency"), cfg.rtts_ms, ppl, data.get("ttft_device_only_by_rtt_s"),
                       data.get("ttft_device_only_contended_by_rtt_s"))
    return res


def latency_summary(rows: list[dict], local: dict, device_only: dict, rtts, contended: dict) -> dict:
    """The latency goals' ratios from the per-(RTT, mode) rows and the one-process baselines; TTFT against
    device-only RAG measured in the same RTT cell (``device_only``: the other core idle, the asked-for baseline;
    ``contended``: the other core running the cloud's work, as it does during a DRAGON answer), paired in time."""
    by = {(r["rtt_ms"], r["mode"]): r for r in rows}
    breakdown = []
    for r in rtts:
        d = by[(r, "dragon")]
        breakdown.append({"rtt_ms": r, "device_only_idle_s": device_only[r]["ttft_s"],
                          "device_only_contended_s": contended[r]["ttft_s"], "dragon_dev_prefill_s": d["dev_prefill_s"],
                          "dragon_cloud_ready_s": d["cloud_ready_s"], "dragon_floor_s": d["ttft_floor_s"],
                          "dragon_ttft_s": d["ttft_s"], "cloud_bound": d["cloud_bound"],
                          "vs_idle": d["ttft_s"] / device_only[r]["ttft_s"],
                          "vs_contended": d["ttft_s"] / contended[r]["ttft_s"]})
    ttft_con = float(np.mean([contended[r]["ttft_s"] for r in rtts]))
    top = max(rtts)
    ttft_dev = float(np.mean([device_only[r]["ttft_s"] for r in rtts]))
    best_fixed = {rtt: min(by[(rtt, "dragon-device")]["per_token_s"], by[(rtt, "dragon-cloud")]["per_token_s"])
                  for rtt in rtts}
    sched = {rtt: by[(rtt, "dragon")]["per_token_s"] / best_fixed[rtt] for rtt in rtts}
    return {
        f"latency_ratio_vs_token_sync_{top}ms": by[(top, "dragon")]["per_token_s"] / by[(top, "token-sync")][
            "per_token_s"],
        f"latency_ratio_vs_sequence_{top}ms": by[(top, "dragon")]["per_token_s"] / by[(top, "sequence")][
            "per_token_s"],
        "best_fixed_vs_token_sync": best_fixed[top] / by[(top, "token-sync")]["per_token_s"],
        "scheduler_vs_best_fixed": max(sched.values()),
        "scheduler_vs_best_fixed_by_rtt": sched,
        "ttft_device_only_rag_s": ttft_dev,
        "ttft_dragon_vs_device_only": float(np.mean([by[(r, "dragon")]["ttft_s"] for r in rtts])) / ttft_dev,
        "ttft_dragon_vs_device_only_by_rtt": {r: by[(r, "dragon")]["ttft_s"] / device_only[r]["ttft_s"]
                                              for r in rtts},
        "ttft_device_only_by_rtt_s": {r: device_only[r]["ttft_s"] for r in rtts},
        "ttft_device_only_contended_rag_s": ttft_con,
        "ttft_dragon_vs_device_only_contended": float(np.mean([by[(r, "dragon")]["ttft_s"] for r in rtts]))
        / ttft_con,
        "ttft_dragon_vs_device_only_contended_by_rtt": {r: by[(r, "dragon")]["ttft_s"] / contended[r]["ttft_s"]
                                                        for r in rtts},
        "ttft_device_only_contended_by_rtt_s": {r: contended[r]["ttft_s"] for r in rtts},
        "contention_device_only_contended_vs_idle": ttft_con / ttft_dev,  # what the other core's work costs
        "ttft_breakdown": breakdown,
        "ttft_dragon_device_vs_device_only_by_rtt": {r: by[(r, "dragon-device")]["ttft_s"] / device_only[r]["ttft_s"]
                                                     for r in rtts},
        # paired within each answer: the device's own retrieval + prefill is device-only RAG's TTFT less one argmax
        "ttft_dragon_vs_own_prefill_by_rtt": {r: by[(r, "dragon")]["ttft_s"] / by[(r, "dragon")]["dev_prefill_s"]
                                              for r in rtts},
        "ttft_dragon_over_floor_s_by_rtt": {r: by[(r, "dragon")]["ttft_s"] - (by[(r, "dragon")]["ttft_floor_s"] or 0)
                                            for r in rtts},
        "local_rag": local,  # in-process baselines (no link)
        "per_token_dragon_vs_centralized_by_rtt": {r: by[(r, "dragon")]["per_token_s"] / local["centralized"][
            "per_token_s"] for r in rtts},
    }


def _plot(rows, rtts, ppl, ttft_dev: dict | None = None, ttft_con: dict | None = None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = 2 * bool(rows) + bool(ppl)
    fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 4), squeeze=False)
    axes = list(axes[0])
    if rows:
        a, t = axes.pop(0), axes.pop(0)
        for mode in MODES:
            cell = [next(r for r in rows if r["rtt_ms"] == x and r["mode"] == mode) for x in rtts]
            a.plot(rtts, [c["per_token_s"] * 1000 for c in cell], "o-", label=mode)
            t.plot(rtts, [c["ttft_s"] for c in cell], "o-", label=mode)
        if ttft_dev:
            t.plot(rtts, [ttft_dev[r] for r in rtts], "k--", lw=1, label="device-only RAG (same cell, no link)")
        if ttft_con:
            t.plot(rtts, [ttft_con[r] for r in rtts], "k:", lw=1, label="device-only RAG, other core loaded")
        for ax, what in ((a, "per-token latency at the device (ms)"), (t, "TTFT at the device (s)")):
            ax.set_xlabel("emulated RTT (ms, ±20% jitter)")
            ax.set_ylabel(what)
            ax.legend(fontsize=7)
    if ppl:
        b = axes.pop(0)
        b.bar(list(ppl), list(ppl.values()), color=["#999", "#68a", "#a86", "#4a7"])
        b.set_ylabel("perplexity on held-out windows")
    fig.tight_layout()
    return fig
