"""First-token fidelity at a sample size that can resolve it, and whether its misses are float-level near-ties.

The main benchmark (:mod:`edgecloud.kvcache.bench`) decodes every method's whole answer, so it affords ~30 requests;
at n = 30 a first-token agreement of 0.95 is 1.5 disagreements and its interval spans ~0.8-1.0. First-token agreement
needs no decoding: one full prefill and one linker pass per method per request. This study runs that on a few hundred
requests of the same workload (more SQuAD articles and questions, more passkeys), reports agreement with a Wilson
interval, and for every disagreement the reference's top-2 logit gap; the disagreements (and the closest near-ties,
up to a budget) are re-run through full prefill in bf16, to see whether plain float noise flips them too.

Requests run SQuAD and passkey interleaved (seeded), so a run cut by ``max_s`` is still a fair sample of both.
"""

from __future__ import annotations

import json
import math
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from edgecloud.atomic import write_text
from edgecloud.errors import UserError
from edgecloud.kvcache.bench import BenchConfig, _bf16_engine, make_workload
from edgecloud.kvcache.mpic import MPIC
from edgecloud.kvcache.selection import CacheBlend, MPICk
from edgecloud.kvcache.store import KVStore
from edgecloud.llm.engine import Engine


@dataclass
class FidelityConfig:
    groups: int = 40  # SQuAD articles (each a shared passage pool)
    per_group: int = 5  # questions per article
    passkey: int = 40
    ks: tuple[int, ...] = (32, 64)  # MPIC-k variants; ``k`` is the headline
    k: int = 32
    blend_r: float = 0.0  # CacheBlend-r beside them (0: leave it out; it costs ~0.25 of a full prefill a request)
    tie_gap: float = 0.5  # a reference first token whose top-2 logit gap is below this is a near-tie
    bf16_max: int = 6  # bf16 full-prefill re-runs (each ~7x an fp32 one on an AVX2 CPU): disagreements first
    max_s: float = 0.0  # stop starting new requests after this many seconds (0: run all); the report says n run
    seed: int = 0

    def __post_init__(self):
        if self.k not in self.ks:
            raise UserError(f"k={self.k} must be one of ks={self.ks}")
        if self.groups < 0 or self.per_group < 1 or self.passkey < 0 or self.bf16_max < 0 or self.max_s < 0:
            raise UserError("groups, passkey, bf16_max, max_s >= 0 and per_group >= 1 please")

    def bench_config(self) -> BenchConfig:
        return BenchConfig(groups=self.groups, per_group=self.per_group, passkey=self.passkey, seed=self.seed)


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (sound near 0 and 1, where a bootstrap of 0/1s collapses)."""
    if n == 0:
        return float("nan"), float("nan")
    p = successes / n
    c = z * z / n
    mid = (p + c / 2) / (1 + c)
    half = z * math.sqrt(p * (1 - p) / n + c / (4 * n)) / (1 + c)
    return max(0.0, mid - half), min(1.0, mid + half)


def top2_gap(logits: torch.Tensor) -> float:
    v = logits.float().topk(2).values
    return float(v[0] - v[1])


def load_rows(path: str, reqs: list, methods: list[str]) -> tuple[list[dict], float]:
    """An earlier run's ``dump`` (rows and time), checked to be the same workload's first requests and methods."""
    try:
        got = json.loads(Path(path).read_text())
        rows, run_s = got["rows"], float(got["run_s"])
        same = all(r["ids"] == [t for s in q.segments for t in s.ids] and list(r["methods"]) == methods
                   for r, q in zip(rows, reqs))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"--resume {path}: not a fidelity dump ({type(e).__name__}: {e}); give a file that "
                        f"--dump wrote") from None
    if not same or len(rows) > len(reqs):
        raise UserError(f"--resume {path}: its rows are not this workload's first requests with methods {methods} "
                        f"(another seed, ks or data?); resume with the same --seed and ks")
    return rows, run_s


def fidelity(engine: Engine, cfg: FidelityConfig, progress=None, dump: str | None = None,
             resume: str | None = None) -> dict:
    """Run the study; ``dump``: also write the raw per-request rows there (JSON) before summarising; ``resume``:
    an earlier run's dump, whose requests are kept and skipped, so the study grows across runs (pooled)."""
    torch.manual_seed(cfg.seed)
    reqs = make_workload(engine, cfg.bench_config())
    random.Random(cfg.seed).shuffle(reqs)  # interleave sources so any prefix of the run is a fair sample
    methods = {f"mpic-{k}": MPICk(k) for k in cfg.ks}
    if cfg.blend_r > 0:
        methods[f"cacheblend-{round(cfg.blend_r * 100)}"] = CacheBlend(cfg.blend_r)
    rows, before_s = load_rows(resume, reqs, list(methods)) if resume else ([], 0.0)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mpic-fid-") as d:
        system = MPIC(engine, KVStore(d, engine.lm.fingerprint, mem_bytes=256 << 20))
        for i, r in enumerate(reqs):
            if i < len(rows):
                continue
            if cfg.max_s and time.perf_counter() - t0 > cfg.max_s:
                break
            for s in r.segments:
                if s.kind == "chunk":
                    system.ingest(s)
            ids = [t for s in r.segments for t in s.ids]
            ref, _ = engine.prefill(ids)
            p = torch.log_softmax(ref, -1)
            row = {"source": r.item.source, "tokens": len(ids), "ref_token": int(ref.argmax()),
                   "ref_gap": top2_gap(ref), "ids": ids, "methods": {}}
            for name, sel in methods.items():
                got = system.prefill(r.segments, sel).logits.float()
                q = torch.log_softmax(got, -1)
                tok = int(got.argmax())
                row["methods"][name] = {"agree": tok == row["ref_token"], "token": tok,
                                        "kl": float((p.exp() * (p - q)).sum()),
                                        # how far the method's logits put the reference's token below its own choice
                                        "margin": float(got[tok] - got[row["ref_token"]])}
            rows.append(row)
            if progress:
                progress(i + 1, len(reqs))
        system.close()
    run_s = before_s + time.perf_counter() - t0
    for stage in ("fp32", "bf16"):  # the rows are kept before the (slow) bf16 re-runs too
        if stage == "bf16":
            _bf16_recheck(engine, cfg, rows)
        if dump:
            write_text(dump, json.dumps({"rows": rows, "planned": len(reqs), "run_s": run_s, "stage": stage}))
    return summarize(rows, cfg, engine, len(reqs), run_s)


def _bf16_recheck(engine: Engine, cfg: FidelityConfig, rows: list[dict]) -> None:
    """bf16 full prefill on the headline's disagreements first, then the closest near-ties: does float noise alone
    flip the reference's first token there?"""
    if cfg.bf16_max == 0 or not rows:
        return
    head = f"mpic-{cfg.k}"
    miss = [r for r in rows if not r["methods"][head]["agree"]]
    ties = sorted((r for r in rows if r["methods"][head]["agree"] and r["ref_gap"] < cfg.tie_gap),
                  key=lambda r: r["ref_gap"])
    done = sum("bf16_agree" in r for r in rows)  # checked in an earlier (resumed) run: kept, within the budget
    todo = [r for r in miss + ties if "bf16_agree" not in r][: max(0, cfg.bf16_max - done)]
    if not todo:
        return
    bf16 = _bf16_engine(engine)
    for r in todo:
        got, _ = bf16.prefill(r["ids"])
        r["bf16_agree"] = int(got.argmax()) == r["ref_token"]


def summarize(rows: list[dict], cfg: FidelityConfig, engine: Engine, planned: int, run_s: float) -> dict:
    n = len(rows)
    head = f"mpic-{cfg.k}"
    table = {}
    for name in rows[0]["methods"] if rows else []:
        agree = [r["methods"][name]["agree"] for r in rows]
        a = sum(agree)
        by_src = {}
        for src in sorted({r["source"] for r in rows}):
            xs = [r["methods"][name]["agree"] for r in rows if r["source"] == src]
            by_src[src] = {"n": len(xs), "agreement": sum(xs) / len(xs)}
        miss_gaps = sorted(r["ref_gap"] for r in rows if not r["methods"][name]["agree"])
        table[name] = {"agreement": a / n, "agreement_ci": wilson(a, n), "disagreements": n - a,
                       "kl_first": sum(r["methods"][name]["kl"] for r in rows) / n, "by_source": by_src,
                       "miss_ref_gaps": miss_gaps,
                       "misses_near_tie": sum(g < cfg.tie_gap for g in miss_gaps)}
    near = [r for r in rows if r["ref_gap"] < cfg.tie_gap]
    clear = [r for r in rows if r["ref_gap"] >= cfg.tie_gap]

    def agreement(rs):
        return sum(r["methods"][head]["agree"] for r in rs) / len(rs) if rs else float("nan")

    checked = [r for r in rows if "bf16_agree" in r]
    checked_miss = [r for r in checked if not r["methods"][head]["agree"]]
    checked_tie = [r for r in checked if r["methods"][head]["agree"]]
    gaps = sorted(r["ref_gap"] for r in rows)
    return {
        "model": engine.lm.name, "threads": engine.threads, "seed": cfg.seed, "k": cfg.k,
        "requests": n, "requests_planned": planned, "run_s": run_s,
        "sources": {s: sum(1 for r in rows if r["source"] == s) for s in sorted({r["source"] for r in rows})},
        "prompt_tokens_mean": sum(r["tokens"] for r in rows) / n if n else float("nan"),
        "first_token_agreement": table[head]["agreement"] if n else float("nan"),
        "first_token_agreement_ci": table[head]["agreement_ci"] if n else (float("nan"),) * 2,
        "tie_gap": cfg.tie_gap,
        "ref_gap_quantiles": {q: gaps[min(n - 1, int(q * n))] for q in (0.05, 0.1, 0.25, 0.5)} if n else {},
        "near_tie_requests": len(near),
        "agreement_near_tie": agreement(near), "agreement_clear": agreement(clear),
        "bf16": {"checked": len(checked),
                 "flips_on_mpic_misses": sum(not r["bf16_agree"] for r in checked_miss), "mpic_misses_checked":
                 len(checked_miss),
                 "flips_on_near_ties": sum(not r["bf16_agree"] for r in checked_tie), "near_ties_checked":
                 len(checked_tie)},
        "config": {**cfg.__dict__, "ks": list(cfg.ks)}, "methods": table,
        "misses": [{"source": r["source"], "ref_gap": r["ref_gap"], "margin": r["methods"][head]["margin"],
                    "ref": engine.decode_text([r["ref_token"]]), "mpic": engine.decode_text(
                        [r["methods"][head]["token"]]), "bf16_agree": r.get("bf16_agree")}
                   for r in rows if not r["methods"][head]["agree"]],
    }


def format_fidelity(out: dict) -> str:
    lines = [f"{out['requests']} requests ({', '.join(f'{n} {s}' for s, n in out['sources'].items())}; "
             f"{out['requests_planned']} planned), {out['prompt_tokens_mean']:.0f} prompt tokens on average, "
             f"model {out['model']}, {out['threads']} thread(s)", "",
             "| method | first-token agreement [95% Wilson CI] | disagreements | of them near-ties (gap < "
             f"{out['tie_gap']}) | SQuAD | passkey | KL (first token) |", "|---|---|---|---|---|---|---|"]
    for m, r in out["methods"].items():
        lo, hi = r["agreement_ci"]
        src = {s: f"{v['agreement']:.3f} (n={v['n']})" for s, v in r["by_source"].items()}
        lines.append(f"| {m} | {r['agreement']:.3f} [{lo:.3f}, {hi:.3f}] | {r['disagreements']} | "
                     f"{r['misses_near_tie']} | {src.get('squad', '-')} | {src.get('passkey', '-')} | "
                     f"{r['kl_first']:.4f} |")
    b = out["bf16"]
    lines += ["", f"Reference top-2 logit gap: {out['near_tie_requests']} of {out['requests']} first tokens are "
              f"near-ties (gap < {out['tie_gap']}); MPIC-{out['k']} agrees on {out['agreement_near_tie']:.3f} of "
              f"those and on {out['agreement_clear']:.3f} of the rest.",
              f"bf16 full prefill (float noise only) re-run on {b['checked']}: it flips "
              f"{b['flips_on_mpic_misses']} of the {b['mpic_misses_checked']} MPIC-{out['k']} disagreements checked "
              f"and {b['flips_on_near_ties']} of the {b['near_ties_checked']} closest near-ties MPIC agreed on."]
    if out["misses"]:
        lines += ["", f"MPIC-{out['k']} disagreements: " + "; ".join(
            f"{m['source']} gap {m['ref_gap']:.2f} {m['ref']!r}->{m['mpic']!r}"
            + ("" if m["bf16_agree"] is None else f" (bf16 {'keeps' if m['bf16_agree'] else 'flips'})")
            for m in out["misses"])]
    return "\n".join(lines)


def fold_into_run(run: dict, study: dict, study_path: str = "") -> dict:
    """The full run's ``first_token_agreement`` (the contract key) replaced by the no-decoding study's, which has ~7x
    the requests, with its Wilson interval and n beside it; the run's own value stays as ``..._run`` (n = 30 cannot
    tell 0.93 from 0.95). Only a study of the same model and headline k qualifies."""
    try:
        got = {k: study[k] for k in ("model", "k", "requests", "first_token_agreement", "first_token_agreement_ci")}
    except (KeyError, TypeError) as e:
        raise UserError(f"--fidelity-json {study_path}: not a fidelity study (missing {e}); give the "
                        f"mpic_fidelity.json that `bench/mpic.py --fidelity` wrote") from None
    if (got["model"], got["k"]) != (run.get("model"), run.get("k")):
        raise UserError(f"--fidelity-json {study_path}: study of {got['model']} k={got['k']}, run of "
                        f"{run.get('model')} k={run.get('k')}; fold a study of the same model and k")
    out = dict(run)
    out.setdefault("first_token_agreement_run", run["first_token_agreement"])
    out.update({"first_token_agreement": got["first_token_agreement"],
                "first_token_agreement_ci": list(got["first_token_agreement_ci"]),
                "first_token_agreement_requests": got["requests"],
                "first_token_agreement_source": {"file": Path(study_path).name if study_path else "",
                                                 "provenance": study.get("provenance")}})
    return out
