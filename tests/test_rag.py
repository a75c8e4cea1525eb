"""DRAGON's exactness on a tiny random Llama (fast): per-side REPLUG mixing vs the union, KV/score rollback,
speculative aggregation over loopback in every mode (greedy identical to centralized; faults are errors, not
hangs), and the acceptance rule's output distribution (closed form and χ² on sampled runs)."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import numpy as np
import pytest
import torch

from edgecloud.collab.wire import Connection, PeerGone, Trace
from edgecloud.errors import UserError
from edgecloud.llm.engine import Engine
from edgecloud.llm.models import LoadedModel
from edgecloud.rag.mix import Side, accept_distribution, combine, draft, scored_mixture, verify
from edgecloud.rag.node import Scheduler
from edgecloud.rag.protocol import Inbox, Outcome, local_generate, run_aggregator, run_drafter


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
    return Engine(LoadedModel(LlamaForCausalLM(cfg).eval(), None, "tiny", "tiny", Path(".")), threads=1)


def _sides(e, seed=0, cloud_kv=None):
    """Device (2 documents), cloud (2) and union sides; ``cloud_kv``: the cloud's documents from a passage cache."""
    g = torch.Generator().manual_seed(seed)
    ctx = [torch.randint(0, 64, (int(n),), generator=g).tolist() for n in (5, 9, 7, 12)]
    scores = torch.rand(4, generator=g).tolist()
    prompt = torch.randint(0, 64, (6,), generator=g).tolist()
    cl = Side(e, ctx[2:], scores[2:], kv=cloud_kv, prefix=[len(c) for c in ctx[2:]])
    dev, uni = Side(e, ctx[:2], scores[:2]), Side(e, ctx, scores)
    for s in (dev, cl, uni):
        s.start(prompt)
    return dev, cl, uni


def test_cross_side_mixture_equals_union(tiny):
    dev, cl, uni = _sides(tiny)
    for t in [3, 17, 60, 5, 5]:
        diff = (combine([dev.dist(), cl.dist()]) - uni.dist()[1]).abs().max()
        assert float(diff) < 1e-5
        for s in (dev, cl, uni):
            s.advance(t)


def _single_sequence_union(e, ctx, scores, prompt, tokens, tau=0.05):
    """The oracle: REPLUG over the union from per-document single-sequence engine calls (no batch)."""
    rows = []
    for c in ctx:
        logits, cache = e.prefill(list(c) + list(prompt))
        seq = [logits] + [e.logits_for([t], cache)[-1] for t in tokens[:-1]]
        rows.append(torch.log_softmax(torch.stack(seq).double(), -1))  # (T, V) for this document
    lp = torch.stack(rows)  # (docs, T, V)
    tok = torch.as_tensor(tokens)
    before = torch.cumsum(lp[:, torch.arange(len(tokens)), tok], 1)
    before = torch.cat([torch.zeros(len(ctx), 1, dtype=torch.float64), before[:, :-1]], 1)
    lw = torch.tensor(scores, dtype=torch.float64)[:, None] / tau + before  # (docs, T)
    return torch.logsumexp(lw[..., None] + lp, 0) - torch.logsumexp(lw, 0)[:, None]  # (T, V)


def test_batched_sides_equal_single_sequence_union(tiny):
    """Each side prefills its documents one by one and decodes them as one batch (one model call per token); the
    cross-side mixture equals REPLUG over the union computed one document at a time on the unbatched engine."""
    g = torch.Generator().manual_seed(5)
    ctx = [torch.randint(0, 64, (int(n),), generator=g).tolist() for n in (5, 9, 7, 12, 3)]
    scores = torch.rand(5, generator=g).tolist()
    prompt = torch.randint(0, 64, (6,), generator=g).tolist()
    dev, cl = Side(tiny, ctx[:2], scores[:2]), Side(tiny, ctx[2:], scores[2:])
    calls = []
    hook = tiny.model.register_forward_hook(lambda m, a, kw_out=None: calls.append(1))
    try:
        for s in (dev, cl):
            s.start(prompt)
        assert len(calls) == 5  # one prefill pass per document (no padding to the longest), spliced into a batch
        tokens, mixed = [3, 17, 60, 5, 5, 41], []
        for t in tokens:
            mixed.append(combine([dev.dist(), cl.dist()]))
            for s in (dev, cl):
                s.advance(t)
        assert len(calls) == 5 + 2 * len(tokens)  # one decode call per side per token
    finally:
        hook.remove()
    want = _single_sequence_union(tiny, ctx, scores, prompt, tokens)
    assert float((torch.stack(mixed).double() - want).abs().max()) < 1e-5


def test_teacher_forced_score_matches_stepwise(tiny):
    _, _, uni = _sides(tiny, 1)
    toks, stepwise = [7, 1, 40, 22], []
    for t in toks:
        stepwise.append(float(uni.dist()[1][t]))
        uni.advance(t)
    got = uni.score(uni.prompt, toks)
    assert torch.allclose(got, torch.tensor(stepwise, dtype=torch.float64), atol=1e-5)


def test_rollback_restores_kv_and_scores(tiny):
    dev, _, _ = _sides(tiny, 2)
    dev.advance(4)
    before = dev.dist()
    logw = dev.logw.clone()
    for t in (9, 33, 2):
        dev.advance(t)
    dev.rollback(1)
    after = dev.dist()
    assert after[0] == pytest.approx(before[0]) and torch.equal(dev.logw, logw)
    assert float((after[1] - before[1]).abs().max()) < 1e-5
    dev.advance(50)  # decoding continues from the restored cache exactly like a fresh side
    fresh, _, _ = _sides(tiny, 2)
    fresh.advance(4)
    fresh.advance(50)
    assert float((fresh.dist()[1] - dev.dist()[1]).abs().max()) < 1e-5


def test_acceptance_rule_is_exact():
    g = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(12, generator=g) * 2, 0)
    logq = torch.log_softmax(torch.randn(12, generator=g) * 2, 0)
    assert torch.allclose(accept_distribution(logp, logq), logp.double().exp(), atol=1e-12)
    from scipy.stats import chisquare

    n = 5000
    counts = np.zeros(12)
    for _ in range(n):
        tok, _ = verify(logp, logq, draft(logq, False, g), False, g)
        counts[tok] += 1
    p = logp.double().exp().numpy()
    exp = p / p.sum() * n
    assert chisquare(counts, exp).pvalue > 0.001  # seeded: fixed outcome, loose bound against flakiness
    # the drafts alone are distributed as q, far from p: the same test rejects them
    qcounts = np.bincount([draft(logq, False, g) for _ in range(n)], minlength=12)
    assert chisquare(qcounts, exp).pvalue < 1e-6


async def _protocol(e, mode_window, sequence, seed, greedy=True, kill_after=None, first_ahead=False, max_new=12,
                    gen_seed=None, cloud_kv=None):
    """The cloud drafts, the device aggregates; ``first_ahead``: the aggregator sends its position-0 distribution
    in a ``ready`` first and the drafter decides the first token from the union itself. ``seed`` picks the
    documents and (unless ``gen_seed``) the sampling."""
    dev, cl, _ = _sides(e, seed, cloud_kv)
    seed = seed if gen_seed is None else gen_seed
    result = {}

    async def cloud(r, w):
        conn = Connection(r, w, Trace("cloud"), timeout=5)
        inbox, out = Inbox(conn, "ready" if first_ahead else None), Outcome()
        result["drafter"] = out
        if kill_after is not None:
            async def killer():
                while out.drafted < kill_after:
                    await asyncio.sleep(0.001)
                w.transport.abort()
            asyncio.create_task(killer())
        try:
            await run_drafter(cl, conn, inbox, out, max_new, mode_window, greedy, seed,
                              first=inbox.wait_preamble if first_ahead else None)
        except PeerGone:
            pass
        finally:
            drafted.set()

    drafted = asyncio.Event()  # the drafter has read the last verdict (or given up)
    server = await asyncio.start_server(cloud, "127.0.0.1", 0)
    trace = Trace("device")
    conn = await Connection.open("127.0.0.1", server.sockets[0].getsockname()[1], trace, timeout=5)
    inbox, out = Inbox(conn), Outcome()
    try:
        if first_ahead:
            logw, logq = dev.dist()
            await conn.send("ready", {"logq": logq}, logw=logw)
        await run_aggregator(dev, conn, inbox, out, max_new, greedy, seed, sequence)
        await asyncio.wait_for(drafted.wait(), 10)  # before closing: the drafter commits the last verdict
    finally:
        inbox.stop()
        await conn.close()
        server.close()
    result["tokens"], result["acc"], result["aggregator"] = out.tokens, out.accepted, out
    result["verdicts"] = sum(ev.type == "verdict" for ev in trace.events if ev.direction == "send")
    return result


@pytest.mark.parametrize("window,sequence", [(1, False), (3, False), (12, True)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_speculative_greedy_identical_to_centralized(tiny, window, sequence, seed):
    _, _, uni = _sides(tiny, seed)
    ref = local_generate(uni, 12, True, seed)
    res = asyncio.run(asyncio.wait_for(_protocol(tiny, window, sequence, seed), 60))
    assert res["tokens"] == ref
    if seed == 0:
        assert res["acc"] < len(ref)  # the sides disagree here: rejections and rollbacks were exercised


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_first_token_decided_by_the_drafter_from_the_union(tiny, seed):
    """With the aggregator's first-position distribution sent ahead, the drafter forms the union at position 0
    and commits the first token itself (no verdict for it); the answer is still centralized REPLUG's."""
    _, _, uni = _sides(tiny, seed)
    ref = local_generate(uni, 12, True, seed)
    res = asyncio.run(asyncio.wait_for(_protocol(tiny, 3, False, seed, first_ahead=True), 60))
    assert res["tokens"] == ref and res["drafter"].tokens == ref
    assert res["drafter"].decided == res["aggregator"].decided == 1
    assert res["verdicts"] == len(ref) - 1  # every later position still verified


def test_first_token_from_the_union_under_sampling():
    """Sampled: the decided first token is a draw of the union mixture p itself (χ² on 2,000 runs of the drafter's
    first step), not of the drafter's own q (which the same test rejects). A tiny model with large weights, so
    that p and q differ (total variation 0.6; the default tiny model's 0.01 is beyond the test's power)."""
    from scipy.stats import chisquare
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=256, initializer_range=0.5)
    sharp = Engine(LoadedModel(LlamaForCausalLM(cfg).eval(), None, "sharp", "sharp", Path(".")), threads=1)
    dev, cl, uni = _sides(sharp, 0)
    ahead = ({"logw": dev.dist()[0]}, {"logq": dev.dist()[1]})

    class Sink:  # the aggregator's end of the link: the first step only sends the decided token
        async def send(self, *a, **kw):
            pass

    async def first():
        return ahead

    async def draws(n):
        toks = []
        for seed in range(n):
            out = Outcome()
            await run_drafter(cl, Sink(), None, out, 1, 1, False, seed, first=first)
            toks.append(out.tokens[0])
        return toks

    n = 2000
    counts = np.bincount(asyncio.run(draws(n)), minlength=64)

    def pvalue(logp):
        p = logp.double().exp().numpy()
        big = p * n >= 5  # the rest pooled into one bin (p of the large bins sums to < 1 here)
        return chisquare(np.append(counts[big], counts[~big].sum()),
                         np.append(p[big] * n, n - (p[big] * n).sum())).pvalue

    assert pvalue(uni.dist(torch.float64)[1]) > 0.01
    assert pvalue(cl.dist(torch.float64)[1]) < 1e-6  # the test has the power to tell q from p


def test_sampled_protocol_runs_with_rejections(tiny):
    res = asyncio.run(asyncio.wait_for(_protocol(tiny, 3, False, 0, greedy=False), 60))
    assert len(res["tokens"]) == 12 and all(0 <= t < 64 for t in res["tokens"])


def test_peer_killed_mid_generation_is_an_error_not_a_hang(tiny):
    with pytest.raises(PeerGone):
        asyncio.run(asyncio.wait_for(_protocol(tiny, 3, False, 0, kill_after=2), 30))


def test_scheduler_moves_with_rtt_and_acceptance():
    s = Scheduler(rtt=0.3, t_dev=0.1, t_cloud=0.05, acc_cloud_drafts=0.9, acc_dev_drafts=0.5)
    assert s.choose() == "device"
    s.update("device", 0.3, 0.1, 0.05, 0.2)  # cloud drafts now rejected often
    s.update("device", 0.3, 0.1, 0.05, 0.2)
    assert s.choose() == "cloud"
    z = s.z()
    assert z["cloud"] < z["device"]
    assert Scheduler(fixed="device").choose() == "device"


def test_scheduler_bias_is_the_delta_z_rule_with_weight_shares():
    """Δz with acceptance a_s = 1 - (1 - w_s) D: the cloud drafts iff log W_c - log W_d > bias, for any D."""
    import math

    s = Scheduler(rtt=0.3, t_dev=0.1, t_cloud=0.05)
    for lw_gap in (-3.0, -0.2, 0.0, 0.2, 3.0):
        w_c = 1 / (1 + math.exp(-lw_gap))  # the cloud's share of the union's document weight
        for d in (0.1, 0.9):
            s.acc_cloud_drafts, s.acc_dev_drafts = 1 - (1 - w_c) * d, 1 - w_c * d
            want = s.choose()  # agg "device" = the cloud drafts
            if abs(lw_gap - s.bias()) > 0.01:  # off the (rounded) tie
                assert want == ("device" if lw_gap > s.bias() else "cloud")
    assert s.bias() < 0  # a faster cloud drafts even at a slightly lower weight
    assert Scheduler(rtt=0.3, t_dev=0.08, t_cloud=0.08).bias() == pytest.approx(0.0)


def test_scored_mixture_static_weights():
    prior = torch.tensor([0.0, 1.0], dtype=torch.float64)
    per = torch.log(torch.tensor([[0.5, 0.5], [0.1, 0.9]], dtype=torch.float64))
    got = scored_mixture(prior, per, reweight=False)
    w = torch.softmax(prior, 0)
    want = torch.log((w[:, None] * per.exp()).sum(0))
    assert torch.allclose(got, want)
    dyn = scored_mixture(prior, per, reweight=True)  # second token: weights follow the first token's likelihood
    w2 = torch.softmax(prior + per[:, 0], 0)
    assert float(dyn[1]) == pytest.approx(float(torch.log((w2 * per[:, 1].exp()).sum())))


def test_scheduler_window_covers_the_round_trip():
    s = Scheduler(t_dev=0.1, t_cloud=0.05)
    assert s.window(0.3, 4, 16) == 5  # ceil(0.3 / 0.1) + 2
    assert s.window(0.0, 4, 16) == 4  # never below the base
    assert s.window(3.0, 4, 16) == 16  # never past the answer
    assert Scheduler().window(0.3, 4, 16) == 4  # nothing measured yet


def test_inbox_preamble_taken_out_and_refusal_raised():
    from edgecloud.errors import UserError

    async def go(first, wait=False):
        async def peer(r, w):
            c = Connection(r, w, Trace("cloud"))
            await c.send(first, {"logq": torch.zeros(3)}, message="too long")
            await c.send("verdict", pos=0)

        server = await asyncio.start_server(peer, "127.0.0.1", 0)
        conn = await Connection.open("127.0.0.1", server.sockets[0].getsockname()[1], Trace("device"), timeout=5)
        inbox = Inbox(conn, "ready", lambda m: UserError(f"refused: {m['message']}"))
        try:
            if wait:  # what a drafter deciding the first token awaits: the ready and its tensors, or the refusal
                msg, tensors = await inbox.wait_preamble()
                return msg["type"], list(tensors)
            msg, _ = await inbox.get()
            return msg["type"], inbox.preamble_msg["type"]
        finally:
            inbox.stop()
            await conn.close()
            server.close()

    assert asyncio.run(asyncio.wait_for(go("ready"), 20)) == ("verdict", "ready")
    assert asyncio.run(asyncio.wait_for(go("ready", wait=True), 20)) == ("ready", ["logq"])
    for wait in (False, True):
        with pytest.raises(UserError, match="refused: too long"):
            asyncio.run(asyncio.wait_for(go("error_query", wait), 20))


def test_waiting_for_the_ready_of_a_peer_that_goes_away_is_an_error_not_a_hang():
    async def go():
        async def peer(r, w):
            w.close()

        server = await asyncio.start_server(peer, "127.0.0.1", 0)
        conn = await Connection.open("127.0.0.1", server.sockets[0].getsockname()[1], Trace("device"), timeout=5)
        inbox = Inbox(conn, "ready")
        try:
            await inbox.wait_preamble()
        finally:
            inbox.stop()
            await conn.close()
            server.close()

    with pytest.raises(PeerGone):
        asyncio.run(asyncio.wait_for(go(), 20))


def test_aggregation_exact_once_rounding_is_isolated(tiny):
    """The bench's two method-isolating gaps: from the identical per-document rows the cross-side mixture equals
    centralized REPLUG to float64 rounding; with the model in float64 the end-to-end gap (union batch vs two side
    batches) shrinks to rounding too, so what float32 shows (~1e-5 on SmolLM2) is batch-shape rounding."""
    from edgecloud.rag.bench import float64_engine, replay_gap
    from edgecloud.rag.node import RagConfig

    g = torch.Generator().manual_seed(3)
    ctx = [torch.randint(0, 64, (int(n),), generator=g).tolist() for n in (5, 9, 7, 12)]
    sc = torch.rand(4, generator=g).tolist()
    parts, toks, rc = (ctx[:2], sc[:2], ctx[2:], sc[2:]), [5, 17, 60, 3, 3, 41], RagConfig()
    g32 = replay_gap(tiny, parts, toks, rc)
    assert g32["same_rows_diff"] < 1e-12
    assert g32["max_logprob_diff"] < 1e-5
    g64 = replay_gap(float64_engine(tiny), parts, toks, rc, dtype=torch.float64)
    assert g64["same_rows_diff"] < 1e-12 and g64["max_logprob_diff"] < 1e-10


def test_drafter_reads_verdicts_while_it_computes(tiny):
    """A verdict that arrives during the drafter's decode step is committed at its arrival time and acted on when
    the step ends, not after further steps (the step runs in a worker thread; the event loop keeps reading)."""
    import time

    dev, cl, _ = _sides(tiny, 0)
    slow = cl.advance

    def advance(t):  # a 0.2 s decode step
        time.sleep(0.2)
        slow(t)

    cl.advance = advance
    sent = {}

    async def go():
        async def aggregator(r, w):
            conn = Connection(r, w, Trace("device"), timeout=5)
            m, _ = await conn.expect("draft")
            sent[0] = time.time()
            await conn.send("verdict", pos=0, token=int(m["token"]), accepted=True, done=True)
            with contextlib.suppress(PeerGone):
                await conn.recv(2)

        server = await asyncio.start_server(aggregator, "127.0.0.1", 0)
        conn = await Connection.open("127.0.0.1", server.sockets[0].getsockname()[1], Trace("cloud"), timeout=5)
        inbox, out = Inbox(conn), Outcome()
        t0 = time.time()
        try:
            await run_drafter(cl, conn, inbox, out, 12, 4, True, 0)
        finally:
            inbox.stop()
            await conn.close()
            server.close()
        return out, time.time() - t0

    out, took = asyncio.run(asyncio.wait_for(go(), 30))
    assert out.commit_times[0] - sent[0] < 0.1  # stamped on arrival, mid-step
    assert took < 0.35  # done after the one step in progress (a blocked loop would take 4 steps, 0.8 s)


def test_ttft_floor_by_aggregation_side():
    from types import SimpleNamespace

    from edgecloud.rag.bench import ttft_floor

    def ans(agg, dev, cloud, rtt=0.2):
        return SimpleNamespace(agg=agg, rtt_s=rtt, timeline={"device_prefilled_s": dev, "cloud_ready_s": cloud})

    assert ttft_floor(ans("device", 1.5, 1.2)) == pytest.approx(1.5)  # the cloud's first draft is already there
    assert ttft_floor(ans("device", 1.0, 1.2)) == pytest.approx(1.3)  # waits for it: ready + rtt/2
    # aggregating in the cloud, its ready carries the first-position distribution: the same floor, no round trip
    assert ttft_floor(ans("cloud", 1.5, 1.2)) == pytest.approx(1.5)
    assert ttft_floor(ans("cloud", 1.0, 1.4)) == pytest.approx(1.5)
    assert ttft_floor(SimpleNamespace(agg="device", rtt_s=0.0, timeline={})) is None


# ---------------------------------------------------------------- the cloud's passage KV cache
def _kv_engine(e, fp="tiny-a"):
    """``e`` under a model fingerprint (PassageKV keys by it)."""
    from dataclasses import replace

    return Engine(replace(e.lm, fingerprint=fp), threads=1)


def test_passage_cache_is_exact_and_keyed(tiny):
    """Documents whose passage prefix comes from the cache give the same per-document distributions, mixture and
    document scores as a full prefill (to 1e-5 in log-probability), through decode steps and a rollback; a second
    question over the same passage hits, another passage text or another model fingerprint misses."""
    from edgecloud.rag.prefix import PassageKV

    e = _kv_engine(tiny)
    g = torch.Generator().manual_seed(3)
    ctx = [torch.randint(0, 64, (int(n),), generator=g).tolist() for n in (30, 41)]
    scores = [0.3, 0.5]
    kv = PassageKV(e, 1 << 20)
    for question in ([7, 8, 9], [11, 12]):
        seqs = [c + question for c in ctx]
        full = Side(e, seqs, scores)
        cached = Side(e, seqs, scores, kv=kv, prefix=[len(c) for c in ctx])
        for s in (full, cached):
            s.start([])
        for t in [3, 17, 60, 5]:
            assert float((full.logp - cached.logp).abs().max()) < 1e-5
            assert float((full.dist()[1] - cached.dist()[1]).abs().max()) < 1e-5
            for s in (full, cached):
                s.advance(t)
        for s in (full, cached):
            s.rollback(1)
            s.advance(44)
        assert float((full.logp - cached.logp).abs().max()) < 1e-5
        assert local_generate(full, 6, True, 0, 2, [3, 44]) == local_generate(cached, 6, True, 0, 2, [3, 44])
    assert kv.stats["misses"] == 2 and kv.stats["hits"] == 2  # second question: both passages from the cache
    edited = [ctx[0][:-1] + [(ctx[0][-1] + 1) % 64]]
    assert kv.key(edited[0]) != kv.key(ctx[0])
    kv.kv(edited[0])
    assert kv.stats["misses"] == 3  # an edited passage is another entry, never the stale one
    other = PassageKV(_kv_engine(tiny, "tiny-b"), 1 << 20)
    assert other.key(ctx[0]) != kv.key(ctx[0])  # keys carry the model fingerprint


def test_passage_cache_respects_its_byte_budget(tiny):
    from edgecloud.rag.prefix import PassageKV

    e = _kv_engine(tiny)
    per_token = 2 * e.n_layers * e.config.num_key_value_heads * 16 * 4  # K and V, fp32, head_dim 16
    kv = PassageKV(e, 50 * per_token)
    g = torch.Generator().manual_seed(4)
    passages = [torch.randint(0, 64, (20,), generator=g).tolist() for _ in range(6)]
    kv.precompute(passages)
    assert kv.bytes_used <= 50 * per_token and kv.bytes_used == 40 * per_token  # two 20-token entries fit
    assert kv.store.stats["evictions"] == 4
    kv.kv(passages[-1])
    assert kv.stats["hits"] == 1  # the most recent survive (LRU)
    kv.kv(passages[0])
    assert kv.stats["misses"] == 7
    with pytest.raises(UserError, match="budget"):
        PassageKV(e, 0)


@pytest.mark.parametrize("seed", [0, 1])
def test_greedy_protocol_with_cached_cloud_identical_to_centralized(tiny, seed):
    """The cloud side prefilling from its passage cache: DRAGON's greedy output is still centralized REPLUG's."""
    from edgecloud.rag.prefix import PassageKV

    e = _kv_engine(tiny)
    _, _, uni = _sides(e, seed)
    ref = local_generate(uni, 12, True, seed)
    kv = PassageKV(e, 1 << 20)
    res = asyncio.run(asyncio.wait_for(_protocol(e, 3, False, seed, cloud_kv=kv), 60))
    assert res["tokens"] == ref
    assert kv.stats["misses"] == 2 and kv.stats["tokens_reused"] == 0
