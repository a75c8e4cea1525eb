"""The recommender (PathGPT, anchor version) and its baselines. Every method but ``names_v1`` returns a valid path.

PathGPT: retrieve the top-k historical trips for the request (BM25 + MiniLM, reciprocal-rank fusion; a request
that names a known driver searches that driver's own history, as PathGPT's per-user retrieval does), put them in the
prompt (compactly: each trip's roads near this request) with the origin, destination and preference words, and let
the LLM rank those roads by constrained choice: each candidate's mean token log-probability as the answer's
continuation. The ``keep`` best-ranked share of the roads is kept, and the retrieved trips' own segments on them are
the anchors; Dijkstra over travel time with the anchors discounted connects origin and destination, so the answer is
always a path. ``retrieval_topk`` is the same with every retrieved road kept: the LLM's contribution is the
difference between the two rows.
``names_v1`` is the public v1 style: free-text road names, checked (not repaired) for forming a path.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from edgecloud.route.graph import RoadGraph
from edgecloud.route.trips import PREFS, Trip, request_text, roads_of

METHODS = ["dijkstra_fastest", "dijkstra_shortest", "retrieval_only", "retrieval_topk", "llm_no_context", "pathgpt"]
SYSTEM = "You recommend driving routes in central Helsinki. Answer with road names separated by commas."


@dataclass(frozen=True)
class RecConfig:
    k: int = 5                # retrieved trips in the prompt
    picks: int = 3            # roads the no-context LLM chooses
    keep: float = 0.7         # PathGPT: share of the retrieved roads (LLM-ranked) whose segments anchor the route
    personal: bool = True     # a request with a known driver retrieves from that driver's own trips
    discount: float = 0.3     # cost factor on chosen roads' edges
    detour: float = 1.5       # candidate roads: edge midpoints inside this ellipse around origin/destination
    v1_tokens: int = 16       # free-text tokens for names_v1
    rrf: float = 60.0         # reciprocal-rank-fusion constant


@dataclass
class Request:
    origin: int
    dest: int
    pref_text: str
    driver: int | None = None

    def query(self, g: RoadGraph) -> str:
        if self.driver is None:
            return f"wants to {self.pref_text}. from {g.describe_node(self.origin)} to {g.describe_node(self.dest)}"
        return request_text(g, self.driver, _pref_key(self.pref_text), self.origin, self.dest)


def _pref_key(text: str) -> str:
    return next((k for k, v in PREFS.items() if v == text), "fastest")


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

    def top(self, query: str, k: int, driver: int | None = None) -> list[Trip]:
        """Top-``k`` by fused rank; with ``driver`` (and history for them), only that driver's own trips."""
        if not self.trips:
            return []
        n = len(self.trips)
        score = np.zeros(n)
        for ranking in (self.bm25.top(query, n), self.dense.top(query, n) if self.dense else []):
            for r, i in enumerate(ranking):
                score[i] += 1.0 / (self.rrf + r + 1)
        mine = np.array([t.driver == driver for t in self.trips])
        if driver is not None and mine.any():
            score[~mine] = -np.inf
        return [self.trips[int(i)] for i in np.argsort(-score, kind="stable")[:min(k, int(mine.sum()) or n)]]


class Recommender:
    def __init__(self, g: RoadGraph, index: TripIndex, engine=None, cfg: RecConfig = RecConfig()):
        self.g, self.index, self.engine, self.cfg = g, index, engine, cfg

    # ------------------------------------------------------------- pieces
    def candidates(self, o: int, t: int) -> list[str]:
        g = self.g
        mx, my = (g.x[g.u] + g.x[g.v]) / 2, (g.y[g.u] + g.y[g.v]) / 2
        d = np.hypot(mx - g.x[o], my - g.y[o]) + np.hypot(mx - g.x[t], my - g.y[t])
        inside = d <= self.cfg.detour * max(g.dist_m(o, t), 200.0)
        return sorted({g.name[e] for e in np.flatnonzero(inside) if g.name[e]})

    def connect(self, o: int, t: int, edges) -> list[int]:
        """Dijkstra over travel time with ``edges`` discounted: a valid path through (or near) the anchors."""
        w = self.g.time.copy()
        e = np.asarray(list(edges), dtype=int)
        if len(e):
            w[e] *= self.cfg.discount
        return self.g.route(o, t, w)

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

    def retrieve(self, req: Request, k: int) -> list[Trip]:
        return self.index.top(req.query(self.g), k, req.driver if self.cfg.personal else None)

    def near_edges(self, o: int, t: int, trips: list[Trip]) -> list[int]:
        """The retrieved trips' segments whose road is a candidate for this request (inside the detour ellipse)."""
        cands = set(self.candidates(o, t))
        return list(dict.fromkeys(e for c in trips for e in c.edges if self.g.name[e] in cands))

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
        if method == "retrieval_only":
            top = self.retrieve(req, 1)
            anchors = top[0].edges if top else []
            return Answer(self.connect(o, t, anchors), roads_of(g, anchors))
        if method in ("retrieval_topk", "pathgpt"):
            ctx = self.retrieve(req, self.cfg.k)
            near = self.near_edges(o, t, ctx)
            roads = list(dict.fromkeys(g.name[e] for e in near))
            if method == "pathgpt" and roads:
                roads, _ = self.llm_choose(self.prompt(req, ctx, near), roads,
                                           picks=max(1, round(self.cfg.keep * len(roads))))
                kept = set(roads)
                near = [e for e in near if g.name[e] in kept]
            return Answer(self.connect(o, t, near), roads)
        cands = self.candidates(o, t)
        if method == "llm_no_context":
            chosen, _ = self.llm_choose(self.prompt(req, []), cands)
        elif method == "names_v1":
            _, free = self.llm_choose(self.prompt(req, self.retrieve(req, self.cfg.k)), [], self.cfg.v1_tokens)
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
