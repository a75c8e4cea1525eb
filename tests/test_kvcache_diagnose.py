"""The issue-19 diagnosis: linker variants' masks, anchored chunk KV's exactness, and the first-token classifier."""

from __future__ import annotations

import torch

from edgecloud.kvcache.diagnose import Boundary, Recent, anchored_kv, classify, summarize_variants, variants
from edgecloud.kvcache.mpic import Segment, link
from edgecloud.kvcache.selection import LinkContext, MPICk
from tests.test_kvcache_mpic import full_logits, prompt, tiny_engine


def _ctx(n: int, spans, text):
    is_text = torch.zeros(n, dtype=torch.bool)
    is_text[text[0]:text[1]] = True
    return LinkContext(None, is_text, spans, None, None, None)


def test_boundary_and_recent_masks_add_only_their_tokens():
    ctx = _ctx(60, [(0, 7), (7, 27), (27, 52)], (52, 60))  # system chunk, two passages, the question
    base = set(MPICk(4)(ctx).nonzero().squeeze(1).tolist())
    assert base == {*range(7, 11), *range(27, 31), *range(52, 60)}
    bnd = set(Boundary(4, 3)(ctx).nonzero().squeeze(1).tolist())
    assert bnd - base == {24, 25, 26}  # the end of passage 1 (never the system chunk at position 0)
    rec = set(Recent(4, 5)(ctx).nonzero().squeeze(1).tolist())
    assert rec - base == {47, 48, 49, 50, 51}  # the last passage's end, right before the question


def test_anchored_kv_makes_the_passage_behind_the_head_exact():
    """A passage computed behind the system prompt and re-rotated is, placed right after it, its in-context KV: with
    nothing recomputed the linker gives full prefill's logits; stand-alone KV does not (the test can fail)."""
    e = tiny_engine()
    head, a, _, q = prompt()
    segs = [head, a, q]
    ref, _ = full_logits(e, segs)
    plain = {0: e.kv_of(ids=head.ids), 1: e.kv_of(ids=a.ids)}
    anch = {0: plain[0], 1: anchored_kv(e, head.ids, a.ids)}
    assert torch.allclose(link(e, segs, anch, MPICk(0)).logits, ref, atol=1e-4)
    assert not torch.allclose(link(e, segs, plain, MPICk(0)).logits, ref, atol=1e-3)


def test_classify_splits_copies_of_a_passage_opening():
    segs = [Segment("chunk", [1, 2]), Segment("chunk", [7, 8]), Segment("chunk", [9, 3]), Segment("text", [4])]
    reqs = [type("R", (), {"segments": segs})()] * 3
    rows = [{"source": "passkey", "ref_token": 9, "methods": {"mpic-32": {"agree": False}}},
            {"source": "passkey", "ref_token": 5, "methods": {"mpic-32": {"agree": True}}},
            {"source": "passkey", "ref_token": 1, "methods": {"mpic-32": {"agree": True}}}]  # 1 opens the system
    c = classify(rows, reqs)
    assert c["passkey: copies a passage opening"] == {"n": 1, "agree": 0, "agreement": 0.0}
    assert c["passkey: other"]["n"] == 2 and c["passkey"]["agree"] == 2


def test_variants_run_against_full_prefill_on_a_tiny_workload():
    from edgecloud.kvcache.bench import BenchConfig, make_workload
    from tests.test_kvcache_qa import _tiny_items, _tiny_text_engine

    e = _tiny_text_engine()
    reqs = make_workload(e, BenchConfig(groups=0, passkey=0, min_chunks=3, max_chunks=3), items=_tiny_items())
    rows = variants(e, reqs, k=2)
    s = summarize_variants(rows)
    assert set(s) == {"mpic-2", "mpic-4", "mpic-2+boundary-16", "mpic-2+recent-16", "anchored mpic-2"}
    assert all(v["n"] == 3 and 0 <= v["agreement"] <= 1 and v["kl_first"] >= 0 for v in s.values())


def test_answers_on_misses_decodes_only_the_disagreements():
    from edgecloud.kvcache.bench import BenchConfig, make_workload
    from edgecloud.kvcache.diagnose import answers_on_misses, opens_first_passage
    from tests.test_kvcache_qa import _tiny_items, _tiny_text_engine

    e = _tiny_text_engine()
    reqs = make_workload(e, BenchConfig(groups=0, passkey=0, min_chunks=3, max_chunks=3), items=_tiny_items())
    first = reqs[0].segments[1].ids[0]
    rows = [{"source": "squad", "ref_token": first, "methods": {"mpic-2": {"agree": a}}} for a in (True, False, True)]
    got = answers_on_misses(e, rows, reqs, k=2, tokens=3)
    assert len(got) == 1 and got[0]["gold"] == ["w5"] and isinstance(got[0]["full_correct"], bool)
    assert opens_first_passage(reqs[0].segments, first) and not opens_first_passage(reqs[0].segments, -1)
