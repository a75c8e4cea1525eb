"""The DRAGON corpus: the shortened English Wikipedia dump shipped in gensim's test data (LGPL-2.1 package;
article text CC BY-SA 3.0, Wikipedia contributors), cleaned of wiki markup and cut into passages.

Whole articles go to one side (even index after a seeded shuffle: device, "private"; odd: cloud, "public"), so each
side's store lacks what the other holds. From some articles of each side one window of text is held out of the
stores; those windows are the evaluation texts (their article's other passages stay retrievable on one side only).
"""

from __future__ import annotations

import bz2
import importlib.util
import random
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from edgecloud.errors import UserError

DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


@dataclass(frozen=True)
class Passage:
    id: str
    title: str
    text: str


def dump_path() -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the DRAGON corpus ships in gensim's test data: pip install gensim")
    return Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data" / DUMP


_DROP = [r"<ref[^>]*/>", r"<ref.*?</ref>", r"<!--.*?-->", r"<[^>]+>", r"\{\|.*?\|\}"]


def clean(wiki: str) -> str:
    """Wiki markup to plain text (templates, refs, tables, files dropped; links keep their label)."""
    t = wiki
    for _ in range(3):  # nested templates
        t = re.sub(r"\{\{[^{}]*\}\}", "", t)
    for pat in _DROP:
        t = re.sub(pat, "", t, flags=re.S)
    t = re.sub(r"\[\[(?:File|Image|Category):[^\]]*(\[\[[^\]]*\]\][^\]]*)*\]\]", "", t)
    t = re.sub(r"\[\[(?:[^\]|]*\|)?([^\]]*)\]\]", r"\1", t)
    t = re.sub(r"\[https?://\S+ ?([^\]]*)\]", r"\1", t)
    t = re.sub(r"'{2,}", "", t)
    t = re.sub(r"^=+\s*(.*?)\s*=+\s*$", r"\1.", t, flags=re.M)
    t = re.sub(r"^[*#:;]+\s*", "", t, flags=re.M)
    t = re.sub(r"[ \t]+", " ", t)
    return re.sub(r"\n{3,}", "\n\n", t).strip()


@lru_cache(maxsize=1)
def articles(min_chars: int = 2000) -> tuple[tuple[str, str], ...]:
    """(title, plain text) of every non-redirect article of the dump with at least ``min_chars`` characters."""
    out = []
    with bz2.open(dump_path()) as f:
        for _, el in ET.iterparse(f):
            if el.tag.endswith("}page"):
                ns = "{" + el.tag[1:].split("}")[0] + "}"
                title = el.findtext(f"{ns}title") or ""
                text = el.findtext(f"{ns}revision/{ns}text") or ""
                el.clear()
                if text.lstrip().upper().startswith("#REDIRECT"):
                    continue
                body = clean(text)
                if len(body) >= min_chars:
                    out.append((title, body))
    return tuple(out)


def split_passages(title: str, text: str, words: int) -> list[str]:
    toks = text.split()
    return [" ".join(toks[i : i + words]) for i in range(0, len(toks), words) if len(toks[i : i + words]) >= 20]


@dataclass(frozen=True)
class Split:
    device: tuple[Passage, ...]
    cloud: tuple[Passage, ...]
    held_out: tuple[tuple[str, str, str], ...]  # (title, side, text window)


def make_split(n_articles: int = 0, words: int = 100, held_out_per_side: int = 8, seed: int = 0) -> Split:
    """Assign whole articles to device/cloud, cut ``words``-word passages, hold one passage per article out."""
    arts = list(articles())
    random.Random(seed).shuffle(arts)
    if n_articles:
        arts = arts[:n_articles]
    sides: dict[str, list[Passage]] = {"device": [], "cloud": []}
    held: list[tuple[str, str, str]] = []
    count = {"device": 0, "cloud": 0}
    for i, (title, text) in enumerate(arts):
        side = "device" if i % 2 == 0 else "cloud"
        ps = split_passages(title, text, words)
        hold = len(ps) // 2 if count[side] < held_out_per_side and len(ps) >= 4 else -1
        for j, p in enumerate(ps):
            if j == hold:
                held.append((title, side, p))
            else:
                sides[side].append(Passage(f"{title}#{j}", title, p))
        count[side] += hold >= 0
    return Split(tuple(sides["device"]), tuple(sides["cloud"]), tuple(held))
