"""The two DRAGON processes: the cloud server (public documents) and the device client (private documents).

Session: ``hello`` both ways (the frame header carries the protocol version; a mismatch is a ProtocolError naming both
versions), then per question ``query`` (question, roles or ``auto`` with the device's document weight, window),
``ready`` from the cloud once its documents are prefilled (naming the roles; when it aggregates, carrying its
first-position ``(log W, log q)`` so the device decides the first token without a round trip), the drafts/verdicts of
:mod:`edgecloud.rag.protocol`, and an ``end`` each way carrying the sides' measured decode times so no message is
left in flight. The cloud answers a bad query (prompt over the context, bad field) with an ``error`` message and
keeps serving. If the cloud is down or goes away mid-answer, the device finishes from the committed prefix with its
own documents and says so in ``fallback``.
"""

from __future__ import annotations

import asyncio
import math
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from edgecloud.collab.wire import Connection, PeerGone, ProtocolError, Trace
from edgecloud.errors import UserError
from edgecloud.llm.prompts import IM_END, chat_head
from edgecloud.rag.mix import Side
from edgecloud.rag.prefix import PassageKV, prefix_len
from edgecloud.rag.protocol import Inbox, Outcome, local_generate, run_aggregator, run_drafter
from edgecloud.rag.store import Store

SYSTEM = "Answer the question. This background passage may help:\n"


@dataclass(frozen=True)
class RagConfig:
    k: int = 2  # documents retrieved per side
    tau: float = 0.05  # REPLUG weight temperature on MiniLM cosine
    reweight: bool = True  # Bayesian REPLUG: document weights follow the answer's likelihood
    max_new: int = 16
    window: int = 4  # DRAGON: drafts ahead of the last verdict
    greedy: bool = True
    seed: int = 0
    timeout_s: float = 30.0

    def __post_init__(self):
        for f, lo in (("k", 1), ("max_new", 1), ("window", 1)):
            if getattr(self, f) < lo:
                raise UserError(f"rag {f}={getattr(self, f)}: must be >= {lo}")
        if self.tau <= 0:
            raise UserError(f"rag tau={self.tau}: must be > 0")


def contexts_for(engine, store: Store | None, question: str, k: int) -> tuple[list[list[int]], list[float], list]:
    """Prompt ids per retrieved document (chat format, passage in the system turn) and the MiniLM scores."""
    if store is None:
        return [engine.encode_prompt(engine.chat_prompt("Answer the question.", question))], [0.0], []
    docs, scores = store.retrieve(question, k)
    ctx = [engine.encode_prompt(engine.chat_prompt(SYSTEM + d.text, question)) for d in docs]
    return ctx, [float(s) for s in scores], docs


def passage_prefix(engine, text: str) -> str:
    """The part of a document's prompt that depends on the passage alone: the chat head and system turn up to the
    ``<|im_end|>`` closing the passage (plain-text models: the system text). Cacheable (:mod:`edgecloud.rag.prefix`)."""
    head = chat_head(SYSTEM + text, engine.lm.chat)
    return head[: head.index(IM_END) + len(IM_END)] if engine.lm.chat else SYSTEM + text


def make_side(engine, store: Store | None, question: str, cfg: RagConfig, kv: PassageKV | None = None,
              retrieved: tuple | None = None) -> Side:
    """Retrieve (unless ``retrieved``, :func:`contexts_for`'s result, is given), build the per-document prompts and
    prefill them; with ``kv`` (the cloud's passage KV cache) each document's passage prefix comes from the cache and
    only the question turn is prefilled."""
    ctx, scores, docs = retrieved or contexts_for(engine, store, question, cfg.k)
    side = Side(engine, ctx, scores, cfg.tau, cfg.reweight, kv=kv, prefix=prefixes(engine, ctx, docs, kv))
    side.start([])
    return side


def side_logw(scores: list[float], tau: float) -> float:
    """log of a side's total document weight before the answer (log-sum-exp of its REPLUG priors, as :class:`Side`)."""
    return float(torch.logsumexp(torch.tensor(scores, dtype=torch.float64) / tau, 0))


def prefixes(engine, ctx: list[list[int]], docs: list, kv: PassageKV | None) -> list[int] | None:
    """Cacheable prefix length of each document's prompt (None without a cache or without documents)."""
    if kv is None or not docs:
        return None
    out = [prefix_len(engine, c, passage_prefix(engine, d.text)) for c, d in zip(ctx, docs)]
    kv.stats["unaligned"] += out.count(0)
    return out


def precompute(engine, store: Store, kv: PassageKV) -> int:
    """Fill ``kv`` with the passage prefixes of ``store`` (in store order, up to the budget); returns bytes held."""
    return kv.precompute(engine.encode_prompt(passage_prefix(engine, p.text)) for p in store.passages)


# ---------------------------------------------------------------- cloud
class CloudServer:
    def __init__(self, engine, store: Store, host: str = "127.0.0.1", port: int = 0, idle_timeout: float = 600.0,
                 kv: PassageKV | None = None):
        self.engine, self.store, self.host, self.port = engine, store, host, port
        self.kv = kv  # the public passages' KV cache (None: every document prefilled in full)
        self.idle_timeout = idle_timeout
        self.step_s: list[float] = []
        self.server = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._session, self.host, self.port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    async def _session(self, r, w) -> None:
        conn = Connection(r, w, Trace("cloud"), timeout=self.idle_timeout)
        try:
            await conn.expect("hello")
            await conn.send("hello", side="cloud", model=self.engine.lm.name, docs=len(self.store.passages))
            while True:
                msg, _ = await conn.recv()
                if msg["type"] == "bye":
                    break
                if msg["type"] in ("draft", "end"):  # the device drafts before our ready: a refused question's
                    continue
                if msg["type"] == "ping":
                    await conn.send("pong")
                elif msg["type"] == "query":
                    await self._query(conn, msg)
                else:
                    await conn.send("error", message=f"unexpected message type {msg['type']!r}")
        except ProtocolError as e:
            await conn.send_error(str(e))
        except PeerGone:
            pass
        finally:
            await conn.close()

    async def _query(self, conn: Connection, msg: dict) -> None:
        try:
            cfg = RagConfig(**msg["config"])
            hits = self.kv.stats["hits"] if self.kv else 0
            side = make_side(self.engine, self.store, str(msg["question"]), cfg, self.kv)
            hits = (self.kv.stats["hits"] - hits) if self.kv else 0
            agg = msg["agg"]
            if agg == "auto":  # the side whose documents weigh more drafts (Scheduler.bias)
                lw_c = float(torch.logsumexp(side.logw, 0))
                agg = "device" if lw_c - float(msg["dev_logw"]) > float(msg["bias"]) else "cloud"
            if agg not in ("device", "cloud"):
                raise UserError(f"agg={agg!r}: use device, cloud or auto")
        except (UserError, TypeError, KeyError, ValueError) as e:
            await conn.send("error_query", message=f"{type(e).__name__}: {e}")
            return
        tensors, first = None, {}
        if agg == "cloud" and msg.get("first_at_device"):  # the device decides the first token itself
            first["logw"], logq = side.dist()
            tensors = {"logq": logq}
        await conn.send("ready", tensors, agg=agg, docs=len(side.contexts), cached=hits,
                        step_s=_mean(self.step_s[-32:]), t=time.time(), **first)
        inbox, out = Inbox(conn), Outcome()
        try:
            if agg == "device":
                await run_drafter(side, conn, inbox, out, cfg.max_new, msg["window"], cfg.greedy, cfg.seed)
                await conn.send("end", step_s=_mean(out.step_s))
                await _drain_until(inbox, "end")
            else:
                await run_aggregator(side, conn, inbox, out, cfg.max_new, cfg.greedy, cfg.seed, msg["sequence"])
                await _drain_until(inbox, "end")
                await conn.send("end", step_s=_mean(out.step_s))
        finally:
            inbox.stop()
        self.step_s += out.step_s

    async def close(self) -> None:
        if self.server:
            self.server.close()
            await self.server.wait_closed()


async def _drain_until(inbox: Inbox, type_: str) -> dict:
    while True:
        m, _ = await inbox.get()
        if m["type"] == type_:
            return m


def _mean(xs) -> float:
    return statistics.fmean(xs) if xs else 0.0


# ---------------------------------------------------------------- scheduler
@dataclass
class Scheduler:
    """The Δz rule: per-token latency of aggregating on each side from measured RTT, decode times and acceptance.

    Aggregating at the device (the cloud drafts), a token costs ``max(t_d, t_c)`` while drafts are accepted and a
    rejection adds a round trip plus a cloud step: ``z_dev = max(t_d, t_c) + (1 - a_c) (rtt + t_c)``. Aggregating
    in the cloud (the device drafts), ``z_cloud = max(t_d, t_c) + (1 - a_d) (rtt + t_d)``; the committed tokens also
    reach the device half an RTT later, which moves TTFT but not the rate. ``choose`` picks the smaller; every
    measurement updates an exponential average (``alpha``), so the side moves live as the link or load changes.
    """

    rtt: float = 0.0
    t_dev: float = 0.0
    t_cloud: float = 0.0
    acc_cloud_drafts: float = 0.8  # prior until measured
    acc_dev_drafts: float = 0.8
    alpha: float = 0.5
    fixed: str | None = None  # "device" / "cloud" pins the side (baselines)

    def _ewma(self, name: str, x: float) -> None:
        old = getattr(self, name)
        setattr(self, name, x if old == 0 else (1 - self.alpha) * old + self.alpha * x)

    def z(self) -> dict[str, float]:
        base = max(self.t_dev, self.t_cloud)
        return {"device": base + (1 - self.acc_cloud_drafts) * (self.rtt + self.t_cloud),
                "cloud": base + (1 - self.acc_dev_drafts) * (self.rtt + self.t_dev)}

    def window(self, rtt: float, base: int, cap: int) -> int:
        """Drafts in flight: enough to keep the drafter busy while a verdict makes the round trip at the measured
        per-token time (``ceil(rtt / t) + 2``), never below ``base``, at most ``cap``."""
        t = max(self.t_dev, self.t_cloud)
        need = math.ceil(rtt / t) + 2 if t > 0 else base
        return int(min(cap, max(base, need)))

    def choose(self) -> str:
        if self.fixed:
            return self.fixed
        z = self.z()
        return "device" if z["device"] <= z["cloud"] else "cloud"

    def bias(self) -> float:
        """Per question, the Δz rule from the sides' document weights: the union mixture is ``p = w_d q_d + w_c
        q_c`` (``w``: each side's share of the document weight), so ``TV(p, q_s) = (1 - w_s) TV(q_d, q_c)`` and a
        side's drafts are rejected at a rate proportional to the OTHER side's weight share. With that acceptance,
        ``z_dev < z_cloud`` (the cloud drafts) iff ``(1 - w_c)(rtt + t_c) < w_c (rtt + t_d)``, i.e. iff
        ``log W_c - log W_d > log((rtt + t_c) / (rtt + t_d))``: this threshold (the unknown ``TV(q_d, q_c)`` cancels).
        The cloud applies it once both sides' retrieval scores are known (:meth:`CloudServer._query`)."""
        return math.log((self.rtt + self.t_cloud + 1e-3) / (self.rtt + self.t_dev + 1e-3))

    def observe_rtt(self, rtt: float) -> None:
        self._ewma("rtt", rtt)

    def update(self, agg: str, rtt: float, t_dev: float, t_cloud: float, acceptance: float) -> None:
        """One answer's measurements (``rtt`` 0: none in this update; the device measures it by ping)."""
        if rtt:
            self._ewma("rtt", rtt)
        if t_dev:
            self._ewma("t_dev", t_dev)
        if t_cloud:
            self._ewma("t_cloud", t_cloud)
        key = "acc_cloud_drafts" if agg == "device" else "acc_dev_drafts"
        setattr(self, key, (1 - self.alpha) * getattr(self, key) + self.alpha * acceptance)


# ---------------------------------------------------------------- device
@dataclass
class Answer:
    tokens: list[int]
    text: str
    agg: str
    window: int  # drafts allowed ahead of the last verdict
    ttft_s: float  # question sent -> first token known on the device
    per_token_s: float  # (last token - decode start) / tokens; decode start = both sides prefilled (same-host
    # wall clocks: the cloud's ready carries time.time(), as the traces do)
    total_s: float
    acceptance: float
    rtt_s: float
    fallback: str | None
    traffic: dict
    step_s: dict  # mean per-token decode compute of each side's batch ({"device", "cloud"}), for profiling
    timeline: dict  # seconds after the question: device prefilled, cloud ready (its wall clock), first/last token

    def as_dict(self) -> dict:
        return asdict(self)


class Device:
    """The device process's client: keeps one connection to the cloud and a scheduler across questions."""

    def __init__(self, engine, store: Store, cloud: tuple[str, int], cfg: RagConfig,
                 scheduler: Scheduler | None = None):
        self.engine, self.store, self.cloud, self.cfg = engine, store, cloud, cfg
        self.sched = scheduler or Scheduler()
        self.conn: Connection | None = None
        self.trace = Trace("device")
        self.on_commit = None  # passed to each answer's Outcome (tests use it to kill the cloud mid-answer)
        self.rtt = 0.0  # last measured round trip: at connect and after each answer, never before a question

    async def connect(self) -> None:
        """Open the session: hello both ways, then one ping so the first question already knows the RTT."""
        self.conn = await Connection.open(*self.cloud, self.trace, timeout=self.cfg.timeout_s)
        await self.conn.send("hello", side="device", model=self.engine.lm.name)
        await self.conn.expect("hello")
        await self._ping()

    async def _ping(self) -> None:
        tp = time.time()
        await self.conn.send("ping")
        await self.conn.expect("pong")
        self.rtt = time.time() - tp
        self.sched.observe_rtt(self.rtt)

    async def close(self) -> None:
        if self.conn:
            try:
                await self.conn.send("bye")
            except PeerGone:
                pass
            await self.conn.close()
            self.conn = None

    async def ask(self, question: str, mode: str = "dragon") -> Answer:
        """``mode``: dragon (the side whose documents weigh more drafts, :meth:`Scheduler.bias`; the cloud applies the
        rule once it has retrieved and says which in its ``ready``), dragon-device / dragon-cloud (fixed side),
        token-sync, sequence."""
        cfg = self.cfg
        t0 = time.time()  # the question is asked: TTFT counts everything from here (connecting included)
        before = self.trace.totals()
        agg = {"dragon": "auto", "dragon-device": "device", "dragon-cloud": "cloud", "token-sync": "device",
               "sequence": "device"}[mode]
        window = {"token-sync": 1, "sequence": cfg.max_new}.get(mode, cfg.window)
        out, side, rtt, fallback = Outcome(on_commit=self.on_commit), None, 0.0, None
        cloud_step = 0.0
        t_start = None  # decode start: both sides' documents prefilled (the cloud's ready carries its wall time)
        t_ready = None
        self.engine.check_length(len(self.engine.encode(question)) + 400 + cfg.max_new, "question + passage")
        try:
            if self.conn is None:
                await self.connect()
            rtt = self.rtt  # measured after the last answer (or at connect): no round trip before the query
            if agg == "auto" and self.sched.fixed:
                agg = self.sched.fixed
            if mode.startswith("dragon"):  # enough drafts in flight to cover the round trip at the measured rate
                window = self.sched.window(rtt, cfg.window, cfg.max_new)
            got = contexts_for(self.engine, self.store, question, cfg.k)  # retrieval (fast) before the query: the
            # cloud needs this side's document weight to pick the drafter
            await self.conn.send("query", question=question, agg=agg, window=window, sequence=mode == "sequence",
                                 config=asdict(cfg), first_at_device=agg != "device",
                                 dev_logw=side_logw(got[1], cfg.tau), bias=self.sched.bias())
            side = make_side(self.engine, self.store, question, cfg, retrieved=got)  # overlaps the cloud's prefill
            t_start = t_ready = time.time()
            # the cloud's ready (or its refusal) is read by the inbox: a drafting device starts without waiting
            inbox = Inbox(self.conn, "ready", lambda m: UserError(f"the cloud refused the question: "
                                                                  f"{m.get('message', m['type'])}"))
            try:
                if agg == "auto":  # the cloud's choice, in its ready (here well before this side's prefill ends)
                    agg = (await inbox.wait_preamble())[0].get("agg")
                    if agg not in ("device", "cloud"):
                        raise ProtocolError(f"the cloud's ready chose agg={agg!r}: expected device or cloud")
                if agg == "device":
                    await run_aggregator(side, self.conn, inbox, out, cfg.max_new, cfg.greedy, cfg.seed,
                                         mode == "sequence")
                    end = await _drain_until(inbox, "end")
                    await self.conn.send("end", step_s=_mean(out.step_s))
                else:
                    await run_drafter(side, self.conn, inbox, out, cfg.max_new, window, cfg.greedy, cfg.seed,
                                      first=inbox.wait_preamble)
                    await self.conn.send("end", step_s=_mean(out.step_s))
                    end = await _drain_until(inbox, "end")
            finally:
                inbox.stop()
            cloud_ready = float((inbox.preamble_msg or {}).get("t", 0.0))
            cloud_cached = (inbox.preamble_msg or {}).get("cached")
            t_start = max(t_start, cloud_ready)
            acc = out.accepted / max(1, len(out.tokens) - out.decided)  # of the verified tokens
            cloud_step = float(end["step_s"])
            t_last = out.commit_times[-1] if out.commit_times else time.time()
            await self._ping()  # after the last token: the RTT the next question's window and scheduler use
            if mode.startswith("dragon"):  # every speculative run is a measurement the scheduler learns from
                self.sched.update(agg, 0.0, _mean(out.step_s), float(end["step_s"]), acc)  # RTT: by _ping
            breakdown = {"device_prefilled_s": t_ready - t0, "cloud_ready_s": cloud_ready - t0 if cloud_ready
                         else None, "first_token_s": (out.commit_times[0] - t0) if out.commit_times else None,
                         "last_token_s": t_last - t0, "cloud_cached_docs": cloud_cached}
        except (PeerGone, ProtocolError) as e:
            breakdown, agg = {}, "device" if agg == "auto" else agg
            fallback = f"cloud lost ({e}); answered from the device's own documents after {len(out.tokens)} tokens"
            self.conn = None
            if side is None:
                side = make_side(self.engine, self.store, question, cfg)
            t_start = t_start or time.time()
            side.rollback(len(out.tokens))
            if out.tokens and side.n < len(out.tokens):
                side.advance(out.tokens[-1])
            done = out.tokens and (out.tokens[-1] in self.engine.eos_ids or len(out.tokens) >= cfg.max_new)
            if not done:
                toks = local_generate(side, cfg.max_new, cfg.greedy, cfg.seed, len(out.tokens), out.tokens)
                now = time.time()
                out.commit_times += [now] * (len(toks) - len(out.tokens))
                out.tokens = toks
        n = len(out.tokens)
        ct = out.commit_times
        after = self.trace.totals()
        return Answer(out.tokens, self.engine.decode_text(out.tokens), agg, window, (ct[0] - t0) if ct else 0.0,
                      (ct[-1] - t_start) / n if n else 0.0, (ct[-1] - t0) if ct else 0.0,
                      out.accepted / max(1, n - out.decided), rtt, fallback, {k: after[k] - before[k] for k in after},
                      {"device": _mean(out.step_s), "cloud": cloud_step}, breakdown)
