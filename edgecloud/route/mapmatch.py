"""GPS traces onto the road graph: a GPX reader and an HMM map matcher in the style of Newson & Krumm (2009).

States are (edge, position along it) candidates within ``radius`` of each fix; emission is Gaussian in the
perpendicular distance (``sigma``), transition is exponential in |route distance - great-circle distance|
(``beta``), Viterbi picks the most likely sequence and shortest paths join consecutive matched edges.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import dijkstra

from edgecloud.errors import UserError
from edgecloud.route.graph import R_EARTH, RoadGraph


@dataclass(frozen=True)
class MatchConfig:
    sigma: float = 10.0      # GPS noise (m)
    beta: float = 30.0       # transition scale (m)
    radius: float = 60.0     # candidate search radius (m)
    max_cands: int = 6


def read_gpx(path: str | Path) -> np.ndarray:
    """(n, 2) lat/lon of a GPX file's track (or route) points; UserError naming the problem otherwise."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--gpx: no file at {p}")
    try:
        root = ET.parse(p).getroot()
    except ET.ParseError as e:
        raise UserError(f"--gpx {p}: not well-formed XML ({e}); give a GPX 1.1 file") from None
    pts = [el for el in root.iter() if el.tag.rsplit("}", 1)[-1] in ("trkpt", "rtept")]
    if not pts:
        raise UserError(f"--gpx {p}: no <trkpt> or <rtept> points; give a GPX track")
    out = []
    for i, el in enumerate(pts):
        try:
            la, lo = float(el.attrib["lat"]), float(el.attrib["lon"])
        except (KeyError, ValueError):
            raise UserError(f"--gpx {p}: point {i} lacks a numeric lat/lon attribute") from None
        if not (-90 <= la <= 90 and -180 <= lo <= 180):
            raise UserError(f"--gpx {p}: point {i} has lat/lon out of range ({la}, {lo})")
        out.append((la, lo))
    return np.array(out)


class MapMatcher:
    def __init__(self, g: RoadGraph, cfg: MatchConfig = MatchConfig()):
        self.g, self.cfg = g, cfg
        self.adj = csr_matrix((g.length, (g.u, g.v)), shape=(g.n_nodes, g.n_nodes))
        self.lat0 = float(np.mean(g.lat))

    def xy(self, latlon: np.ndarray) -> np.ndarray:
        la, lo = np.radians(latlon[:, 0]), np.radians(latlon[:, 1])
        return np.stack([lo * R_EARTH * np.cos(np.radians(self.lat0)), la * R_EARTH], 1)

    def candidates(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Edges within the radius of point p: (edge ids, distances, fractions along the edge)."""
        g = self.g
        ax, ay, bx, by = g.x[g.u], g.y[g.u], g.x[g.v], g.y[g.v]
        dx, dy = bx - ax, by - ay
        f = np.clip(((p[0] - ax) * dx + (p[1] - ay) * dy) / np.maximum(dx * dx + dy * dy, 1e-9), 0, 1)
        d = np.hypot(ax + f * dx - p[0], ay + f * dy - p[1])
        idx = np.flatnonzero(d <= self.cfg.radius)
        idx = idx[np.argsort(d[idx], kind="stable")[: self.cfg.max_cands]]
        return idx, d[idx], f[idx]

    def match(self, latlon: np.ndarray) -> list[int]:
        """Matched edge path (connected) for a trace; UserError if the trace is off the graph."""
        g, cfg = self.g, self.cfg
        pts = self.xy(np.asarray(latlon, float))
        layers = [self.candidates(p) for p in pts]
        keep = [i for i, c in enumerate(layers) if len(c[0])]
        if len(keep) < 2:
            raise UserError(f"the trace has {len(keep)} points within {cfg.radius:.0f} m of the road graph; "
                            "it must run on the graph's area")
        pts, layers = pts[keep], [layers[i] for i in keep]
        score = -0.5 * (layers[0][1] / cfg.sigma) ** 2
        back = []
        for k in range(1, len(layers)):
            (e1, _, f1), (e2, d2, f2) = layers[k - 1], layers[k]
            gc = float(np.hypot(*(pts[k] - pts[k - 1])))
            src = np.unique(g.v[e1])
            dist = dijkstra(self.adj, indices=src, limit=gc * 3 + 4 * cfg.radius + 200)
            row = {int(s): i for i, s in enumerate(src)}
            D = dist[[row[int(x)] for x in g.v[e1]]][:, g.u[e2]]               # (a, b)
            route = (1 - f1)[:, None] * g.length[e1][:, None] + D + f2[None, :] * g.length[e2][None, :]
            same = e1[:, None] == e2[None, :]
            fwd = (f2[None, :] - f1[:, None]) * g.length[e1][:, None]
            route = np.where(same & (fwd >= 0), fwd, route)
            trans = -np.abs(route - gc) / cfg.beta
            total = score[:, None] + trans
            back.append(np.argmax(total, 0))
            score = total.max(0) - 0.5 * (d2 / cfg.sigma) ** 2
            if not np.isfinite(score).any():       # a break in the chain: restart from emissions
                score = -0.5 * (d2 / cfg.sigma) ** 2
        j = int(np.argmax(score))
        seq = [int(layers[-1][0][j])]
        for k in range(len(back) - 1, -1, -1):
            j = int(back[k][j])
            seq.append(int(layers[k][0][j]))
        seq.reverse()
        path: list[int] = []
        for e in seq:
            if path and path[-1] == e:
                continue
            if path and g.v[path[-1]] != g.u[e]:
                try:
                    path += g.route(int(g.v[path[-1]]), int(g.u[e]), g.length)
                except UserError:
                    pass
            path.append(e)
        return path


def sample_trace(g: RoadGraph, edges: list[int], step_m: float, noise_m: float, seed: int) -> np.ndarray:
    """Synthetic GPS (lat, lon) along a path every ``step_m`` metres with Gaussian noise: a known-truth test."""
    rng = np.random.default_rng(seed)
    xs = np.concatenate([[g.x[g.u[edges[0]]]], g.x[g.v[edges]]])
    ys = np.concatenate([[g.y[g.u[edges[0]]]], g.y[g.v[edges]]])
    cum = np.concatenate([[0], np.cumsum(np.hypot(np.diff(xs), np.diff(ys)))])
    s = np.arange(0, cum[-1], step_m)
    x = np.interp(s, cum, xs) + rng.normal(0, noise_m, len(s))
    y = np.interp(s, cum, ys) + rng.normal(0, noise_m, len(s))
    lat = np.degrees(y / R_EARTH)
    lon = np.degrees(x / (R_EARTH * np.cos(np.radians(float(np.mean(g.lat))))))
    return np.stack([lat, lon], 1)
