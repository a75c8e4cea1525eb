"""Answer quality with the KV cache compressed: answer F1 against gold for fp16, KIVI-2/4 and CSR caches.

Two offline sets, a seeded subset of each:

- **SQuAD v1.1 dev** (CC BY-SA 4.0), read through :mod:`edgecloud.kvcache.qa` (the ``bigbench`` sdist, cached
  once): passage + question, the answer is a span of the passage (reading with the compressed cache).
- **FanOutQA dev** (Zhu et al. 2024, CC BY-SA 4.0; the JSON ships in the PyPI package ``fanoutqa``, read in place
  without importing it): multi-hop questions over Wikipedia. The package ships the evidence as page references
  only (fetching their text needs the internet), so here it is **closed-book**: the question alone. The gold is
  every answer string of the question (lists and dicts flattened); F1 is SQuAD token F1 against their union.

The prompt (question, and passage for SQuAD) is fed in 64-token chunks through the compressed cache, then the
answer is decoded greedily from that cache, so both the prompt's and the answer's tokens are coded. Besides F1 vs
gold, ``f1_vs_fp16`` scores each method's answer against the fp16 cache's own answer (how much compression changes
what the model says), which stays informative where a small model's gold F1 is low.
"""

from __future__ import annotations

import importlib.util
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from edgecloud.errors import UserError
from edgecloud.kvcache.qa import QAItem, bootstrap_ci, f1, squad_items, squad_path

FANOUT_FILE = "data/fanout-final-dev.json"
SYSTEM = "Answer the question with a few words only."


@dataclass(frozen=True)
class QAConfig:
    squad: int = 50  # SQuAD questions (0 = skip)
    fanoutqa: int = 50  # FanOutQA dev questions (0 = skip)
    max_new_tokens: int = 16
    chunk: int = 64  # prompt tokens per forward through the compressed cache

    def __post_init__(self):
        if self.squad < 0 or self.fanoutqa < 0 or self.max_new_tokens < 1 or self.chunk < 1:
            raise UserError("QA counts must be >= 0, max_new_tokens and chunk >= 1")


def _flatten(a) -> list[str]:
    if isinstance(a, dict):
        return [str(v) for v in a.values()]
    if isinstance(a, list):
        return [str(v) for v in a]
    return [str(a)]


def fanoutqa_path() -> Path:
    """The dev JSON inside the installed ``fanoutqa`` package (found without importing it)."""
    spec = importlib.util.find_spec("fanoutqa")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the FanOutQA dev set needs the package: pip install --no-deps fanoutqa")
    p = Path(list(spec.submodule_search_locations)[0]) / FANOUT_FILE
    if not p.exists():
        raise UserError(f"{p} is missing; reinstall: pip install --no-deps --force-reinstall fanoutqa")
    return p


def fanoutqa_items(path: Path | None = None) -> list[QAItem]:
    """Every dev question; gold = one string holding all its answer strings (F1 over their union)."""
    p = path or fanoutqa_path()
    try:
        data = json.loads(Path(p).read_text())
        return [QAItem(q["question"], [" ".join(_flatten(q["answer"]))], "", [], q["id"], "fanoutqa") for q in data]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{p}: not a FanOutQA dev JSON ({type(e).__name__}: {e})") from None


def prompt_for(engine, item: QAItem) -> str:
    user = f"Passage: {item.gold}\n\nQuestion: {item.question}" if item.gold else f"Question: {item.question}"
    return engine.chat_prompt(SYSTEM, user)


def answer(engine, ids: list[int], cache, cfg: QAConfig) -> str:
    """Prefill ``ids`` chunk by chunk into ``cache`` and decode greedily; the first line of the answer."""
    t = torch.tensor(ids)
    with torch.inference_mode():
        for i in range(0, len(t), cfg.chunk):
            logits = engine.logits_for(t[i:i + cfg.chunk].tolist(), cache)[-1]
        toks, _ = engine.greedy(cache, logits, cfg.max_new_tokens)
    text = engine.decode_text(toks).strip()
    return text.splitlines()[0].strip() if text else ""


def load_sets(cfg: QAConfig, seed: int) -> dict[str, list[QAItem]]:
    rng = random.Random(seed)
    sets = {}
    if cfg.squad:
        items = squad_items(squad_path())
        sets["squad"] = rng.sample(items, min(cfg.squad, len(items)))
    if cfg.fanoutqa:
        items = fanoutqa_items()
        sets["fanoutqa"] = rng.sample(items, min(cfg.fanoutqa, len(items)))
    return sets


def paired_difference(a: list[float], b: list[float], seed: int = 0) -> dict:
    """Mean of ``a - b`` over the same questions with its seeded bootstrap 95% interval (paired: one resample of
    questions for both methods, so the question-to-question spread cancels)."""
    d = [x - y for x, y in zip(a, b, strict=True)]
    return {"mean": sum(d) / len(d), "ci": bootstrap_ci(d, seed=seed), "n": len(d)}


def qa_compare(engine, specs: dict, cfg: QAConfig, seed: int = 0, log=print, pairs=(("csr", "kivi2"),)) -> dict:
    """``specs``: method -> (CacheSpec, dictionaries or None), "fp16" first. Answer F1 per set and method, every
    question's scores, and the paired differences ``pairs`` (first minus second) per set."""
    from edgecloud.kvcache.csr.cache import cache_bits_per_element, make_cache

    sets = load_sets(cfg, seed)
    summary, answers, per_q, paired = {}, {}, {}, {}
    for src, items in sets.items():
        got: dict[str, list[str]] = {m: [] for m in specs}
        bits: dict[str, list[float]] = {m: [] for m in specs}
        for i, it in enumerate(items):  # question by question, every method: the log shows progress as it goes
            t0 = time.perf_counter()
            ids = engine.encode_prompt(prompt_for(engine, it))
            for method, (spec, dicts) in specs.items():
                cache = make_cache(spec, engine.n_layers, dicts, engine, seed=seed)
                got[method].append(answer(engine, ids, cache, cfg))
                bits[method].append(cache_bits_per_element(cache))  # this prompt + answer, every byte counted
            log(f"QA {src} {i + 1}/{len(items)} ({len(ids)} tokens, {time.perf_counter() - t0:.0f}s): "
                + " | ".join(f"{m}: {got[m][-1][:40]!r}" for m in specs))
        summary[src], per_q[src] = {}, {}
        for method, outs in got.items():
            gold = [f1(a, it.answers) for a, it in zip(outs, items)]
            vs = [f1(a, [b]) if b.strip() else float(not a.strip()) for a, b in zip(outs, got["fp16"])]
            per_q[src][method] = {"f1": gold, "f1_vs_fp16": vs}
            summary[src][method] = {"f1": sum(gold) / len(gold), "f1_ci": bootstrap_ci(gold, seed=seed),
                                    "f1_vs_fp16": sum(vs) / len(vs), "f1_vs_fp16_ci": bootstrap_ci(vs, seed=seed),
                                    "n": len(items), "bits_per_element": sum(bits[method]) / len(items)}
            r = summary[src][method]
            log(f"QA {src} {method}: F1 {r['f1']:.3f}  vs fp16 {r['f1_vs_fp16']:.3f}  "
                f"{r['bits_per_element']:.2f} bits")
        paired[src] = {f"{a}-{b}": {k: paired_difference(per_q[src][a][k], per_q[src][b][k], seed)
                                    for k in ("f1", "f1_vs_fp16")} for a, b in pairs if a in specs and b in specs}
        answers[src] = [{"question": it.question, "gold": it.answers[:3], **{m: got[m][i] for m in got}}
                        for i, it in enumerate(items[:5])]
    return {"summary": summary, "paired": paired, "per_question": per_q, "examples": answers,
            "config": {"squad": cfg.squad, "fanoutqa": cfg.fanoutqa, "max_new_tokens": cfg.max_new_tokens}}
