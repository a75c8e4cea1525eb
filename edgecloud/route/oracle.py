"""How far can any method go on this data? Oracles that know what no method is told, scored like the methods.

A test trip is the min-cost path under its driver's hidden cost = preference cost x the driver's fixed log-normal
edge noise (``trips.hidden_cost``). Three references, each scored against the ground-truth trip with the same F1:

* ``oracle_preference``: knows the trip's hidden preference model and the driver's deterministic parameters (the
  familiar roads) but not the noise: Dijkstra under the noise-free preference cost. The best a method that identifies
  the preference perfectly, but learns nothing about this driver's noise, can be expected to do.
* ``oracle_fresh_noise``: the same cost times a fresh noise draw (a look-alike driver of the same preference), mean
  over ``draws`` draws.
* ``oracle_vote``: knows the preference model and the noise distribution: the edges that at least half of ``draws``
  fresh-noise routes use, discounted by ``vote_discount`` on the noise-free cost (beats the noise-free path where the
  noise systematically shifts routes, e.g. towards paths of fewer, longer edges).
* ``noise_floor``: F1 between two independent fresh draws of the same driver's preference on the same request (mean
  over ``draws`` pairs): how much two same-preference drivers agree.

The driver's own noise is fixed across their trips, so a method that learns it from the driver's history can beat
``oracle_preference`` (an oracle knowing the noise reproduces every trip: F1 = 1 by construction, a test checks it).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from edgecloud.route.graph import RoadGraph
from edgecloud.route.metrics import prf
from edgecloud.route.trips import Driver, Trip, TripConfig, hidden_cost

ORACLES = ["oracle_preference", "oracle_vote", "oracle_fresh_noise", "noise_floor"]


@dataclass(frozen=True)
class OracleConfig:
    draws: int = 8        # fresh noise draws (and draw pairs for the noise floor) per request
    vote_discount: float = 0.5


def noise_free(d: Driver) -> Driver:
    return replace(d, noise=np.ones_like(d.noise))


def fresh(d: Driver, cfg: TripConfig, rng: np.random.Generator) -> Driver:
    return replace(d, noise=rng.lognormal(0.0, cfg.noise_sigma, len(d.noise)))


def oracle_f1(g: RoadGraph, t: Trip, d: Driver, tcfg: TripConfig, rng: np.random.Generator,
              ocfg: OracleConfig = OracleConfig()) -> dict[str, float]:
    """The three references' edge F1 for one test trip ``t`` of driver ``d``."""
    route = lambda dr: g.route(t.origin, t.dest, hidden_cost(g, dr, tcfg))  # noqa: E731
    pref = prf(route(noise_free(d)), t.edges)[2]
    draws = [route(fresh(d, tcfg, rng)) for _ in range(2 * ocfg.draws)]
    uses = np.bincount(np.concatenate([np.unique(p) for p in draws[: ocfg.draws]]).astype(int), minlength=g.n_edges)
    w = hidden_cost(g, noise_free(d), tcfg)
    w[uses * 2 >= ocfg.draws] *= ocfg.vote_discount
    return {"oracle_preference": pref, "oracle_vote": prf(g.route(t.origin, t.dest, w), t.edges)[2],
            "oracle_fresh_noise": float(np.mean([prf(p, t.edges)[2] for p in draws[: ocfg.draws]])),
            "noise_floor": float(np.mean([prf(a, b)[2] for a, b in zip(draws[::2], draws[1::2])]))}


def gap_closed(f1: dict[str, dict[int, float]], ceiling: str, floor_methods: tuple[str, ...]) -> dict:
    """Share of the attainable gap (ceiling - the better of ``floor_methods``) each method closes, on the requests it
    answered: (method - base) / (ceiling - base), all three means over the same requests."""
    out = {}
    for m, fm in f1.items():
        if m == ceiling or not fm:
            continue
        on = [i for i in fm if all(i in f1[b] for b in (ceiling, *floor_methods))]
        if not on:
            continue
        base = max(float(np.mean([f1[b][i] for i in on])) for b in floor_methods)
        top = float(np.mean([f1[ceiling][i] for i in on]))
        mine = float(np.mean([fm[i] for i in on]))
        out[m] = {"n": len(on), "f1": mine, "base": base, "ceiling": top,
                  "closed": (mine - base) / (top - base) if top - base > 1e-9 else None}
    return out
