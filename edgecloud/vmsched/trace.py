"""Load VM traces: the lifetime form (``vmid,cpu,mem,at,lt``) and the raw event form
(``vmid,cpu,memory,time,type`` with create=0 / delete=1).

Every loader validates at the boundary and raises :class:`~edgecloud.errors.UserError` naming the row and
field, so a bad file never fails deep inside the simulator.
"""

from __future__ import annotations

import csv
import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgecloud.errors import UserError
from edgecloud.paths import data_root

LIFETIME_COLUMNS = ("vmid", "cpu", "mem", "at", "lt")
EVENT_COLUMNS = ("vmid", "cpu", "memory", "time", "type")
DATASET_DIR = "huawei-east-1"
TRACE_FILE = "Huawei-East-1-lt.csv"
HOW_TO_GET = (
    "get Huawei-East-1-lt.csv from the SPANE repository (ChanTinPing/SPANE, data/), derived from "
    "huaweicloud/VM-placement-dataset (CC BY-NC 4.0; cite Sheng et al., VMAgent, arXiv 2112.04785), "
    "and put it under $EDGECLOUD_DATA/huawei-east-1/ or pass --trace PATH"
)


@dataclass(frozen=True)
class Trace:
    """VMs sorted by arrival. Times are seconds; all arrays have one entry per VM."""

    vmid: np.ndarray
    cpu: np.ndarray
    mem: np.ndarray
    at: np.ndarray
    lt: np.ndarray
    source: str = ""

    def __len__(self) -> int:
        return len(self.at)

    def slice(self, start: int, stop: int) -> Trace:
        s = slice(start, stop)
        return Trace(self.vmid[s], self.cpu[s], self.mem[s], self.at[s], self.lt[s], self.source)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for a in (self.cpu, self.mem, self.at, self.lt):
            h.update(np.ascontiguousarray(a, dtype=np.float64).tobytes())
        return h.hexdigest()[:16]


def default_trace_path() -> Path:
    return data_root() / DATASET_DIR / TRACE_FILE


def default_split_dir() -> Path:
    return data_root() / DATASET_DIR / "spane_splits"


def _read_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    if not path.exists():
        raise UserError(f"trace file not found: looked at {path}; {HOW_TO_GET}")
    if path.is_dir():
        raise UserError(f"trace path {path} is a directory; pass the CSV file itself")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            try:
                header = [h.strip() for h in next(reader)]
            except StopIteration:
                raise UserError(f"trace {path} is empty; it needs a header line and at least one row") from None
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"trace {path} is not a UTF-8 CSV text file ({type(e).__name__}); pass the trace CSV") from None
    return header, rows


def rows_as_lines(rows: list[list[str]]) -> list[str]:
    return [",".join(r) for r in rows]


def _columns(path: Path, header: list[str], rows: list[list[str]], names: tuple[str, ...]) -> dict[str, np.ndarray]:
    missing = [n for n in names if n not in header]
    if missing:
        raise UserError(
            f"trace {path}: missing column(s) {', '.join(missing)}; the header must name {','.join(names)} "
            f"(found {','.join(header) or 'nothing'})"
        )
    if not rows:
        raise UserError(f"trace {path} has a header but no rows")
    idx = [header.index(n) for n in names]
    width = len(header)
    try:  # fast path; on any failure fall through to the row-by-row pass that names the bad field
        arr = np.loadtxt(rows_as_lines(rows), delimiter=",", usecols=idx, dtype=np.float64, ndmin=2)
        if arr.shape == (len(rows), len(names)) and np.isfinite(arr).all() and all(len(r) == width for r in rows):
            return {n: np.ascontiguousarray(arr[:, k]) for k, n in enumerate(names)}
    except ValueError:
        pass
    out = {n: np.empty(len(rows), dtype=np.float64) for n in names}
    for r, row in enumerate(rows):
        line = r + 2  # 1-based, after the header
        if len(row) != width:
            raise UserError(f"trace {path}, line {line}: expected {width} fields, found {len(row)}")
        for n, j in zip(names, idx):
            try:
                v = float(row[j])
            except ValueError:
                raise UserError(
                    f"trace {path}, line {line}, field '{n}': {row[j]!r} is not a number"
                ) from None
            if not np.isfinite(v):
                raise UserError(f"trace {path}, line {line}, field '{n}': value is {row[j]!r}; it must be finite")
            out[n][r] = v
    return out


def _validate(path: str, vmid, cpu, mem, at, lt, line_of=lambda i: i + 2) -> None:
    for name, arr in (("cpu", cpu), ("mem", mem)):
        bad = np.flatnonzero(arr <= 0)
        if bad.size:
            raise UserError(f"trace {path}, line {line_of(bad[0])}, field '{name}': {arr[bad[0]]:g} must be > 0")
    bad = np.flatnonzero(lt < 1)
    if bad.size:
        raise UserError(
            f"trace {path}, line {line_of(bad[0])}, field 'lt': lifetime {lt[bad[0]]:g} < 1 s; lifetimes must be >= 1"
        )
    bad = np.flatnonzero(at < 0)
    if bad.size:
        raise UserError(f"trace {path}, line {line_of(bad[0])}, field 'at': arrival {at[bad[0]]:g} is negative")
    bad = np.flatnonzero(np.diff(at) < 0)
    if bad.size:
        i = bad[0] + 1
        raise UserError(
            f"trace {path}, line {line_of(i)}, field 'at': arrival {at[i]:g} is before the previous row's "
            f"{at[i - 1]:g}; sort the trace by arrival time"
        )


def load_lifetime_trace(path: str | Path | None = None) -> Trace:
    """Load ``vmid,cpu,mem,at,lt`` (the SPANE file). Rows must already be sorted by arrival."""
    path = Path(path) if path is not None else default_trace_path()
    header, rows = _read_rows(path)
    c = _columns(path, header, rows, LIFETIME_COLUMNS)
    _validate(str(path), c["vmid"], c["cpu"], c["mem"], c["at"], c["lt"])
    return Trace(c["vmid"].astype(np.int64), c["cpu"], c["mem"], c["at"], c["lt"], str(path))


def load_event_trace(path: str | Path, horizon: float | None = None) -> Trace:
    """Load raw events ``vmid,cpu,memory,time,type`` (0 = create, 1 = delete) and convert them to lifetimes.

    A VM that is created but never deleted is dropped, unless ``horizon`` is given: then it lives until
    ``horizon`` (an absolute time), or for at least 1 s.
    """
    path = Path(path)
    header, rows = _read_rows(path)
    c = _columns(path, header, rows, EVENT_COLUMNS)
    kinds = c["type"]
    bad = np.flatnonzero((kinds != 0) & (kinds != 1))
    if bad.size:
        raise UserError(
            f"trace {path}, line {bad[0] + 2}, field 'type': {kinds[bad[0]]:g} must be 0 (create) or 1 (delete)"
        )
    create = kinds == 0
    ids_c = c["vmid"][create].astype(np.int64)
    if len(np.unique(ids_c)) != len(ids_c):
        dup = ids_c[np.flatnonzero(np.bincount(np.unique(ids_c, return_inverse=True)[1]) > 1)[0]]
        raise UserError(f"trace {path}: vmid {dup} is created twice; each VM needs exactly one create event")
    delete_time: dict[int, float] = {}
    for vid, t in zip(c["vmid"][~create].astype(np.int64), c["time"][~create]):
        delete_time[int(vid)] = float(t)
    order = np.argsort(c["time"][create], kind="stable")
    ids = ids_c[order]
    at = c["time"][create][order]
    cpu = c["cpu"][create][order]
    mem = c["memory"][create][order]
    end = np.array([delete_time.get(int(v), np.nan) for v in ids])
    alive = np.isnan(end)
    if horizon is None:
        keep = ~alive
    else:
        end[alive] = np.maximum(horizon, at[alive] + 1)
        keep = np.ones_like(alive)
    ids, at, cpu, mem, end = ids[keep], at[keep], cpu[keep], mem[keep], end[keep]
    lt = end - at
    bad = np.flatnonzero(lt < 1)
    if bad.size:
        raise UserError(
            f"trace {path}: vmid {ids[bad[0]]} is deleted {lt[bad[0]]:g} s after its creation; lifetimes must be >= 1 s"
        )
    _validate(str(path), ids, cpu, mem, at, lt, line_of=lambda i: f"(vmid {ids[i]})")
    return Trace(ids, cpu, mem, at, lt, str(path))


def load_trace(path: str | Path | None = None, horizon: float | None = None) -> Trace:
    """Load either form, chosen by the header."""
    path = Path(path) if path is not None else default_trace_path()
    if path.is_file():
        header = set(_read_header(path))
        if {"time", "type"} <= header:
            return load_event_trace(path, horizon=horizon)
    return load_lifetime_trace(path)


def _read_header(path: Path) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return [h.strip() for h in f.readline().split(",")]
    except UnicodeDecodeError:
        raise UserError(f"trace {path} is not a UTF-8 CSV text file; pass the trace CSV") from None


def _magic(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(6)


# Splits of our own, drawn (seeded) from rows no public split uses as a start. SPANE trains on starts in [0, 50000),
# validates on 150 starts in [50000, 70000) and tests on 1000 in [70000, 110000).
# - ``select``: 600 more starts in [50000, 70000), none of them a public validation start: the larger validation
#   set for choosing among seeds and checkpoints (the 150 are few and heavy-tailed).
# - ``outside``: 300 starts in [110000, 113000), after the test range: reported only, never used to choose.
DRAWN = {"select": (50_000, 70_000, 600, 21), "outside": (110_000, 113_000, 300, 2121)}


def drawn_starts(name: str, trace_len: int | None = None) -> np.ndarray:
    """The seeded start rows of one of our own splits (``DRAWN``), sorted."""
    lo, hi, k, seed = DRAWN[name]
    if trace_len is not None and hi > trace_len:
        raise UserError(f"split '{name}' needs starts up to row {hi}; the trace has {trace_len} rows (it is built for "
                        "the Huawei-East-1 trace)")
    pool = np.arange(lo, hi)
    if name == "select":
        pool = np.setdiff1d(pool, load_starts("valid"))
    return np.sort(np.random.default_rng(seed).choice(pool, k, replace=False)).astype(np.int64)


def load_starts(split: str | Path, trace_len: int | None = None) -> np.ndarray:
    """Start rows for a split: ``test``, ``valid`` (SPANE's), ``select`` or ``outside`` (ours, see ``DRAWN``), or a
    path to a ``.npy`` or text file of integers."""
    named = {"test": "test_random_time_1000.npy", "valid": "valid_random_time_150.npy"}
    if str(split) in DRAWN:
        return drawn_starts(str(split), trace_len)
    if str(split) in named:
        path = default_split_dir() / named[str(split)]
        if not path.exists():
            raise UserError(f"split file not found: looked at {path}; {HOW_TO_GET} (the splits are in spane_splits/)")
    else:
        path = Path(split)
        if not path.exists():
            raise UserError(
                f"split '{split}' is neither test, valid, select, outside nor an existing file; pass one of "
                "those names or a path to a .npy or text file of start rows"
            )
    if path.is_dir():
        raise UserError(f"split {path} is a directory; pass a .npy or text file of start rows")
    if path.suffix == ".npy" and _magic(path) != b"\x93NUMPY":
        raise UserError(f"split file {path} is named .npy but is not a NumPy array file; save it with numpy.save, "
                        "or give a text file of start rows another suffix")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an empty file is reported below, in one line
            if path.suffix == ".npy":
                starts = np.load(path, allow_pickle=False)
            else:
                starts = np.loadtxt(path, dtype=np.float64, ndmin=1, delimiter=None)
    except Exception as e:  # noqa: BLE001 - numpy raises many types; all mean "unreadable"
        raise UserError(
            f"split file {path} could not be read as integers ({e}); write one start row per line"
        ) from None
    starts = np.asarray(starts).reshape(-1)
    if starts.size == 0:
        raise UserError(f"split file {path} holds no start rows")
    if not np.all(np.isfinite(starts)) or np.any(starts != np.round(starts)) or np.any(starts < 0):
        raise UserError(f"split file {path}: start rows must be non-negative integers")
    starts = starts.astype(np.int64)
    if trace_len is not None and starts.max() >= trace_len:
        raise UserError(
            f"split file {path}: start row {starts.max()} is past the end of the trace ({trace_len} rows); "
            "use start rows below the trace length"
        )
    return starts
