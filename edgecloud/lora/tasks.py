"""Eight tasks with offline data, each with a seeded train / held-out split and an exact-match metric.

Generated tasks (arithmetic, JSON field extraction, string transforms, dates) have unlimited, exactly-checkable
data; ``topic`` classifies real CPython pydoc passages (``edgecloud.llm.corpus``, PSF licence) by their topic.
Prompts are short plain text ("<instruction>\\n<input>\\nAnswer:") so training sequences stay under ~64 tokens.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

from edgecloud.errors import UserError


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str


def _arith(r):
    a, b = r.randint(10, 99), r.randint(10, 99)
    return Example(f"Add the numbers.\n{a} + {b}\nAnswer:", str(a + b))


_NAMES = ["Ada", "Bo", "Cy", "Di", "Ed", "Flo", "Gus", "Hal", "Ivy", "Jo", "Kai", "Lu"]
_CITIES = ["Oslo", "Lima", "Pune", "Kyiv", "Rome", "Doha", "Baku", "Bern", "Cork", "Nice"]


def _json(r):
    rec = {"name": r.choice(_NAMES), "city": r.choice(_CITIES), "age": r.randint(18, 90)}
    f = r.choice(list(rec))
    return Example(f"Give the {f} field.\n{json.dumps(rec)}\nAnswer:", str(rec[f]))


def _word(r, n=(3, 6)):
    return "".join(r.choice("abcdefghijklmnoprstuw") for _ in range(r.randint(*n)))


def _reverse(r):
    w = _word(r)
    return Example(f"Reverse the letters.\n{w}\nAnswer:", w[::-1])


def _upper(r):
    w = " ".join(_word(r) for _ in range(2))
    return Example(f"Write in capitals.\n{w}\nAnswer:", w.upper())


def _sort(r):
    xs = r.sample(range(1, 60), 4)
    return Example(f"Sort ascending.\n{' '.join(map(str, xs))}\nAnswer:", " ".join(map(str, sorted(xs))))


def _count(r):
    w = _word(r, (4, 9))
    return Example(f"How many letters?\n{w}\nAnswer:", str(len(w)))


def _date(r):
    y, m, d = r.randint(1990, 2030), r.randint(1, 12), r.randint(1, 28)
    return Example(f"Rewrite the date as DD/MM/YYYY.\n{y}-{m:02d}-{d:02d}\nAnswer:", f"{d:02d}/{m:02d}/{y}")


_TOPICS: list | None = None


def _topic(r):
    global _TOPICS
    if _TOPICS is None:
        from edgecloud.llm.corpus import passages

        by = {}
        for p in passages():
            by.setdefault(p.topic, []).append(p.text)
        _TOPICS = sorted((k, v) for k, v in by.items() if len(v) >= 4)[:8]
    label, texts = r.choice(_TOPICS)
    t = r.choice(texts)
    s = r.randrange(0, max(1, len(t) - 160))
    return Example(f"Which Python docs topic? Options: {', '.join(k for k, _ in _TOPICS)}.\n{t[s:s + 160]}\n"
                   "Answer:", label)


TASKS = {"arith": _arith, "json": _json, "reverse": _reverse, "upper": _upper, "sort": _sort, "count": _count,
         "date": _date, "topic": _topic}


def examples(task: str, split: str, n: int, seed: int = 0) -> list[Example]:
    """Seeded examples; train and test draw from disjoint random streams (and test prompts not seen in train
    for the generated tasks with small spaces are still possible; the metric is exact match on the answer)."""
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}; choose from {sorted(TASKS)}")
    r = random.Random(f"{task}/{split}/{seed}")
    return [TASKS[task](r) for _ in range(n)]


def score(pred: str, ex: Example) -> float:
    return float(pred.strip().split("\n")[0].strip() == ex.answer)
