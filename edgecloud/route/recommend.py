"""The recommender (PathGPT, anchor version) and its baselines. Every method but ``names_v1`` returns a valid path.

PathGPT: the retrieval stage takes a known driver's own past trips (the top ``k`` = 5 of their history by the fused
BM25 + MiniLM rank; per-user history is the strongest signal found) and anchors on the segments at least
``min_uses`` = 2 of them share; a request with no history takes the top-``k_open`` trips of everyone (0 by the
validation: none, so Dijkstra over travel time). The prompt shows those trips (each by its anchor roads) with the
origin, destination and preference words, and the LLM ranks the anchor roads by constrained choice: each candidate's
mean token log-probability as the answer's continuation. The ``keep`` best-ranked share of the roads stay anchors;
Dijkstra over travel time with the anchors discounted connects origin and destination, so the answer is always a
path. ``retrieval_anchors`` is the same stage with every anchor kept: the LLM's contribution is the difference
between the two rows. The retrieval knobs are chosen on a validation split of the training trips (``tune.py``).
``names_v1`` is the public v1 style: free-text road names, checked (not repaired) for forming a path.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from edgecloud.errors import UserError
from edgecloud.route.graph import RoadGraph
from edgecloud.route.trips import PREFS, Trip, roads_of

METHODS = ["dijkstra_fastest", "dijkstra_shortest", "dijkstra_profile", "retrieval_only", "retrieval_anchors",
           "llm_no_context", "pathgpt"]
SYSTEM = "You recommend driving routes in central Helsinki. Answer with road names separated by commas."


@dataclass(frozen=True)
class RecConfig:
    """Retrieval-stage knobs (``k``, ``k_open``, ``scope``, ``min_uses``, ``discount``) are chosen on a validation
    split of the training trips (``edgecloud.route.tune``), never on test requests; the defaults are that choice."""

    k: int = 5                # a known driver's past trips retrieved as anchors (0: all of their history)
    k_open: int = 0           # trips retrieved for a request without history (0: none -> Dijkstra over time)
    scope: float = 0.0        # anchor only segments inside this detour ellipse around o/d (0: every segment)
    min_uses: int = 2         # anchor segments used by at least this many retrieved trips
    picks: int = 3            # roads the no-context LLM chooses
    keep: float = 0.5         # PathGPT: share of the anchor roads (LLM-ranked) whose segments stay anchors
    personal: bool = True     # a request with a known driver retrieves from that driver's own trips
    discount: float = 0.5     # cost factor on anchor edges
    detour: float = 1.5       # candidate roads: edge midpoints inside this ellipse around origin/destination
    v1_tokens: int = 16       # free-text tokens for names_v1
    v1_k: int = 5             # retrieved trips in the names_v1 prompt (the public v1's top-k context)
    rrf: float = 60.0         # reciprocal-rank-fusion constant
    # per preference words seen in training: (words, base "time" | "length", major-road factor, anchor discount),
    # chosen leave-one-out on the training trips (tune.tune_profiles; the default is seed 0's choice); other words
    # (the held-out preference, a user's own): travel time, factor 1, ``discount``
    profiles: tuple[tuple[str, str, float, float], ...] = (
        ("get there as fast as possible", "time", 1.0, 0.7), ("take the shortest distance", "length", 1.0, 0.7),
        ("avoid major roads and highways, quiet streets", "time", 3.0, 0.7),
        ("stick to the roads I know", "time", 1.0, 0.5))

    def __post_init__(self):
        for f in ("k", "k_open", "scope"):
            if getattr(self, f) < 0:
                raise UserError(f"RecConfig.{f} = {getattr(self, f)} is negative; use 0 or more")
        if self.min_uses < 1:
            raise UserError(f"RecConfig.min_uses = {self.min_uses}; use 1 or more")
        for f in ("discount", "keep"):
            if not 0 < getattr(self, f) <= 1:
                raise UserError(f"RecConfig.{f} = {getattr(self, f)} must be in (0, 1]")
        for words, base, major, disc in self.profiles:
            if base not in ("time", "length") or major <= 0 or not 0 < disc <= 1:
                raise UserError(f"RecConfig.profiles[{words!r}] = ({base}, {major}, {disc}): base must be time or "
                                f"length, major factor > 0, discount in (0, 1]")


@dataclass
class Request:
    origin: int
    dest: int
    pref_text: str
    driver: int | None = None

    def query(self, g: RoadGraph) -> str:
        """The trips' own text form (``trips.request_text``), with the request's preference words as given."""
        who = "" if self.driver is None else f"driver {self.driver} "
        return f"{who}wants to {self.pref_text}. from {g.describe_node(self.origin)} to {g.describe_node(self.dest)}"


@dataclass
class Answer:
    edges: list[int]
    roads: list[str] = field(default_factory=list)     # what the method chose / named
    unknown: int = 0                                  # named roads not on the graph (ignored)
    valid: bool = True
    latency_s: float = 0.0
    is_route: bool = True                             # False: ``edges`` is a set of named roads (names_v1)


def _trim(cache, n0: int) -> None:
    """Drop what was appended after the first ``n0`` tokens (transformers 5 crops by a negative count)."""
    extra = cache.get_seq_length() - n0
    if extra > 0:
        cache.crop(-extra)


class TripIndex:
    """BM25 + MiniLM over trip texts, fused by reciprocal rank (``dense=False``: BM25 only, for fast tests)."""

    def __init__(self, trips: list[Trip], dense: bool = True, rrf: float = 60.0):
        from edgecloud.llm.retrieval import BM25, Dense

        self.trips = trips
        texts = [t.text for t in trips]
        self.bm25 = BM25(texts)
        self.dense = Dense(texts) if dense and texts else None
        self.rrf = rrf
        self._fused: dict[str, np.ndarray] = {}

    def fused(self, query: str) -> np.ndarray:
        """Reciprocal-rank-fused score of every trip for ``query`` (cached: tuning asks the same query often)."""
        if query not in self._fused:
            n = len(self.trips)
            score = np.zeros(n)
            for ranking in (self.bm25.top(query, n), self.dense.top(query, n) if self.dense else []):
                for r, i in enumerate(ranking):
                    score[i] += 1.0 / (self.rrf + r + 1)
            self._fused[query] = score
        return self._fused[query].copy()

    def top(self, query: str, k: int, driver: int | None = None) -> list[Trip]:
        """Top-``k`` by fused rank; with ``driver`` (and history for them), only that driver's own trips."""
        if not self.trips:
            return []
        n = len(self.trips)
        score = self.fused(query)
        mine = np.array([t.driver == driver for t in self.trips])
        if driver is not None and mine.any():
            score[~mine] = -np.inf
        return [self.trips[int(i)] for i in np.argsort(-score, kind="stable")[:min(k, int(mine.sum()) or n)]]


class Recommender:
    def __init__(self, g: RoadGraph, index: TripIndex, engine=None, cfg: RecConfig = RecConfig()):
        self.g, self.index, self.engine, self.cfg = g, index, engine, cfg

    # ------------------------------------------------------------- pieces
    def inside(self, o: int, t: int, factor: float) -> np.ndarray:
        """Edges whose midpoint lies inside the ``factor`` detour ellipse around origin and destination."""
        g = self.g
        mx, my = (g.x[g.u] + g.x[g.v]) / 2, (g.y[g.u] + g.y[g.v]) / 2
        d = np.hypot(mx - g.x[o], my - g.y[o]) + np.hypot(mx - g.x[t], my - g.y[t])
        return d <= factor * max(g.dist_m(o, t), 200.0)

    def candidates(self, o: int, t: int) -> list[str]:
        return sorted({self.g.name[e] for e in np.flatnonzero(self.inside(o, t, self.cfg.detour)) if self.g.name[e]})

    def profile(self, pref_text: str | None) -> tuple[str, float, float]:
        """(base, major factor, anchor discount) for these preference words; travel time when none was learned."""
        for words, base, major, disc in self.cfg.profiles:
            if words == pref_text:
                return base, major, disc
        return "time", 1.0, self.cfg.discount

    def connect(self, o: int, t: int, edges, pref_text: str | None = None) -> list[int]:
        """Dijkstra over the preference's learned cost (travel time by default) with ``edges`` discounted: a valid
        path through (or near) the anchors."""
        base, major, disc = self.profile(pref_text)
        g = self.g
        w = (g.time if base == "time" else g.length) * np.where(g.major, major, 1.0)
        e = np.asarray(list(edges), dtype=int)
        if len(e):
            w[e] *= disc
        return g.route(o, t, w)

    def resolve(self, names: list[str]) -> tuple[list[str], list[int], int]:
        """Names -> (known names, their edges, count of unknown names)."""
        known, unknown = [], 0
        for n in names:
            r = self.g.road(n)
            if r is None:
                unknown += 1
            elif r not in known:
                known.append(r)
        edges = [int(e) for r in known for e in self.g.edges_named[r]]
        return known, edges, unknown

    def retrieve(self, req: Request, k: int | None = None) -> list[Trip]:
        """The retrieval stage: a driver with history gets their own top-``k`` trips (``k`` = 0: all of them);
        a request without history gets the top-``k_open`` trips of everyone (0: none)."""
        driver = req.driver if self.cfg.personal else None
        if k is None:
            own = driver is not None and any(t.driver == driver for t in self.index.trips)
            k = (self.cfg.k or len(self.index.trips)) if own else self.cfg.k_open
        return self.index.top(req.query(self.g), k, driver) if k else []

    def anchor_edges(self, o: int, t: int, trips: list[Trip]) -> list[int]:
        """Segments of the retrieved trips used by >= ``min_uses`` of them (inside the ``scope`` ellipse if set),
        in order of first use."""
        uses: dict[int, int] = {}
        for tr in trips:
            for e in set(tr.edges):
                uses[e] = uses.get(e, 0) + 1
        near = self.inside(o, t, self.cfg.scope) if self.cfg.scope else None
        first = dict.fromkeys(e for tr in trips for e in tr.edges)
        return [e for e in first if uses[e] >= self.cfg.min_uses and (near is None or near[e])]

    def prompt(self, req: Request, context: list[Trip], near: list[int] | None = None) -> str:
        """``near``: each past trip is shown by its roads among these edges only (short prompt, relevant roads)."""
        g = self.g
        lines = []
        if context:
            keep = set(near) if near is not None else None
            lines.append("Past trips:")
            lines += [f"{i + 1}. {t.text}" if keep is None else
                      f"{i + 1}. {PREFS[t.pref]}: {', '.join(roads_of(g, [e for e in t.edges if e in keep]))}"
                      for i, t in enumerate(context)]
        lines.append(f"Request: {req.query(g)}.")
        lines.append("Which roads should the route use?")
        return self.engine.chat_prompt(SYSTEM, "\n".join(lines)) + "Roads:"

    @torch.inference_mode()
    def llm_choose(self, prompt: str, cands: list[str], free_tokens: int = 0,
                   picks: int | None = None) -> tuple[list[str], str]:
        """Constrained choice: rank candidates by mean log-prob as the answer; optionally also free text."""
        e = self.engine
        ids = e.encode_prompt(prompt)
        logits, cache = e.prefill(ids)
        n0 = cache.get_seq_length()
        free = ""
        if free_tokens:
            toks, _ = e.greedy(cache, logits, free_tokens)
            free = e.decode_text(toks)
            _trim(cache, n0)
        first = torch.log_softmax(logits, -1)
        if not cands:
            return [], free
        toks = [e.encode(" " + c) for c in cands]
        L = max(len(t) for t in toks)
        scores = np.array([float(first[t[0]]) for t in toks])
        if L > 1:
            # all candidates in one batch after the shared prompt cache; right padding never reaches a scored token
            cache.batch_repeat_interleave(len(toks))
            ids = torch.tensor([t + [t[-1]] * (L - len(t)) for t in toks])
            pos = torch.arange(n0, n0 + L - 1).expand(len(toks), -1)
            out = e.model(inputs_embeds=e.decoder.embed_tokens(ids[:, :-1]), position_ids=pos, cache=cache,
                          use_cache=True).logits.float()
            lp = torch.log_softmax(out, -1).gather(2, ids[:, 1:, None])[..., 0]
            mask = torch.arange(1, L)[None, :] < torch.tensor([len(t) for t in toks])[:, None]
            scores += (lp * mask).sum(1).numpy()
        scores /= np.array([len(t) for t in toks])
        order = np.argsort(-scores, kind="stable")
        return [cands[i] for i in order[: picks or self.cfg.picks]], free

    def needs_llm(self, req: Request) -> bool:
        """PathGPT asks the LLM only when the retrieval stage found anchor roads to rank."""
        anchors = self.anchor_edges(req.origin, req.dest, self.retrieve(req))
        return any(self.g.name[e] for e in anchors)

    def rank_anchor_roads(self, req: Request, ctx: list[Trip], anchors: list[int], roads: list[str]) -> list[str]:
        """The LLM's role: rank the anchor roads for this request's stated preference, seeing the retrieved trips."""
        ranked, _ = self.llm_choose(self.prompt(req, ctx, anchors), roads, picks=len(roads))
        return ranked

    def kept(self, n_roads: int, keep: float | None = None) -> int:
        return max(1, round((self.cfg.keep if keep is None else keep) * n_roads))

    def filter_anchors(self, anchors: list[int], roads: list[str]) -> list[int]:
        """Anchors on the kept roads; unnamed segments (which no answer can name) stay."""
        kept = set(roads)
        return [e for e in anchors if not self.g.name[e] or self.g.name[e] in kept]

    # ------------------------------------------------------------- methods
    def run(self, method: str, req: Request) -> Answer:
        t0 = time.perf_counter()
        a = self._run(method, req)
        a.latency_s = time.perf_counter() - t0
        return a

    def _run(self, method: str, req: Request) -> Answer:
        g, o, t = self.g, req.origin, req.dest
        if method == "dijkstra_fastest":
            return Answer(g.route(o, t, g.time))
        if method == "dijkstra_shortest":
            return Answer(g.route(o, t, g.length))
        if method == "dijkstra_profile":
            return Answer(self.connect(o, t, [], req.pref_text))
        if method == "retrieval_only":
            top = self.retrieve(req, 1)
            anchors = top[0].edges if top else []
            return Answer(self.connect(o, t, anchors, req.pref_text), roads_of(g, anchors))
        if method in ("retrieval_anchors", "pathgpt"):
            ctx = self.retrieve(req)
            anchors = self.anchor_edges(o, t, ctx)
            roads = list(dict.fromkeys(g.name[e] for e in anchors if g.name[e]))
            if method == "pathgpt" and roads:
                ranked = self.rank_anchor_roads(req, ctx, anchors, roads)
                roads = ranked[: self.kept(len(roads))]
                anchors = self.filter_anchors(anchors, roads)
            return Answer(self.connect(o, t, anchors, req.pref_text), roads)
        cands = self.candidates(o, t)
        if method == "llm_no_context":
            chosen, _ = self.llm_choose(self.prompt(req, []), cands)
        elif method == "names_v1":
            _, free = self.llm_choose(self.prompt(req, self.retrieve(req, self.cfg.v1_k)), [], self.cfg.v1_tokens)
            return self.names_v1(o, t, free)
        else:
            raise ValueError(method)
        known, edges, unknown = self.resolve(chosen)
        return Answer(self.connect(o, t, edges), known, unknown)

    def names_v1(self, o: int, t: int, text: str) -> Answer:
        """v1 style: the named roads are the answer; valid only if they chain from origin to destination."""
        names = [n.strip(" .") for n in re.split(r"[,\n;]| and ", text) if n.strip(" .")]
        known, edges, unknown = self.resolve(names)
        g = self.g
        touch = [set(g.u[g.edges_named[r]]) | set(g.v[g.edges_named[r]]) for r in known]
        valid = bool(touch) and o in touch[0] and t in touch[-1] and all(a & b for a, b in zip(touch, touch[1:]))
        return Answer(edges, known, unknown, valid, is_route=False)
