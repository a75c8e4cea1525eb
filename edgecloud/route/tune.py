"""Choosing the retrieval stage's knobs on a validation split carved from the training trips, never the test requests.

Seen drivers: each seen driver's last ``val_per_driver`` training trips become validation requests and the rest
form the index; the grid is over ``k`` (own past trips used, 0 = all), ``scope``, ``min_uses`` and ``discount``.
Requests without history (the held-out preference's situation): leave one seen preference out — that preference's
validation trips, driver id dropped, against an index of the other preferences' trips only — for ``k_open``.
The LLM's ``keep`` share is chosen on the same seen validation requests (one LLM ranking per request serves every
``keep``, since the ranking does not depend on it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from itertools import zip_longest

import numpy as np

from edgecloud.route.graph import RoadGraph
from edgecloud.route.metrics import prf
from edgecloud.route.recommend import RecConfig, Recommender, Request, TripIndex
from edgecloud.route.trips import PREFS, Trip


@dataclass(frozen=True)
class TuneConfig:
    val_per_driver: int = 2
    ks: tuple[int, ...] = (1, 3, 5, 0)
    discounts: tuple[float, ...] = (0.2, 0.3, 0.5)
    scopes: tuple[float, ...] = (0.0, 2.0)
    min_uses: tuple[int, ...] = (1, 2)
    k_opens: tuple[int, ...] = (0, 1, 3, 5)
    keeps: tuple[float, ...] = (0.5, 0.7, 0.85, 1.0)
    bases: tuple[str, ...] = ("time", "length")        # per-preference profile grid (tune_profiles)
    majors: tuple[float, ...] = (1.0, 2.0, 3.0, 4.0)
    profile_discounts: tuple[float, ...] = (0.2, 0.3, 0.5, 0.7, 1.0)
    keep_requests: int = 8        # LLM rankings for the keep choice (one per seen driver, in driver order)
    dense: bool = True            # MiniLM in the validation indexes too (False: BM25 only, for fast tests)


def split(trips: list[Trip], per_driver: int) -> tuple[list[Trip], list[Trip]]:
    """(index trips, validation trips) from the training trips: each driver's last ``per_driver`` are validation."""
    train = [t for t in trips if t.split == "train"]
    last: dict[int, list[Trip]] = {}
    for t in train:
        last.setdefault(t.driver, []).append(t)
    val = [t for ts in last.values() for t in ts[len(ts) - per_driver:]] if per_driver else []
    held = {id(t) for t in val}
    return [t for t in train if id(t) not in held], val


def request(t: Trip, with_driver: bool = True) -> Request:
    return Request(t.origin, t.dest, PREFS[t.pref], t.driver if with_driver else None)


def _f1(g: RoadGraph, rec: Recommender, anchors: list[int], t: Trip, cache: dict) -> float:
    key = (t.origin, t.dest, frozenset(anchors), rec.profile(PREFS[t.pref]))
    if key not in cache:
        cache[key] = prf(rec.connect(t.origin, t.dest, anchors, PREFS[t.pref]), t.edges)[2]
    return cache[key]


def tune_retrieval(g: RoadGraph, trips: list[Trip], cfg: TuneConfig = TuneConfig(),
                   base: RecConfig = RecConfig()) -> tuple[RecConfig, dict]:
    """Grid search of the graph-only retrieval stage on validation requests; returns the best config and a report."""
    base = replace(base, profiles=())  # the grid tunes the shared knobs; profiles come last, on top of them
    index_trips, val = split(trips, cfg.val_per_driver)
    if not val:
        return base, {"seen": [], "open": [], "profiles": [], "val_requests": 0}
    idx = TripIndex(index_trips, dense=cfg.dense)
    cache: dict = {}
    retrieved = {k: [idx.top(request(t).query(g), k or len(index_trips), t.driver) for t in val] for k in cfg.ks}
    seen = []
    for k in cfg.ks:
        for scope in cfg.scopes:
            for mu in cfg.min_uses:
                probe = Recommender(g, idx, None, replace(base, scope=scope, min_uses=mu))
                anchors = [probe.anchor_edges(t.origin, t.dest, ctx) for t, ctx in zip(val, retrieved[k])]
                for d in cfg.discounts:
                    rec = Recommender(g, idx, None, replace(probe.cfg, k=k, discount=d))
                    f = float(np.mean([_f1(g, rec, a, t, cache) for a, t in zip(anchors, val)]))
                    seen.append({"k": k, "scope": scope, "min_uses": mu, "discount": d, "f1": f, "n": len(val)})
    best = max(seen, key=lambda r: r["f1"])  # first of the ties, in grid order
    chosen = replace(base, k=best["k"], scope=best["scope"], min_uses=best["min_uses"], discount=best["discount"])
    # requests without history: leave one seen preference out of the index
    opened = []
    folds = [(p, [t for t in val if t.pref == p], [t for t in index_trips if t.pref != p])
             for p in dict.fromkeys(t.pref for t in val)]
    folds = [(p, v, TripIndex(ix, dense=cfg.dense)) for p, v, ix in folds]
    for ko in cfg.k_opens:
        rec = Recommender(g, None, None, replace(chosen, k_open=ko))
        fs = []
        for _, v, ix in folds:
            for t in v:
                ctx = ix.top(request(t, False).query(g), ko) if ko else []
                fs.append(_f1(g, rec, rec.anchor_edges(t.origin, t.dest, ctx), t, cache))
        opened.append({"k_open": ko, "f1": float(np.mean(fs)), "n": len(fs)})
    chosen = replace(chosen, k_open=max(opened, key=lambda r: r["f1"])["k_open"])
    chosen, profiles = tune_profiles(g, TripIndex(index_trips + val, dense=cfg.dense), chosen, cfg, cache)
    return chosen, {"seen": seen, "open": opened, "profiles": profiles, "val_requests": len(val),
                    "index_trips": len(index_trips), "chosen": asdict(chosen)}


def tune_profiles(g: RoadGraph, idx: TripIndex, chosen: RecConfig, cfg: TuneConfig,
                  cache: dict) -> tuple[RecConfig, list[dict]]:
    """Per preference words seen in training: the base cost (travel time or length), a factor on major roads and the
    anchor discount that maximise F1 with the chosen retrieval stage's anchors, leave-one-out over every training
    trip (each against the driver's other training trips: ~45 requests per preference, where the 2-per-driver split
    has 10). The default (time, 1, the chosen discount) is tried first and kept unless another is strictly better."""
    rows, profiles = [], []
    probe = Recommender(g, idx, None, chosen)
    for p in dict.fromkeys(t.pref for t in idx.trips):
        v = [t for t in idx.trips if t.pref == p]
        k = chosen.k or len(idx.trips)
        ctx = [[x for x in idx.top(request(t).query(g), k + 1, t.driver) if x is not t][:k] for t in v]
        anchors = [probe.anchor_edges(t.origin, t.dest, c) for t, c in zip(v, ctx)]
        grid = [("time", 1.0, chosen.discount)] + [(b, m, d) for b in cfg.bases for m in cfg.majors
                                                   for d in cfg.profile_discounts]
        scored = []
        for b, m, d in grid:
            rec = Recommender(g, idx, None, replace(chosen, profiles=((PREFS[p], b, m, d),)))
            scored.append((float(np.mean([_f1(g, rec, a, t, cache) for a, t in zip(anchors, v)])), (b, m, d)))
        best = max(scored, key=lambda s: s[0])  # first of the ties: the default
        profiles.append((PREFS[p], *best[1]))
        rows.append({"pref": p, "base": best[1][0], "major": best[1][1], "discount": best[1][2], "f1": best[0],
                     "f1_default": scored[0][0], "n": len(v)})
    return replace(chosen, profiles=tuple(profiles)), rows


def tune_keep(g: RoadGraph, trips: list[Trip], rec_cfg: RecConfig, engine, cfg: TuneConfig = TuneConfig(),
              progress=None) -> tuple[RecConfig, dict]:
    """The LLM's ``keep`` share on seen validation requests (one per driver, round-robin over the preferences, up to
    ``keep_requests``)."""
    index_trips, val = split(trips, cfg.val_per_driver)
    first: dict[int, Trip] = {}
    for t in val:
        first.setdefault(t.driver, t)
    by_pref: dict[str, list[Trip]] = {}
    for t in first.values():
        by_pref.setdefault(t.pref, []).append(t)
    reqs = [t for grp in zip_longest(*by_pref.values()) for t in grp if t][: cfg.keep_requests]
    rec = Recommender(g, TripIndex(index_trips, dense=cfg.dense), engine, rec_cfg)
    f1s: dict[float, list[float]] = {k: [] for k in cfg.keeps}
    cache: dict = {}
    for n, t in enumerate(reqs):
        req = request(t)
        ctx = rec.retrieve(req)
        anchors = rec.anchor_edges(t.origin, t.dest, ctx)
        roads = list(dict.fromkeys(g.name[e] for e in anchors if g.name[e]))
        ranked = rec.rank_anchor_roads(req, ctx, anchors, roads) if roads else []
        for keep in cfg.keeps:
            kept = rec.filter_anchors(anchors, ranked[: rec.kept(len(roads), keep)]) if roads else anchors
            f1s[keep].append(_f1(g, rec, kept, t, cache))
        if progress:
            progress(n + 1, len(reqs))
    rows = [{"keep": k, "f1": float(np.mean(v)) if v else None, "n": len(v)} for k, v in f1s.items()]
    llm_rows = [r for r in rows if r["keep"] < 1 and r["f1"] is not None]  # keep = 1 is the no-LLM row
    best = max(llm_rows, key=lambda r: r["f1"])["keep"] if llm_rows else rec_cfg.keep
    return replace(rec_cfg, keep=best), {"keep": rows, "chosen_keep": best}
