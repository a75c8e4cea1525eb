"""The VaLoRA benchmark: Poisson arrivals over 16 adapters with skew, every policy in the same engine.

Adapters: the trained ones found under ``adapters_dir`` (peft format), topped up to ``n_adapters`` with random-init
variants of the same rank and targets (same serving cost) so that every run has 16; the report says how many are
trained. The arrival rate is set
from a measured single-batch decode so the engine runs at about ``load`` of its batched capacity.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from edgecloud.lora.orchestrator import POLICIES, Policy, Request, serve, summarize

PROMPTS = ["Add the numbers.\n{a} + {b}\nAnswer:",
           "Give the city field.\n{{\"city\": \"Oslo\", \"age\": {a}}}\nAnswer:",
           "Sort ascending.\n{a} {b} 7 3\nAnswer:", "Rewrite the date as DD/MM/YYYY.\n2020-0{c}-{a}\nAnswer:"]


@dataclass
class BenchConfig:
    n_adapters: int = 16
    requests: int = 20
    skews: tuple = (0.2, 0.5, 0.8, "zipf")
    max_new_tokens: int = 6
    load: float = 0.7
    slo_factor: float = 5.0  # SLO = factor × unloaded single-request latency
    seed: int = 0


def workload(cfg: BenchConfig, names: list[str], skew, rate: float, engine) -> list[Request]:
    r = random.Random(f"{cfg.seed}/{skew}")
    if skew == "zipf":
        w = [1 / (i + 1) for i in range(len(names))]
    else:
        w = [skew] + [(1 - skew) / (len(names) - 1)] * (len(names) - 1)
    t, out = 0.0, []
    for i in range(cfg.requests):
        t += r.expovariate(rate)
        p = r.choice(PROMPTS).format(a=r.randint(10, 28), b=r.randint(10, 99), c=r.randint(1, 9))
        out.append(Request(i, r.choices(names, w)[0], engine.encode(p), t, cfg.max_new_tokens))
    return out


def run(cfg: BenchConfig, engine, lora, names: list[str], table: dict | None, log=print) -> dict:
    from edgecloud.llm.batch import generate_batch

    # capacity: tokens/s of one full unmerged batch of max_batch requests; unloaded latency for the SLO
    probe = [engine.encode(PROMPTS[0].format(a=11, b=22, c=1))] * 8
    lora.seq_adapter = {i: names[i % len(names)] for i in range(8)}
    t = time.perf_counter()
    generate_batch(engine, probe, cfg.max_new_tokens)
    cap_req_s = 8 / (time.perf_counter() - t)
    lora.seq_adapter = {0: names[0]}
    t = time.perf_counter()
    generate_batch(engine, probe[:1], cfg.max_new_tokens)
    single = time.perf_counter() - t
    rate = cfg.load * cap_req_s
    log(f"capacity {cap_req_s:.2f} req/s (batch 8), rate {rate:.2f} req/s, single-request latency {single:.2f}s")
    out = {"rate_req_s": rate, "capacity_req_s": cap_req_s, "single_latency_s": single, "runs": {}}
    for skew in cfg.skews:
        reqs = workload(cfg, names, skew, rate, engine)
        for p in POLICIES:
            res = serve(engine, lora, [Request(r.id, r.adapter, r.prompt, r.arrival, r.max_new_tokens) for r in reqs],
                        Policy(p), table)
            s = summarize(res, cfg.slo_factor * single)
            out["runs"][f"{skew}/{p}"] = s
            log(f"s={skew} {p}: {s['throughput_tok_s']:.1f} tok/s mean {s['mean_latency_s']:.2f}s "
                f"p99 {s['p99_latency_s']:.2f}s switches {s['switches']}")
    return out


def ratios(out: dict, skews) -> dict:
    r = out["runs"]
    thr, lat = {}, {}
    for s in skews:
        thr[str(s)] = r[f"{s}/valora"]["throughput_tok_s"] / r[f"{s}/sequential"]["throughput_tok_s"]
        best = min(r[f"{s}/{p}"]["mean_latency_s"] for p in ("slora", "punica", "dlora"))
        lat[str(s)] = r[f"{s}/valora"]["mean_latency_s"] / best
    return {"throughput_ratio_vs_sequential": thr, "mean_latency_ratio_vs_best_baseline": lat}


def modes_match_reference(engine, lora, names: list[str]) -> bool:
    """Greedy tokens of a mixed batch in every mode == each request alone (unmerged)."""
    from edgecloud.llm.batch import generate_batch
    from edgecloud.lora.atmm import Dispatch

    prompts = [engine.encode(PROMPTS[i % 4].format(a=12 + i, b=40 + i, c=1 + i)) for i in range(4)]
    ads = [names[0], names[1], names[0], names[2]]
    lora.merge(None)
    ref = []
    for p, a in zip(prompts, ads):
        lora.seq_adapter = {0: a}
        ref.append(generate_batch(engine, [p], 6)[0].tokens)
    ok = True
    keep = lora.dispatch
    for merged in (None, names[0], names[3]):
        lora.merge(merged)
        for impl in ("gather/64", "segmented/0", "padded/0"):
            lora.dispatch = Dispatch(fixed=impl)
            lora.seq_adapter = dict(enumerate(ads))
            ok &= [o.tokens for o in generate_batch(engine, prompts, 6)] == ref
    lora.merge(None)
    lora.dispatch = keep
    return bool(ok)


def load_adapters(engine, lora, base: str, adapters_dir: Path | None, n: int, seed: int) -> tuple[list[str], int]:
    from edgecloud.lora.adapters import load_adapter, random_adapter

    names = []
    if adapters_dir is not None and Path(adapters_dir).is_dir():
        for d in sorted(Path(adapters_dir).iterdir()):
            if not d.name.startswith(".") and (d / "adapter_config.json").is_file() and len(names) < n:
                lora.add(load_adapter(d, engine.model, base))
                names.append(d.name)
    trained = len(names)
    rank = lora.adapters[names[0]].rank if names else 8  # top-ups shaped like the trained ones: same serving cost
    for i in range(trained, n):
        lora.add(random_adapter(engine.model, base, f"rand{i}", rank=rank, seed=seed + i))
        names.append(f"rand{i}")
    return names, trained


def geomean(xs) -> float:
    return math.exp(sum(map(math.log, xs)) / len(xs))



# VaLoRA (EuroSys'25) abstract: "reduces the average latency by 20-89%" vs S-LoRA, Punica and dLoRA, i.e. a
# mean-latency ratio of 0.11-0.80 to a baseline; it reports no throughput ratio to per-adapter sequential serving.
PAPER_LATENCY_RATIO = (0.11, 0.80)


@torch.inference_mode()
def switch_cost(lora, name: str, repeats: int = 3) -> dict:
    """Merge + unmerge of one adapter: VaLoRA's switch (W = W0 + Bᵀ Aᵀ for every layer of one shape in one baddbmm,
    unmerge one copy of the pristine stack) vs a per-layer loop that adds and later subtracts each layer's ΔW."""
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter  # CPU time: see atmm.profile
    fast, loop = [], []
    saved = {n: lora.layers[n].base.weight.clone() for n in lora.adapters[name].weights}
    for _ in range(repeats):
        t = clock()
        lora.merge(name)
        lora.merge(None)
        fast.append(clock() - t)
        t = clock()
        for sign in (1.0, -1.0):
            for lname, (A, B) in lora.adapters[name].weights.items():
                w = lora.layers[lname].base.weight
                w.add_((A @ B).T, alpha=sign)
        loop.append(clock() - t)
        for n, w in saved.items():  # add-then-subtract leaves rounding behind; the server's unmerge does not
            lora.layers[n].base.weight.copy_(w)
    return {"batched_merge_unmerge_ms": 1e3 * min(fast), "per_layer_merge_unmerge_ms": 1e3 * min(loop),
            "layers": len(lora.adapters[name].weights)}


def bench_data(quick: bool, adapters: Path | None, table: Path, seed: int = 0, base: str = "smollm2-135m",
               log=None, requests: int | None = None) -> dict:
    """The whole benchmark: reference check, every policy at every skew, the contract ratios."""
    import json
    import sys

    from edgecloud.llm.engine import Engine
    from edgecloud.llm.models import load_model
    from edgecloud.lora.atmm import Dispatch
    from edgecloud.lora.layer import LoRAModel

    log = log or (lambda s: print(s, file=sys.stderr))
    if adapters is None:
        from edgecloud.paths import cache_root

        adapters = cache_root() / "lora" / "adapters"  # the trained ones, when bench/valora_adapters.py has run
    cfg = BenchConfig(seed=seed, **({"requests": 12, "skews": (0.2, 0.8), "max_new_tokens": 4} if quick else {}))
    if requests:
        cfg.requests = requests
    tab = None
    if Path(table).exists():
        Dispatch.load(table)  # a corrupt table is one clear line
        tab = json.loads(Path(table).read_text())
    e = Engine(load_model(base))
    lm = LoRAModel(e.model, base, dispatch=Dispatch(tab))
    names, trained = load_adapters(e, lm, base, adapters, cfg.n_adapters, seed)
    with torch.inference_mode():
        match = modes_match_reference(e, lm, names)
        switch = switch_cost(lm, names[0])
        out = run(cfg, e, lm, names, tab, log=log)
    return {**ratios(out, cfg.skews), "modes_match_reference": match,
            "chooser_vs_oracle": (tab or {}).get("evaluation", {}).get("chooser_vs_oracle_geomean"),
            "adapters": {"total": len(names), "trained": trained, "random_init": len(names) - trained},
            "requests": cfg.requests, "skews": [str(s) for s in cfg.skews], "runs": out["runs"],
            "rate_req_s": out["rate_req_s"], "capacity_req_s": out["capacity_req_s"],
            "single_latency_s": out["single_latency_s"], "slo_s": cfg.slo_factor * out["single_latency_s"],
            "max_new_tokens": cfg.max_new_tokens, "adapter_names": names, "switch_cost": switch,
            "paper_latency_ratio_vs_baselines": list(PAPER_LATENCY_RATIO),
            "latency_ratio_vs_each_baseline": {f"{s}/{p}": out["runs"][f"{s}/valora"]["mean_latency_s"]
                                               / out["runs"][f"{s}/{p}"]["mean_latency_s"]
                                               for s in cfg.skews for p in POLICIES if p != "valora"}}
