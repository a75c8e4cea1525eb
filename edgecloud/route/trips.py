"""Historical trips from hidden preference models, with per-driver noise, and their text form for retrieval.

Each driver has one preference and a fixed multiplicative log-normal noise over edge costs, so two drivers with the
same preference still take different routes; ``familiar`` drivers also have their own set of known roads. A trip's
ground truth is the min-cost path under the driver's hidden cost. The held-out preference's drivers never enter the
retrieval index: their trips test adaptation without retraining.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edgecloud.route.graph import RoadGraph

PREFS = {
    "fastest": "get there as fast as possible",
    "shortest": "take the shortest distance",
    "avoid_major": "avoid major roads and highways, quiet streets",
    "familiar": "stick to the roads I know",
    "scenic": "scenic route near parks and water",
}
HELDOUT = "scenic"


@dataclass(frozen=True)
class TripConfig:
    drivers_per_pref: int = 5
    trips_per_driver: int = 12
    test_per_driver: int = 3          # the last trips of each seen driver are test requests
    noise_sigma: float = 0.5          # per-driver log-normal edge-cost noise
    familiar_roads: int = 4
    familiar_factor: float = 0.2
    major_factor: float = 3.0
    scenic_factor: float = 0.25
    min_dist_m: float = 700.0
    heldout: str = HELDOUT


@dataclass
class Driver:
    id: int
    pref: str
    noise: np.ndarray
    familiar: list[str] = field(default_factory=list)


@dataclass
class Trip:
    driver: int
    pref: str
    origin: int
    dest: int
    edges: list[int]
    split: str          # "train" (in the index) or "test"
    text: str = ""


def hidden_cost(g: RoadGraph, d: Driver, cfg: TripConfig) -> np.ndarray:
    if d.pref == "shortest":
        c = g.length.copy()
    elif d.pref == "avoid_major":
        c = g.time * np.where(g.major, cfg.major_factor, 1.0)
    elif d.pref == "familiar":
        c = g.time * np.where(np.isin(g.name, d.familiar), cfg.familiar_factor, 1.0)
    elif d.pref == "scenic":
        c = g.length * np.where(g.scenic, cfg.scenic_factor, 1.0)
    else:
        c = g.time.copy()
    return c * d.noise


def request_text(g: RoadGraph, driver: int, pref: str, o: int, t: int) -> str:
    return f"driver {driver} wants to {PREFS[pref]}. from {g.describe_node(o)} to {g.describe_node(t)}"


def roads_of(g: RoadGraph, edges: list[int]) -> list[str]:
    """Road names in path order, consecutive repeats merged."""
    out: list[str] = []
    for e in edges:
        n = g.name[e]
        if n and (not out or out[-1] != n):
            out.append(n)
    return out


def trip_text(g: RoadGraph, t: Trip) -> str:
    roads = roads_of(g, t.edges)
    km = g.length[t.edges].sum() / 1000
    return f"{request_text(g, t.driver, t.pref, t.origin, t.dest)}. route: {', '.join(roads)} ({km:.1f} km)"


def make_drivers(g: RoadGraph, cfg: TripConfig, seed: int) -> list[Driver]:
    rng = np.random.default_rng(seed)
    out = []
    for pref in PREFS:
        for _ in range(cfg.drivers_per_pref):
            noise = rng.lognormal(0.0, cfg.noise_sigma, g.n_edges)
            fam = list(rng.choice(g.names, cfg.familiar_roads, replace=False)) if pref == "familiar" else []
            out.append(Driver(len(out), pref, noise, fam))
    return out


def generate(g: RoadGraph, cfg: TripConfig = TripConfig(), seed: int = 0) -> tuple[list[Driver], list[Trip]]:
    """Deterministic for a seed: drivers, then each driver's trips between random far-apart nodes."""
    drivers = make_drivers(g, cfg, seed)
    rng = np.random.default_rng(seed + 1)
    trips = []
    for d in drivers:
        cost = hidden_cost(g, d, cfg)
        for k in range(cfg.trips_per_driver):
            while True:
                o, t = (int(x) for x in rng.integers(0, g.n_nodes, 2))
                if g.dist_m(o, t) >= cfg.min_dist_m:
                    break
            split = "test" if d.pref == cfg.heldout or k >= cfg.trips_per_driver - cfg.test_per_driver else "train"
            tr = Trip(d.id, d.pref, o, t, g.route(o, t, cost), split)
            tr.text = trip_text(g, tr)
            trips.append(tr)
    return drivers, trips
