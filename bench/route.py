"""PathGPT route recommendation benchmark: every method on held-out requests -> docs/results/route.{json,md,png}.

    PYTHONPATH=. EDGECLOUD_THREADS=1 python bench/route.py [--per-pref N] [--llm-per-pref N] [--llm-minutes M]
        [--keep-requests N] [--no-probe] [--seed S] [--out docs/results]

First the retrieval stage's knobs are chosen on a validation split of the training trips (graph only), then the
LLM's keep share on ``--keep-requests`` validation requests; then every method runs on the test requests: the
graph-only rows on all of them, the LLM rows on a round-robin subset (``--llm-per-pref``, and no new request after
``--llm-minutes``), with paired-bootstrap intervals over the requests both methods answered.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import asdict

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    from edgecloud.llm.engine import Engine
    from edgecloud.llm.models import load_model
    from edgecloud.results import Result, check_out_dir
    from edgecloud.route.evaluate import ALL, BenchConfig, build, map_figure, request_of, run, timed
    from edgecloud.route.graph import load_helsinki
    from edgecloud.route.trips import TripConfig, generate
    from edgecloud.route.tune import TuneConfig, tune_keep, tune_retrieval

    ap = argparse.ArgumentParser()
    ap.add_argument("--per-pref", type=int, default=4)
    ap.add_argument("--llm-per-pref", type=int, default=0)
    ap.add_argument("--llm-minutes", type=float, default=0.0)
    ap.add_argument("--keep-requests", type=int, default=8)
    ap.add_argument("--no-probe", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="docs/results")
    a = ap.parse_args()
    out = check_out_dir(a.out)
    t0 = time.time()
    engine = Engine(load_model("smollm2-135m"))
    cfg = BenchConfig(requests_per_pref=a.per_pref, llm_per_pref=a.llm_per_pref, llm_minutes=a.llm_minutes,
                      probe=not a.no_probe)
    # choose the knobs on the validation split of the training trips (never the test requests)
    g = load_helsinki()
    _, trips = generate(g, TripConfig(), a.seed)
    tcfg = TuneConfig(keep_requests=a.keep_requests)
    (rec_cfg, tuning), tune_s = timed(tune_retrieval, g, trips, tcfg)
    print("retrieval stage chosen on validation:", rec_cfg, f"({tune_s:.0f} s)", flush=True)
    if a.keep_requests:
        rec_cfg, keep_report = tune_keep(g, trips, rec_cfg, engine, tcfg,
                                         progress=lambda i, n: print(f"keep: validation request {i}/{n}", flush=True))
        tuning.update(keep_report)
        print("keep chosen on validation:", rec_cfg.keep, keep_report["keep"], flush=True)
    g, trips, rec = build(cfg, a.seed, engine, rec_cfg)
    d = run(cfg, a.seed, progress=lambda i, n: print(f"LLM request {i}/{n}", flush=True), built=(g, trips, rec))
    d["validation"] = {"config": asdict(tcfg), "tune_s": tune_s, **tuning}
    # the real-data path: tracklib's real GPX track map-matched onto its real IGN network (ground-truth-free quality)
    from edgecloud.route.mapmatch import MapMatcher, read_gpx
    from edgecloud.route.realtraces import load_wkt_network, match_quality, tracklib_files

    files = tracklib_files()
    net = load_wkt_network(files["network_22245.csv"])
    pts = read_gpx(files["utgtrack-22245.gpx"])
    mm = MapMatcher(net)
    (path, match_s) = timed(mm.match, pts)
    d["real_trace"] = {"source": "tracklib 0.8.4.2 utgtrack-22245.gpx on network_22245.csv (IGN BD TOPO)",
                       "network_nodes": net.n_nodes, "network_edges": net.n_edges, "match_s": match_s,
                       **match_quality(net, pts, path, mm)}
    r = Result("route", d, seed=a.seed, title="PathGPT route recommendation (Helsinki OSM)", started=t0)
    r.table(d["table"], ["method", "pref", "n", "precision", "recall", "f1", "name_f1", "len_jaccard", "valid",
                         "latency_s", "unknown_names"])
    r.markdown += "\nPaired bootstrap 95% intervals of the edge-F1 difference (points x 100 = percentage points):\n"
    r.table([{"comparison": k, **v} for k, v in d["paired_bootstrap_95ci"].items()],
            ["comparison", "n", "diff", "lo", "hi", "goal", "met"])
    c = d["ceiling"]
    if c:
        r.markdown += ("\nThe ceiling: oracles that know each test trip's hidden preference model (not the driver's "
                       "noise), edge F1 with bootstrap 95% intervals, beside the methods:\n")
        ci = lambda x: f"[{x['oracle_preference_lo']:.3f}, {x['oracle_preference_hi']:.3f}]"  # noqa: E731
        r.table([{k: x[k] for k in x if not k.endswith(("_lo", "_hi"))} | {"oracle_pref_ci": ci(x)}
                 for x in c["table"]],
            ["pref", "n", "oracle_preference", "oracle_pref_ci", "oracle_vote", "oracle_fresh_noise", "noise_floor",
             "dijkstra_fastest", "dijkstra_shortest", "retrieval_anchors", "pathgpt", "llm_no_context"])
        r.markdown += "\nIs each goal attainable at all? Oracle minus baseline, paired bootstrap 95% intervals:\n"
        r.table([{"comparison": k, **x} for k, x in c["goals"].items()],
                ["comparison", "n", "diff", "lo", "hi", "goal", "attainable"])
        r.markdown += ("\nShare of the attainable gap closed: (method - better Dijkstra) / (oracle - better Dijkstra),"
                       " means on the requests each method answered:\n")
        r.table([{"part": p, "method": m, **x} for p, ms in c["gap_closed"].items() for m, x in ms.items()],
                ["part", "method", "n", "f1", "base", "ceiling", "closed"])
    v = d["validation"]
    r.markdown += (f"\nValidation (training trips only: {v['val_requests']} seen-driver requests against "
                   f"{v['index_trips']} index trips), best 8 of {len(v['seen'])} retrieval settings:\n")
    r.table(sorted(v["seen"], key=lambda x: -x["f1"])[:8], ["k", "scope", "min_uses", "discount", "f1", "n"])
    r.markdown += "\nRequests without history (leave one seen preference out of the index):\n"
    r.table(v["open"], ["k_open", "f1", "n"])
    r.markdown += "\nPer-preference cost profiles (preference words seen in training only):\n"
    r.table(v["profiles"], ["pref", "base", "major", "discount", "f1", "f1_default", "n"])
    if "keep" in v:
        r.markdown += "\nThe LLM's keep share (keep = 1: no LLM filtering):\n"
        r.table(v["keep"], ["keep", "f1", "n"])
    # one request, every method, on the map
    t = next(t for t in trips if t.split == "test" and t.pref == "avoid_major")
    paths = {m: rec.run(m, request_of(t)).edges for m in ALL if m != "names_v1"}  # v1 is not a route
    r.figure = map_figure(g, paths, t.edges, "one 'avoid_major' request: ground truth black, method red "
                                              "(© OpenStreetMap contributors, ODbL)")
    paths_written = r.write(out)
    print({k: v for k, v in d.items() if k.startswith("f1") or k in ("validity_rate", "names_v1_not_a_path",
                                                                        "paired_bootstrap_95ci", "real_trace")})
    print(paths_written)


if __name__ == "__main__":
    main()
