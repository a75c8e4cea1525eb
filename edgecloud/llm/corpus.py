"""A real text corpus on every machine: CPython's documentation topics (``pydoc_data.topics``), as passages.

Each topic is cut at blank lines into passages of roughly ``target_chars`` characters (a few hundred tokens);
ids are ``<topic>#<n>`` and stable for a given Python version.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class Passage:
    id: str
    topic: str
    text: str


@lru_cache(maxsize=4)
def passages(target_chars: int = 1000, min_chars: int = 200) -> tuple[Passage, ...]:
    from pydoc_data.topics import topics

    out = []
    for topic in sorted(topics):
        paras = [p.strip() for p in topics[topic].split("\n\n") if p.strip()]
        buf, n = [], 0
        for p in paras:
            buf.append(p)
            if sum(len(b) for b in buf) >= target_chars:
                out.append(Passage(f"{topic}#{n}", topic, "\n\n".join(buf)))
                buf, n = [], n + 1
        rest = "\n\n".join(buf)
        if len(rest) >= min_chars or (rest and n == 0):
            out.append(Passage(f"{topic}#{n}", topic, rest))
    return tuple(out)


def fingerprint(ps) -> str:
    h = hashlib.sha256()
    for p in ps:
        h.update(p.id.encode() + b"\0" + p.text.encode())
    return h.hexdigest()[:16]


def topic_split(holdout_every: int = 4) -> tuple[str, str]:
    """(calibration text, held-out text): whole topics sorted by name, every ``holdout_every``-th one held out, so a
    method calibrated on the first never sees the second (CSR's dictionaries, perplexity evaluations)."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    held = [topics[n] for i, n in enumerate(names) if i % holdout_every == 0]
    calib = [topics[n] for i, n in enumerate(names) if i % holdout_every != 0]
    return "\n\n".join(calib), "\n\n".join(held)


def token_windows(tokenizer, text: str, length: int, count: int):
    """``count`` consecutive non-overlapping windows of ``length`` tokens, a (count, length) long tensor."""
    import torch

    from edgecloud.errors import UserError

    ids = torch.tensor(tokenizer(text)["input_ids"])
    if len(ids) // length < count:
        raise UserError(f"corpus has only {len(ids)} tokens: fewer than {count} windows of {length}; "
                        f"lower the sequence length or count")
    return ids[: count * length].reshape(count, length)
