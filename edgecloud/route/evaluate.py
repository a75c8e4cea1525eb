"""One benchmark run: every method on the held-out test requests, per preference, with correct metrics."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from edgecloud.route.graph import RoadGraph, load_helsinki
from edgecloud.route.metrics import length_jaccard, prf
from edgecloud.route.oracle import ORACLES, OracleConfig, gap_closed, oracle_f1
from edgecloud.route.recommend import METHODS, Answer, RecConfig, Recommender, Request, TripIndex
from edgecloud.route.trips import HELDOUT, PREFS, Trip, TripConfig, generate, make_drivers, roads_of

ALL = METHODS + ["names_v1"]
LLM = ["llm_no_context", "pathgpt", "names_v1"]
CHEAP = [m for m in ALL if m not in LLM]


@dataclass(frozen=True)
class BenchConfig:
    quick: bool = False
    requests_per_pref: int = 0    # 0: all test trips (quick: 2 per preference)
    model: str = "smollm2-135m"
    llm_per_pref: int = 0         # LLM rows on this many requests per preference (0: the same as the graph rows)
    llm_minutes: float = 0.0      # stop starting LLM requests after this long (0: no cap); n is reported per row
    v1_requests: int = 5          # names_v1 (never a valid path; only its validity matters) on this many requests
    boot: int = 2000              # paired-bootstrap resamples for the confidence intervals
    probe: bool = True            # run the preference probe (the measured cause of the LLM's weakness)
    oracle: OracleConfig = OracleConfig()


def request_of(t: Trip) -> Request:
    """The held-out preference's drivers have no history: their requests carry preference words only."""
    return Request(t.origin, t.dest, PREFS[t.pref], None if t.pref == HELDOUT else t.driver)


def round_robin(tests: list[Trip]) -> list[int]:
    """Indices of ``tests`` interleaved over preferences: the first of each, then the second of each, ..."""
    per: dict[str, list[int]] = {}
    for i, t in enumerate(tests):
        per.setdefault(t.pref, []).append(i)
    return sorted(range(len(tests)), key=lambda i: (per[tests[i].pref].index(i), list(PREFS).index(tests[i].pref)))


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


def paired_ci(a, b, boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Mean of the per-request difference a - b with a paired-bootstrap percentile interval (requests resampled
    with replacement, the same draw for both methods, so request difficulty cancels)."""
    d = np.asarray(a, float) - np.asarray(b, float)
    if not len(d):
        return {"diff": None, "lo": None, "hi": None, "n": 0}
    idx = np.random.default_rng(seed).integers(0, len(d), (boot, len(d)))
    means = d[idx].mean(1)
    q = (1 - level) / 2
    return {"diff": float(d.mean()), "lo": float(np.quantile(means, q)), "hi": float(np.quantile(means, 1 - q)),
            "n": int(len(d))}


DIJKSTRA = ("dijkstra_fastest", "dijkstra_shortest")
GOALS = {"llm_no_context": 0.20, "dijkstra": 0.05}   # the goals, in edge-F1 points


def part_of(r: dict, part: str) -> bool:
    return part == "all" or r["pref"] == part or (part == "seen" and r["pref"] != HELDOUT)


def comparisons(rows: dict, boot: int, seed: int, subject: str = "pathgpt",
                bases: tuple[str, ...] = ("llm_no_context", "retrieval_anchors", "retrieval_only")) -> dict:
    """``subject`` against the goal baselines (+20 over no context, +5 over the better Dijkstra on the same requests)
    and the ablations (PathGPT vs the same retrieval stage without the LLM: the LLM's own contribution), paired on
    the requests both answered, on all requests, the seen preferences and the held-out preference."""
    out = {}
    for part in ("all", "seen", HELDOUT):
        f = {m: {r["i"]: r["f1"] for r in v if part_of(r, part)} for m, v in rows.items()}
        on = set(f[subject])
        if not on:
            continue
        best = max(DIJKSTRA, key=lambda m: np.mean([f[m][i] for i in on if i in f[m]] or [0.0]))
        for base in (*bases, best):
            if base == subject or not f.get(base):
                continue
            goal = GOALS.get("dijkstra" if base in DIJKSTRA else base)
            both = sorted(on & set(f[base]))
            c = paired_ci([f[subject][i] for i in both], [f[base][i] for i in both], boot, seed)
            out[f"{part}: {subject} - {base}"] = {**c, "goal": goal, "met": None if goal is None or c["diff"] is None
                                                  else bool(c["diff"] >= goal)}
    return out


def ceiling(rows: dict, oracle: dict, boot: int, seed: int) -> dict:
    """The oracles per preference and overall (bootstrap CIs), whether each goal is attainable at all (oracle -
    baseline, paired CIs) and the share of the attainable gap (oracle - better Dijkstra) each method closes."""
    if not oracle:
        return {}
    f = {m: {r["i"]: r["f1"] for r in v} for m, v in {**rows, **oracle}.items()}
    pref_of = {r["i"]: r["pref"] for r in oracle[ORACLES[0]]}
    table, goals, closed = [], {}, {}
    for part in [*PREFS, "all", "seen"]:
        on = sorted(i for i, p in pref_of.items() if part_of({"pref": p}, part))
        if not on:
            continue
        row = {"pref": part + (" (held out)" if part == HELDOUT else ""), "n": len(on)}
        for m in ORACLES:
            c = paired_ci([f[m][i] for i in on], np.zeros(len(on)), boot, seed)
            row |= {m: c["diff"], f"{m}_lo": c["lo"], f"{m}_hi": c["hi"]}
        for m in (*DIJKSTRA, "retrieval_anchors", "pathgpt", "llm_no_context"):
            got = [f[m][i] for i in on if i in f[m]]
            row[m] = float(np.mean(got)) if got else None
        table.append(row)
        sub = {m: {i: v[i] for i in on if i in v} for m, v in f.items()}
        best = max(DIJKSTRA, key=lambda m: np.mean(list(sub[m].values())))
        for top in ("oracle_preference", "oracle_vote"):
            for base, goal in (("llm_no_context", GOALS["llm_no_context"]), (best, GOALS["dijkstra"])):
                both = sorted(set(sub[top]) & set(sub[base]))
                if both:
                    c = paired_ci([sub[top][i] for i in both], [sub[base][i] for i in both], boot, seed)
                    goals[f"{part}: {top} - {base}"] = {**c, "goal": goal, "attainable": c["diff"] >= goal}
            if part in ("all", "seen", HELDOUT):
                closed[f"{part} vs {top}"] = gap_closed({m: sub[m] for m in (*rows, top)}, top, DIJKSTRA)
    return {"table": table, "goals": goals, "gap_closed": closed}


def build(cfg: BenchConfig, seed: int = 0, engine=None,
          rec_cfg: RecConfig = RecConfig()) -> tuple[RoadGraph, list[Trip], Recommender]:
    """The graph, the seed's trips and a recommender over the training trips (shared by the bench's map)."""
    from edgecloud.llm.engine import Engine
    from edgecloud.llm.models import load_model

    g = load_helsinki()
    _, trips = generate(g, TripConfig(), seed)
    index = TripIndex([t for t in trips if t.split == "train"])
    return g, trips, Recommender(g, index, engine or Engine(load_model(cfg.model)), rec_cfg)


def run(cfg: BenchConfig, seed: int = 0, engine=None, progress=None, built=None) -> dict:

    g, trips, rec = built or build(cfg, seed, engine)
    index = rec.index
    tests = pick_tests(trips, cfg.requests_per_pref or (2 if cfg.quick else 0))
    rows = {m: [] for m in ALL}
    for i, t in enumerate(tests):  # the graph-only rows: every request, cheap
        # PathGPT with no anchor road to rank (no history, k_open = 0) asks no LLM: it is graph-only there too
        for m in CHEAP + ([] if rec.needs_llm(request_of(t)) else ["pathgpt"]):
            rows[m].append({"i": i, "pref": t.pref, **score(g, rec.run(m, request_of(t)), t)})
    answered = {r["i"] for r in rows["pathgpt"]}
    # the oracles: what knowing the hidden preference model (not the driver's noise) would score
    drivers, orng, oracle = make_drivers(g, TripConfig(), seed), np.random.default_rng([seed, 17]), {}
    for i, t in enumerate(tests):
        for m, f in oracle_f1(g, t, drivers[t.driver], TripConfig(), orng, cfg.oracle).items():
            oracle.setdefault(m, []).append({"i": i, "pref": t.pref, "f1": f})
    # the LLM rows: requests taken round-robin over the preferences, so a time-capped run stays balanced
    llm = [i for i in round_robin(tests) if cfg.llm_per_pref == 0 or
           sum(tests[j].pref == tests[i].pref for j in range(i)) < cfg.llm_per_pref]
    deadline = time.monotonic() + 60 * cfg.llm_minutes if cfg.llm_minutes else float("inf")
    for n, i in enumerate(llm):
        if time.monotonic() > deadline:
            break
        t = tests[i]
        for m in LLM:
            if (m != "names_v1" or len(rows[m]) < cfg.v1_requests) and not (m == "pathgpt" and i in answered):
                rows[m].append({"i": i, "pref": t.pref, **score(g, rec.run(m, request_of(t)), t)})
        if progress:
            progress(n + 1, len(llm))
    table = []
    keys = ["precision", "recall", "f1", "name_f1", "len_jaccard", "valid", "latency_s"]
    for m in ALL:
        for p in [*PREFS, "all", "seen"]:
            rs = [r for r in rows[m] if part_of(r, p)]
            if rs:
                table.append({"method": m, "pref": p + (" (held out)" if p == HELDOUT else ""), "n": len(rs),
                              **{k: float(np.mean([r[k] for r in rs])) for k in keys},
                              "unknown_names": int(sum(r["unknown"] for r in rs))})
    f1 = {m: float(np.mean([r["f1"] for r in rows[m]])) if rows[m] else None for m in ALL}
    paired = {m: v for m, v in rows.items() if m != "names_v1"}
    on_llm = {r["i"] for r in rows["pathgpt"]}
    held = [r["f1"] for r in rows["pathgpt"] if r["pref"] == HELDOUT]
    return {
        "f1_dijkstra_fastest": f1["dijkstra_fastest"], "f1_dijkstra_shortest": f1["dijkstra_shortest"],
        "f1_llm_no_context": f1["llm_no_context"], "f1_retrieval_only": f1["retrieval_only"],
        "f1_pathgpt": f1["pathgpt"], "f1_retrieval_anchors": f1["retrieval_anchors"],
        "f1_heldout_preference": float(np.mean(held)) if held else None,
        "validity_rate": float(np.mean([r["valid"] for r in rows["pathgpt"]])) if rows["pathgpt"] else None,
        "names_v1_not_a_path": float(1 - np.mean([r["valid"] for r in rows["names_v1"]])) if rows["names_v1"] else None,
        "requests": len(tests), "llm_requests": len(rows["pathgpt"]), "names_v1_requests": len(rows["names_v1"]),
        "paired_bootstrap_95ci": {**comparisons(paired, cfg.boot, seed),
                                  **comparisons(paired, cfg.boot, seed, "retrieval_anchors", ("retrieval_only",))},
        "f1_on_llm_requests": {m: float(np.mean([r["f1"] for r in rows[m] if r["i"] in on_llm])) if on_llm else None
                               for m in ALL if m != "names_v1"},
        **{f"f1_{m}": float(np.mean([r["f1"] for r in oracle[m]])) if tests else None for m in ORACLES},
        "ceiling": ceiling(paired, oracle, cfg.boot, seed),
        "rec_config": asdict(rec.cfg), "heldout_preference": HELDOUT, "graph": {"nodes": g.n_nodes, "edges": g.n_edges,
                                                                          "named_roads": len(g.names)},
        "llm_preference_probe": preference_probe(rec) if cfg.probe else None,
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
