"""Every serving policy returns, per request, exactly the tokens the request gets alone; CLI bad input exits 2."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from test_lora_atmm import tiny_engine

from edgecloud.llm.batch import generate_batch
from edgecloud.lora.adapters import random_adapter
from edgecloud.lora.layer import LoRAModel
from edgecloud.lora.orchestrator import POLICIES, Policy, Request, serve, summarize
from edgecloud.lora.tasks import CLASSES, TASKS, _split, examples, score, speeches, topic_labels


@pytest.mark.parametrize("policy", POLICIES)
def test_policies_equal_unbatched(policy):
    e = tiny_engine()
    lm = LoRAModel(e.model, "tiny")
    names = [f"a{i}" for i in range(4)]
    for i, n in enumerate(names):
        lm.add(random_adapter(e.model, "tiny", n, rank=4, seed=i, scale=0.5))
    g = torch.Generator().manual_seed(3)
    reqs = [Request(i, names[0] if i % 3 else names[1 + i % 3], torch.randint(1, 100, (3 + i % 4,), generator=g)
                    .tolist(), 0.002 * i, 5) for i in range(10)]
    with torch.inference_mode():
        ref = {}
        for r in reqs:
            lm.seq_adapter = {0: r.adapter}
            ref[r.id] = generate_batch(e, [r.prompt], 5)[0].tokens
        res = serve(e, lm, reqs, Policy(policy, max_batch=4), table=None)
    assert {r.id: r.tokens for r in res["requests"]} == ref
    s = summarize(res, slo_s=10.0)
    assert s["requests"] == 10 and s["throughput_tok_s"] > 0
    if policy == "valora":
        assert s["switches"] >= 1  # a hot adapter (2/3 of requests) gets merged
    assert lm.merged is None and not lm.original


def test_tasks_have_held_out_splits():
    for t in TASKS:
        tr, te = examples(t, "train", 20), examples(t, "test", 20)
        assert tr != te and all(score(e.answer, e) == 1.0 for e in te)
        if t in CLASSES:
            assert {e.answer for e in tr + te} <= set(CLASSES[t]())
    for items in [*speeches().values(), *topic_labels().values()]:  # real text: held out by source item
        train, test = _split(items, "train"), _split(items, "test")
        assert len(train) + len(test) == len(items) and not set(train) & set(test) and test


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "edgecloud", "lora", *args], capture_output=True, text=True,
                          timeout=120)


def test_cli_bad_input(tmp_path):
    r = _cli("train", "--out", str(tmp_path / "x"), "--task", "nope")
    assert r.returncode == 2 and "--task" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    bad = tmp_path / "t.json"
    bad.write_text("{")
    r = _cli("bench", "--quick", "--table", str(bad))
    assert r.returncode == 2 and "lora profile" in r.stderr
    r = _cli("serve", "--adapters", str(tmp_path / "none"))
    assert r.returncode == 2 and "--adapters" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_valora_picks_cheapest_mode():
    """The orchestrator's cost model: merged once every row is hot, unmerged while a fresh other row has most of
    its tokens left, mixture when the other row is about to end (cheaper than two switches)."""
    from edgecloud.lora.orchestrator import mode_costs

    p = Policy("valora", mixture_cost=1.6, switch_cost=1.4)  # mixture dearer than unmerged (two side paths)

    def req(a, left):
        return Request(0, a, [1], 0.0, max_new_tokens=8, tokens=[0] * (8 - left))

    def pick(rows, merged):
        c = mode_costs(rows, merged, "h", p)
        return min(c, key=lambda m: (c[m], m != merged))

    hot = [req("h", 8) for _ in range(5)]
    assert pick(hot, None) == "h" and pick(hot, "h") == "h"
    assert pick(hot + [req("x", 8)], None) is None  # mixture (1.6 × 8) + a switch > unmerged (8)
    assert pick(hot + [req("x", 8)], "h") is None   # unmerge (8 + 1.4) < staying in mixture (12.8)
    assert pick(hot + [req("x", 1)], "h") == "h"    # the other row ends next step: stay in mixture
    c = mode_costs(hot + [req("x", 3)], "h", "h", p)
    assert c == {None: 8 + p.switch_cost, "h": p.mixture_cost * 3}
    cheap = Policy("valora", mixture_cost=0.74, switch_cost=0.66)  # one rank-2r path, cheaper than unmerged

    def pick2(rows, merged):
        c = mode_costs(rows, merged, "h", cheap)
        return min(c, key=lambda m: (c[m], m != merged))

    assert pick2(hot + [req("x", 8)], None) == "h"   # merge and serve x in mixture: 0.74 × 8 + 0.66 < 8
    assert pick2(hot + [req("x", 8)], "h") == "h"
