"""The DRAGON decoding protocol between a drafting side and an aggregating side, over a collab Connection.

The drafter decodes from its own mixture ``q`` ahead of the aggregate, at most ``window`` tokens past the last
verdict, and ships each draft as ``(pos, epoch, token, log W, log q)`` (``log q`` as raw float32 bytes). The
aggregator, which follows the committed sequence with its own documents, forms the exact union mixture ``p`` and
runs :func:`~edgecloud.rag.mix.verify`; it answers every position with a verdict ``(pos, token, accepted)``. On a
rejection the drafter rolls its KV caches and document scores back to ``pos``, feeds the corrected token and starts
a new epoch; drafts of the old epoch still in flight are dropped by the aggregator.

- ``window=1``: token-wise synchronized aggregation (one round trip per token).
- ``window>=max_new`` and ``sequence=True``: sequence-wise aggregation (the drafter sends its whole answer, the
  aggregator verifies only after the last draft arrives; on a rejection the drafter regenerates the rest).
- in between: DRAGON's speculative aggregation, drafts overlapping the link and the other side's compute.

First token: when the aggregator has sent its own first-position distribution ahead (the cloud's ``ready`` carries
``(log W, log q)`` once its prefill ends), the drafter forms the union mixture at position 0 itself and samples
the first token from it (argmax when greedy): exact, and the token exists at ``max(own prefill, peer prefill +
RTT/2)`` instead of after a draft/verdict round trip. It ships that token as a ``decided`` draft, which the
aggregator commits without a verdict.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import torch

from edgecloud.collab.wire import Connection, PeerGone, ProtocolError
from edgecloud.rag.mix import Side, combine, draft, verify


@dataclass
class Outcome:
    tokens: list[int] = field(default_factory=list)
    decided: int = 0  # tokens formed from both sides' distributions without a draft (the first, see above)
    commit_times: list[float] = field(default_factory=list)  # wall time each token was known on this side
    accepted: int = 0
    drafted: int = 0
    step_s: list[float] = field(default_factory=list)  # this side's per-token decode compute
    on_commit: object = None  # optional callable(n_committed), e.g. a test killing the peer mid-answer

    def commit(self, token: int, t: float | None = None) -> None:
        self.tokens.append(token)
        self.commit_times.append(time.time() if t is None else t)
        if self.on_commit:
            self.on_commit(len(self.tokens))


class Inbox:
    """Reads messages in the background so a side can poll between its own decode steps.

    ``preamble``: the type of one message the peer sends before the protocol's own (the cloud's ``ready``); it is
    taken out of the stream (kept in ``preamble_msg``) so a drafter can start before it arrives. Any
    other first message is ``refuse(msg)``'s exception, raised to the reader."""

    def __init__(self, conn: Connection, preamble: str | None = None, refuse=None):
        self.q: asyncio.Queue = asyncio.Queue()
        self.preamble, self.refuse, self.preamble_msg, self.preamble_tensors = preamble, refuse, None, {}
        self.seen_preamble = asyncio.Event()  # set when the preamble came, or the stream failed before it
        self.task = asyncio.create_task(self._run(conn))

    async def _run(self, conn):
        while True:
            try:
                item = await conn.recv()
            except (PeerGone, ProtocolError) as e:
                self.q.put_nowait(e)
                self.seen_preamble.set()
                return
            item[0]["recv_t"] = time.time()  # when this side knew it (a verdict's token is committed then)
            if self.preamble:
                want, self.preamble = self.preamble, None
                if item[0]["type"] == want:
                    self.preamble_msg, self.preamble_tensors = item
                    self.seen_preamble.set()
                    continue
                self.q.put_nowait(self.refuse(item[0]) if self.refuse else
                                  ProtocolError(f"expected {want!r}, got {item[0]['type']!r}"))
                self.seen_preamble.set()
                return
            self.q.put_nowait(item)
            if item[0]["type"] == "end":  # the phase's last message: stop before reading the next phase's frames
                return

    async def wait_preamble(self) -> tuple[dict, dict]:
        """The preamble message and its tensors once they are in; the refusal or transport error if not."""
        await self.seen_preamble.wait()
        if self.preamble_msg is None:
            return await self.get()  # raises what ended the stream
        return self.preamble_msg, self.preamble_tensors

    def _unwrap(self, item):
        if isinstance(item, Exception):
            raise item
        return item

    async def get(self):
        return self._unwrap(await self.q.get())

    def poll(self):
        try:
            return self._unwrap(self.q.get_nowait())
        except asyncio.QueueEmpty:
            return None

    def stop(self):
        self.task.cancel()


def _stop(side: Side, token: int, pos: int, max_new: int) -> bool:
    return token in side.e.eos_ids or pos >= max_new - 1


async def _advance(side: Side, token: int, out: Outcome | None = None) -> None:
    """One decode step of the side's batch in a worker thread: the event loop keeps reading the peer's messages
    meanwhile (torch releases the GIL), so a verdict or draft is in the inbox the moment the step ends instead of
    after however many steps it takes the loop to get round to the socket."""
    t0 = time.perf_counter()
    await asyncio.to_thread(side.advance, token)
    if out is not None:
        out.step_s.append(time.perf_counter() - t0)


async def run_drafter(side: Side, conn: Connection, inbox: Inbox, out: Outcome, max_new: int, window: int,
                      greedy: bool, seed: int, first=None) -> Outcome:
    """``first``: an awaitable factory returning the aggregator's ``(msg, tensors)`` with its position-0
    ``logw`` / ``logq`` (the cloud's ``ready``): the first token is then decided here (module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    epoch, committed, pending_end = 0, 0, False
    m, t = await first() if first is not None else ({}, {})
    if "logq" in t:  # (a peer that sends no distribution ahead gets the first token drafted and verified)
        logp = combine([(float(m["logw"]), t["logq"]), side.dist()])  # the aggregator's own operand order
        tok = draft(logp, greedy, gen)  # a sample of the union mixture itself: exact without a verdict
        last = _stop(side, tok, 0, max_new)
        await conn.send("draft", pos=0, epoch=0, token=tok, decided=True, last=last)
        out.commit(tok)
        out.decided += 1
        if last:
            return out
        committed = 1
        await _advance(side, tok, out)
    while True:
        while not pending_end and side.n - committed < window and side.n < max_new:
            logw, logq = side.dist()
            tok = draft(logq, greedy, gen)
            pos = side.n
            last = _stop(side, tok, pos, max_new)
            await conn.send("draft", {"logq": logq}, pos=pos, epoch=epoch, token=tok, logw=logw, last=last)
            out.drafted += 1
            if last:
                pending_end = True
                side.hist.append((side.logw, side.logp))  # keep rollback indices aligned without a model call
                side.n += 1
                break
            await _advance(side, tok, out)
            while (msg := inbox.poll()) is not None:
                committed, epoch, pending_end, done = await _on_verdict(side, msg, out, committed, epoch,
                                                                        pending_end, max_new)
                if done:
                    return out
        msg = await inbox.get()
        committed, epoch, pending_end, done = await _on_verdict(side, msg, out, committed, epoch, pending_end,
                                                                max_new)
        if done:
            return out


async def _on_verdict(side: Side, item, out: Outcome, committed: int, epoch: int, pending_end: bool,
                      max_new: int):
    msg, _ = item
    if msg["type"] != "verdict":
        raise ProtocolError(f"drafter expected a verdict, got {msg['type']!r}")
    pos, tok = int(msg["pos"]), int(msg["token"])
    out.commit(tok, msg.get("recv_t"))
    out.accepted += bool(msg["accepted"])
    if msg["done"]:
        return pos + 1, epoch, pending_end, True
    if not msg["accepted"]:
        side.rollback(pos)
        await _advance(side, tok)
        epoch, pending_end = epoch + 1, False
    return pos + 1, epoch, pending_end, False


async def run_aggregator(side: Side, conn: Connection, inbox: Inbox, out: Outcome, max_new: int, greedy: bool,
                         seed: int, sequence: bool = False) -> Outcome:
    gen = torch.Generator().manual_seed(seed + 1)
    epoch = 0
    buf: dict[int, tuple[dict, dict]] = {}
    for pos in range(max_new):
        if sequence:  # verify only once the drafter's whole sequence of this epoch is in
            while not any(m["last"] and m["epoch"] == epoch for m, _ in buf.values()):
                m, t = await inbox.get()
                if m["type"] == "draft" and m["epoch"] == epoch:
                    buf[m["pos"]] = (m, t)
        while pos not in buf:
            m, t = await inbox.get()
            if m["type"] != "draft":
                raise ProtocolError(f"aggregator expected a draft, got {m['type']!r}")
            if m["epoch"] == epoch:
                buf[m["pos"]] = (m, t)
        m, t = buf.pop(pos)
        if m.get("decided"):  # formed by the drafter from both sides' distributions: no verdict (module doc)
            if pos != 0:
                raise ProtocolError(f"a decided token is only allowed at position 0, got one at {pos}")
            tok, ok = int(m["token"]), True
            out.decided += 1
            done = _stop(side, tok, pos, max_new)
        else:
            logw_a, logp_a = side.dist()
            logp = combine([(logw_a, logp_a), (m["logw"], t["logq"])])
            tok, ok = verify(logp, t["logq"], int(m["token"]), greedy, gen)
            out.drafted += 1
            out.accepted += ok
            done = _stop(side, tok, pos, max_new)
            await conn.send("verdict", pos=pos, token=tok, accepted=ok, done=done)
        out.commit(tok)
        if not ok:
            epoch += 1
            buf.clear()
        if done:
            break
        await _advance(side, tok, out)
    return out


def local_generate(side: Side, max_new: int, greedy: bool, seed: int, start: int = 0,
                   prefix: list[int] | None = None) -> list[int]:
    """One side (or a centralized union side) decoding alone from its mixture: the reference and the fallback."""
    gen = torch.Generator().manual_seed(seed + 1)
    toks = list(prefix or [])
    for pos in range(start, max_new):
        _, logq = side.dist()
        tok = draft(logq, greedy, gen)
        toks.append(tok)
        if _stop(side, tok, pos, max_new):
            break
        side.advance(tok)
    return toks
