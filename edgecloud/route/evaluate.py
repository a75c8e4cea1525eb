"""One benchmark run: every method on the held-out test requests, per preference, with correct metrics."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from edgecloud.route.graph import RoadGraph, load_helsinki
from edgecloud.route.metrics import length_jaccard, prf
from edgecloud.route.recommend import METHODS, Answer, RecConfig, Recommender, Request, TripIndex
from edgecloud.route.trips import HELDOUT, PREFS, Trip, TripConfig, generate, roads_of

ALL = METHODS + ["names_v1"]


@dataclass(frozen=True)
class BenchConfig:
    quick: bool = False
    requests_per_pref: int = 0    # 0: all test trips (quick: 2 per preference)
    model: str = "smollm2-135m"


def request_of(t: Trip) -> Request:
    """The held-out preference's drivers have no history: their requests carry preference words only."""
    return Request(t.origin, t.dest, PREFS[t.pref], None if t.pref == HELDOUT else t.driver)


def pick_tests(trips: list[Trip], per_pref: int) -> list[Trip]:
    out = []
    for p in PREFS:
        ts = [t for t in trips if t.split == "test" and t.pref == p]
        if per_pref:
            ts = ts[:: max(1, len(ts) // per_pref)][:per_pref]
        out += ts
    return out


def score(g: RoadGraph, a: Answer, t: Trip) -> dict:
    p, r, f = prf(a.edges, t.edges)
    _, _, nf = prf(roads_of(g, a.edges) if a.valid else a.roads, roads_of(g, t.edges))
    return {"precision": p, "recall": r, "f1": f, "name_f1": nf,
            "len_jaccard": length_jaccard(a.edges, t.edges, g.length),
            "valid": float(a.valid and (not a.is_route or g.is_path(a.edges, t.origin, t.dest))),
            "latency_s": a.latency_s, "unknown": a.unknown}


PROFILE_SYSTEM = "You choose a routing profile for a driving request."


def preference_probe(rec: Recommender) -> dict:
    """Can the LLM tell the preferences apart at all? For each preference's words, its constrained choice among the
    five preference descriptions (the same scoring PathGPT uses for roads), and the same with a neutral request as a
    control. A model that answers the same whatever the request cannot steer a route by preference words."""
    labels = list(PREFS)
    descs = [PREFS[p] for p in labels]
    menu = "; ".join(descs)

    def choice(words: str) -> str:
        prompt = rec.engine.chat_prompt(PROFILE_SYSTEM, f"Request: the driver wants to {words}.\n"
                                                        f"Which routing profile fits: {menu}?") + "Profile:"
        ranked, _ = rec.llm_choose(prompt, descs)
        return labels[descs.index(ranked[0])]

    picks = {p: choice(PREFS[p]) for p in labels}
    return {"accuracy": float(np.mean([picks[p] == p for p in labels])), "picks": picks,
            "distinct_answers": len(set(picks.values())), "neutral_request": choice("drive somewhere"),
            "chance": 1 / len(labels)}


def run(cfg: BenchConfig, seed: int = 0, engine=None, progress=None) -> dict:
    from edgecloud.llm.engine import Engine
    from edgecloud.llm.models import load_model

    g = load_helsinki()
    _, trips = generate(g, TripConfig(), seed)
    index = TripIndex([t for t in trips if t.split == "train"])
    engine = engine or Engine(load_model(cfg.model))
    rec = Recommender(g, index, engine, RecConfig())
    tests = pick_tests(trips, cfg.requests_per_pref or (2 if cfg.quick else 0))
    rows = {m: [] for m in ALL}
    for i, t in enumerate(tests):
        req = request_of(t)
        for m in ALL:
            rows[m].append({"pref": t.pref, **score(g, rec.run(m, req), t)})
        if progress:
            progress(i + 1, len(tests))
    table = []
    keys = ["precision", "recall", "f1", "name_f1", "len_jaccard", "valid", "latency_s"]
    for m in ALL:
        for p in [*PREFS, "all", "seen"]:
            rs = [r for r in rows[m] if p == "all" or r["pref"] == p or (p == "seen" and r["pref"] != HELDOUT)]
            if rs:
                table.append({"method": m, "pref": p + (" (held out)" if p == HELDOUT else ""), "n": len(rs),
                              **{k: float(np.mean([r[k] for r in rs])) for k in keys},
                              "unknown_names": int(sum(r["unknown"] for r in rs))})
    f1 = {m: float(np.mean([r["f1"] for r in rows[m]])) for m in ALL}
    held = [r["f1"] for r in rows["pathgpt"] if r["pref"] == HELDOUT]
    return {
        "f1_dijkstra_fastest": f1["dijkstra_fastest"], "f1_dijkstra_shortest": f1["dijkstra_shortest"],
        "f1_llm_no_context": f1["llm_no_context"], "f1_retrieval_only": f1["retrieval_only"],
        "f1_pathgpt": f1["pathgpt"], "f1_heldout_preference": float(np.mean(held)) if held else None,
        "validity_rate": float(np.mean([r["valid"] for r in rows["pathgpt"]])),
        "names_v1_not_a_path": float(1 - np.mean([r["valid"] for r in rows["names_v1"]])),
        "requests": len(tests), "heldout_preference": HELDOUT, "graph": {"nodes": g.n_nodes, "edges": g.n_edges,
                                                                          "named_roads": len(g.names)},
        "llm_preference_probe": preference_probe(rec),
        "train_trips": len(index.trips), "table": table, "model": cfg.model, "lora": False,
        "example": {"origin": int(tests[0].origin), "dest": int(tests[0].dest), "pref": tests[0].pref}
        if tests else None,
    }


def map_figure(g: RoadGraph, paths: dict[str, list[int]], truth: list[int], title: str):
    """One request, one panel per method: the graph in grey, ground truth in black, the method's path in colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(paths)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.4), squeeze=False)
    for ax, (m, edges) in zip(axes[0], paths.items()):
        ax.plot(np.stack([g.lon[g.u], g.lon[g.v]]), np.stack([g.lat[g.u], g.lat[g.v]]), color="0.85", lw=0.5)
        for es, c, w in ((truth, "k", 3.5), (edges, "tab:red", 1.6)):
            if es:
                ax.plot(np.stack([g.lon[g.u[es]], g.lon[g.v[es]]]), np.stack([g.lat[g.u[es]], g.lat[g.v[es]]]),
                        color=c, lw=w)
        ax.set_title(m, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def timed(fn, *a, **k):
    t0 = time.perf_counter()
    out = fn(*a, **k)
    return out, time.perf_counter() - t0
