"""The chitchat dialogue corpus (PyPI ``chitchat-dataset``, MIT): 7,168 conversations between 1,315 senders.

The package ships one JSON file: ``{conversation_id: {"messages": [[message, ...], ...], ...}}`` where each inner
list is one *turn* (consecutive messages of one sender) and each message has ``text``, ``timestamp``, ``sender``.
We read it in place (never copied) and expose turns in time order, which is what both personalization systems need:
who said what, to whom, after what.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from edgecloud.errors import UserError


@dataclass(frozen=True)
class Turn:
    """One turn: a sender's consecutive messages, joined by spaces."""

    conversation: str
    index: int  # position of the turn in its conversation
    sender: str
    text: str
    timestamp: str  # ISO-8601 UTC of the turn's first message


def default_path() -> Path:
    try:
        import chitchat_dataset
    except ImportError as e:
        raise UserError("the chitchat corpus needs the 'chitchat-dataset' package: run `bash scripts/setup.sh` "
                        "(or pip install chitchat-dataset)") from e
    return Path(chitchat_dataset.__file__).with_name("dataset.json")


@lru_cache(maxsize=2)
def load_conversations(path: str | None = None) -> tuple[tuple[Turn, ...], ...]:
    """Every conversation as a tuple of turns, conversations sorted by their first timestamp (then id)."""
    p = Path(path) if path else default_path()
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise UserError(f"chitchat corpus not found: {p}; pass the dataset.json of the chitchat-dataset package") from e
    except json.JSONDecodeError as e:
        raise UserError(f"{p}: not valid JSON (line {e.lineno}): {e.msg}") from e
    if not isinstance(raw, dict):
        raise UserError(f"{p}: expected an object of conversations keyed by id")
    convs = []
    for cid, conv in raw.items():
        try:
            groups = conv["messages"]
            turns = []
            for group in groups:
                if not group:
                    continue
                text = " ".join(m["text"].strip() for m in group if m["text"].strip())
                if text:
                    turns.append(Turn(cid, len(turns), group[0]["sender"], text, group[0]["timestamp"]))
        except (KeyError, TypeError) as e:
            raise UserError(f"{p}: conversation {cid} is malformed ({type(e).__name__}: {e}); expected "
                            "messages[turn][message] with text, timestamp, sender") from e
        if turns:
            convs.append(tuple(turns))
    convs.sort(key=lambda c: (c[0].timestamp, c[0].conversation))
    return tuple(convs)


def senders(convs) -> dict[str, int]:
    """Number of turns per sender."""
    out: dict[str, int] = {}
    for conv in convs:
        for t in conv:
            out[t.sender] = out.get(t.sender, 0) + 1
    return out
