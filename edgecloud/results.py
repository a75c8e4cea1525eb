"""The one results layer: a result is JSON (with provenance) + a Markdown table + a PNG, written together.

Every benchmark under ``bench/`` and every ``--json`` CLI report goes through here, so each number we publish
says which commit, command, seed, library versions and CPU produced it, and how long it took.

    from edgecloud.results import Result, check_out_dir
    check_out_dir(out)                      # before any compute: a bad --out fails in a second, not an hour
    res = Result("llm_engine", data, seed=seed)
    res.table(rows, columns)                # or res.markdown = "..." for free text
    res.figure = fig                        # a matplotlib figure, optional
    res.write(out)                          # out/llm_engine.{json,md,png}, each atomically
    print(res.to_json())                    # the --json report, provenance included

Files are written to a temp file and renamed (``edgecloud.atomic``); the JSON is written last, so a reader that
finds the JSON finds its table and plot beside it.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

from edgecloud import PROCESS_T0, atomic
from edgecloud.errors import UserError
from edgecloud.paths import REPO_ROOT

VERSIONED = ("torch", "numpy", "transformers", "peft", "safetensors")


@lru_cache(maxsize=1)
def git_commit() -> dict[str, Any]:
    """The checkout's commit and whether the working tree differs from it ("unknown" outside a git checkout)."""
    def git(*args: str) -> str | None:
        try:
            r = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": "unknown", "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status)}


@lru_cache(maxsize=1)
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def _command() -> str:
    """The command line as a user would type it again (``python -m edgecloud`` shows as ``edgecloud``)."""
    if not sys.argv or not sys.argv[0]:
        return ""
    prog = Path(sys.argv[0])
    name = "edgecloud" if prog.name in ("__main__.py", "cli.py") and prog.parent.name == "edgecloud" else prog.name
    if prog.suffix == ".py" and prog.parent.name == "bench":
        name = f"python bench/{prog.name}"
    return " ".join([name, shlex.join(sys.argv[1:])]).strip()


def provenance(seed: int | None = None, started: float | None = None, **extra: Any) -> dict[str, Any]:
    """Where a number came from: commit, command line, seed, versions, CPU and threads, wall time."""
    torch = sys.modules.get("torch")  # never import torch just to describe a run that did not use it
    prov: dict[str, Any] = {
        **git_commit(),
        "command": _command(),
        "seed": seed,
        "python": platform.python_version(),
        "versions": {p: v for p in VERSIONED if (v := _version(p)) is not None},
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads() if torch is not None else None,
        "wall_s": round(time.time() - (started if started is not None else PROCESS_T0), 3),
        "finished_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    prov.update(extra)
    return prov


def _clean(x: Any) -> Any:
    """JSON-safe: numpy/torch scalars to Python, NaN/inf to None (strict JSON has neither)."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "item") and callable(x.item) and getattr(x, "ndim", 0) == 0:
        x = x.item()
    if hasattr(x, "tolist") and callable(x.tolist):
        return _clean(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def dumps(data: Any, indent: int | None = None) -> str:
    return json.dumps(_clean(data), indent=indent, allow_nan=False)


def fmt(v: Any, digits: int = 4) -> str:
    """A table cell: floats to ``digits`` significant figures (thousands kept whole), None as a dash."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "—"
        if abs(v) >= 10 ** digits:
            return f"{v:,.0f}"
        return f"{v:.{digits}g}"
    return str(v)


def markdown_table(rows: list[dict], columns: list[str] | None = None, headers: list[str] | None = None,
                   digits: int = 4) -> str:
    """Rows of dicts as a GitHub Markdown table (columns default to the first row's keys)."""
    if not rows:
        return ""
    columns = columns or list(rows[0])
    headers = headers or columns
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        out.append("| " + " | ".join(fmt(r.get(c), digits) for c in columns) + " |")
    return "\n".join(out) + "\n"


def check_out_dir(out: str | os.PathLike, what: str = "--out") -> Path:
    """Fail now, with one line, if results cannot be written under ``out`` (so no compute is wasted)."""
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise UserError(f"{what} {p}: exists and is not a directory; give a directory path")
    probe = p
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{what} {p}: {probe} is not a writable directory; choose another {what}")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{what} {p}: cannot create it ({e.strerror}); choose another {what}") from None
    return p


def check_out_file(out: str | os.PathLike, what: str = "--out") -> Path:
    """Like :func:`check_out_dir` for a single output file path."""
    p = Path(out)
    if p.is_dir():
        raise UserError(f"{what} {p}: is a directory; give a file path")
    check_out_dir(p.parent if str(p.parent) else Path("."), what)
    return p


@dataclass
class Result:
    """One measured result: ``data`` (JSON-able), an optional Markdown body and an optional matplotlib figure."""

    name: str
    data: dict[str, Any]
    seed: int | None = None
    title: str | None = None
    markdown: str = ""
    figure: Any = None
    started: float | None = None
    extra_provenance: dict[str, Any] = field(default_factory=dict)

    def table(self, rows: list[dict], columns: list[str] | None = None, headers: list[str] | None = None,
              digits: int = 4) -> str:
        """Append a Markdown table of ``rows`` to the body; returns it (for printing)."""
        t = markdown_table(rows, columns, headers, digits)
        self.markdown += ("\n" if self.markdown else "") + t
        return t

    def with_provenance(self) -> dict[str, Any]:
        d = dict(self.data)
        d["provenance"] = provenance(self.seed, self.started, **self.extra_provenance)
        return d

    def to_json(self, indent: int | None = None) -> str:
        return dumps(self.with_provenance(), indent)

    def render_markdown(self, full: dict[str, Any]) -> str:
        prov = full["provenance"]
        lines = [f"# {self.title or self.name}", "",
                 f"Regenerate: `{prov['command']}` (commit {prov['commit'][:12]}"
                 f"{' + local changes' if prov.get('dirty') else ''}, seed {prov['seed']}, "
                 f"{prov['wall_s']:.0f} s on {prov['cpu_count']} × {prov['cpu']}).", ""]
        if self.markdown:
            lines += [self.markdown.rstrip(), ""]
        if self.figure is not None:
            lines += [f"![{self.name}]({self.name}.png)", ""]
        return "\n".join(lines)

    def write(self, out: str | os.PathLike) -> dict[str, Path]:
        """Write ``out/<name>.png``, ``.md`` and ``.json`` (JSON last); returns the paths."""
        d = check_out_dir(out)
        full = self.with_provenance()
        paths = {}
        if self.figure is not None:
            paths["png"] = d / f"{self.name}.png"
            atomic.save_figure(self.figure, paths["png"])
        paths["md"] = d / f"{self.name}.md"
        atomic.write_text(paths["md"], self.render_markdown(full))
        paths["json"] = d / f"{self.name}.json"
        atomic.write_text(paths["json"], dumps(full, indent=1) + "\n")
        return paths


def report(data: dict[str, Any], seed: int | None = None, **extra: Any) -> str:
    """A ``--json`` CLI report: ``data`` plus ``provenance``, one line."""
    return Result("report", data, seed=seed, extra_provenance=extra).to_json()


def code_key(*parts: Any, version: str = "") -> str:
    """A cache key over config parts and a code version: bump ``version`` when the computation changes, so a
    cached result from older code is never served."""
    import hashlib

    return hashlib.sha256(dumps([version, *parts]).encode()).hexdigest()[:16]
