"""The VaLoRA bench's load: closed-loop saturation, the rate calibrated from the unmerged engine's capacity, the
start-up cost model, and the single-call mixture side path (exact, including rows without an adapter)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from test_lora_atmm import tiny_engine

from edgecloud.errors import UserError
from edgecloud.llm.batch import Batch
from edgecloud.lora import bench
from edgecloud.lora.adapters import random_adapter
from edgecloud.lora.layer import LoRAModel
from edgecloud.lora.orchestrator import Policy, Request, serve


def _lora(n=4):
    e = tiny_engine()
    lm = LoRAModel(e.model, "tiny")
    names = [f"a{i}" for i in range(n)]
    for i, a in enumerate(names):
        lm.add(random_adapter(e.model, "tiny", a, rank=4, seed=i, scale=0.5))
    return e, lm, names


def test_closed_loop_keeps_clients_outstanding():
    """Closed loop: the first `clients` requests arrive at 0, every later one exactly when an earlier one finishes,
    never more than `clients` outstanding; fixed output length (EOS ignored)."""
    e, lm, names = _lora()
    g = torch.Generator().manual_seed(1)
    reqs = [Request(i, names[i % 4], torch.randint(1, 100, (4,), generator=g).tolist(), 99.0 + i, 4,
                    ignore_eos=True) for i in range(10)]
    with torch.inference_mode():
        res = serve(e, lm, reqs, Policy("slora", max_batch=3), clients=3)
    done = sorted(res["requests"], key=lambda r: r.id)
    assert [r.id for r in done] == list(range(10)) and all(len(r.tokens) == 4 for r in done)
    assert [r.arrival for r in done[:3]] == [0.0] * 3
    ends = [r.arrival + r.latency for r in done]
    for r in done[3:]:  # released by a completion, in list order
        assert min(abs(r.arrival - t) for t in ends) < 1e-6 and r.arrival > 0
    assert [r.arrival for r in done[3:]] == sorted(r.arrival for r in done[3:])
    for t in [r.arrival for r in done]:  # outstanding at each arrival instant (half-open [arrival, end))
        assert sum(r.arrival <= t < r.arrival + r.latency - 1e-9 for r in done) <= 3
    with pytest.raises(ValueError, match="clients"):
        serve(e, lm, reqs[:2], Policy("slora"), clients=0)


def test_rate_is_load_times_unmerged_saturation(monkeypatch):
    """Per skew, the offered rate = load × the closed-loop capacity of the *unmerged batched* engine (S-LoRA-like,
    `clients` outstanding) on that skew's request mix, measured first — not of a single batch or of sequential."""
    seen = []

    def fake_sat(engine, lora, reqs, policy, table, clients):
        seen.append((policy.name, clients, len(reqs)))
        rps = {"slora": 5.0, "sequential": 1.0}.get(policy.name, 4.0)
        return {"tok_s": 16 * rps, "req_s": rps, "wall_s": len(reqs) / rps, "requests": len(reqs), "mode_steps": {}}

    rates = []

    def fake_serve(engine, lora, reqs, policy, table=None, clients=None):
        assert clients is None and all(r.ignore_eos and r.max_new_tokens == 16 for r in reqs)
        rates.append(len(reqs) / reqs[-1].arrival)
        for r in reqs:
            r.latency, r.tokens = 1.0, [0] * 16
        return {"wall_s": 10.0, "requests": reqs, "switch_s": [], "mode_steps": {}}

    monkeypatch.setattr(bench, "saturation", fake_sat)
    monkeypatch.setattr(bench, "serve", fake_serve)
    monkeypatch.setattr("edgecloud.llm.batch.generate_batch", lambda *a, **k: None)
    cfg = bench.BenchConfig(load=0.7, requests=400, skews=(0.8,))
    out = bench.run(cfg, SimpleNamespace(encode=lambda s: [1, len(s)]), SimpleNamespace(seq_adapter={}),
                    [f"n{i}" for i in range(16)], None, log=lambda s: None)
    assert seen[0] == ("slora", 16, 48) and len(seen) == 5  # the unmerged engine first, then every policy
    assert out["calibration"]["0.8"]["rate_req_s"] == pytest.approx(3.5)
    assert len(rates) == 5 and all(r == pytest.approx(3.5, rel=0.15) for r in rates)  # Poisson at that rate


def test_saturation_counts_every_token():
    e, lm, names = _lora()
    reqs = [Request(i, names[i % 4], [5, 6, 7 + i], 0.0, 3, ignore_eos=True) for i in range(6)]
    with torch.inference_mode():
        s = bench.saturation(e, lm, reqs, Policy("punica", max_batch=4), None, clients=4)
    assert s["requests"] == 6 and s["tok_s"] * s["wall_s"] == pytest.approx(18)
    assert s["req_s"] * s["wall_s"] == pytest.approx(6) and sum(s["mode_steps"].values()) > 0
    assert all(r.tokens == [] for r in reqs)  # the caller's requests are copied, not consumed


@pytest.mark.parametrize("field,value", [("load", 1.0), ("load", 0.0), ("max_new_tokens", 0), ("clients", 0)])
def test_bench_config_rejects(field, value):
    with pytest.raises(UserError, match=field):
        bench.BenchConfig(**{field: value})


def test_policy_costs_from_measured_steps():
    c = bench.policy_costs({"none_step_ms": 100.0, "unmerged_step_ms": 120.0, "mixture_step_ms": 110.0}, 30.0)
    assert c == pytest.approx({"mixture_cost": 0.5, "switch_cost": 1.5})
    c = bench.policy_costs({"none_step_ms": 100.0, "unmerged_step_ms": 104.0, "mixture_step_ms": 90.0}, 0.01)
    assert c == pytest.approx({"mixture_cost": 0.05, "switch_cost": 0.05})  # noise: floored, never zero
    c = bench.policy_costs({"none_step_ms": 100.0, "unmerged_step_ms": 99.0, "mixture_step_ms": 90.0}, 1.0)
    assert c == {"mixture_cost": 0.74, "switch_cost": 0.66, "fallback": True}


@torch.inference_mode()
def test_mixture_is_one_exact_side_path():
    """Hot adapter merged, rows of another adapter and of no adapter: one ATMM call per wrapped layer, and each
    row equals x W0 + x ΔW_row (ΔW_none = 0)."""
    e, lm, names = _lora()
    rows = ["h", "o", "n"]
    lm.seq_adapter = {"h": names[0], "o": names[2], "n": None}
    x = torch.randn(3, 1, 64, generator=torch.Generator().manual_seed(0))
    lin_name = next(iter(lm.layers))
    layer = lm.layers[lin_name]
    W0 = layer.base.weight.detach().clone()
    lm.merge(names[0])
    lm.calls.clear()
    b = Batch(e)
    with bench_rows(b, rows):
        y = layer(x)
    assert sum(lm.calls.values()) == 1
    for i, a in enumerate([names[0], names[2], None]):
        ref = x[i, 0] @ W0.T
        if a is not None:
            A, B = lm.adapters[a].weights[lin_name]
            ref = ref + (x[i, 0] @ A) @ B
        torch.testing.assert_close(y[i, 0], ref, atol=1e-5, rtol=1e-5)
    lm.merge(None)


def bench_rows(batch, rows):
    from edgecloud.llm import batch as batch_mod

    return batch_mod._rows(rows)


def test_mode_step_costs_runs_every_mode_and_restores():
    e, lm, names = _lora()
    e.encode = lambda s: [3, 4, 5, len(s) % 50]
    c = bench.mode_step_costs(bench.BenchConfig(clients=5), e, lm, names, None, rounds=2)
    assert set(c) == {"none_step_ms", "unmerged_step_ms", "mixture_step_ms"} and min(c.values()) > 0
    assert lm.merged is None and not lm.original and lm.seq_adapter == {}


def _bench_script():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("valora_bench", Path(__file__).parents[1] / "bench/valora.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _part(seed, skew):
    """A part result as bench/valora.py writes it, with latencies/throughputs that depend on (seed, skew, policy)."""
    pols = ("sequential", "slora", "punica", "dlora", "valora")
    x = seed + (0.9 if skew == "zipf" else float(skew))
    return {"provenance": {"seed": seed, "commit": f"c{seed}{skew}", "wall_s": 300.0}, "skews": [skew],
            "calibration": {str(skew): {"rate_req_s": x}}, "valora_cost_model": {"mixture_cost": x},
            "mode_step_ms": {"none_step_ms": x},
            "runs": {f"{skew}/{p}": {"mean_latency_s": 2 + x + 0.3 * j, "throughput_tok_s": 10 + x * j}
                     for j, p in enumerate(pols)},
            "saturation": {f"{skew}/{p}": {"tok_s": 20 + x * j} for j, p in enumerate(pols)},
            "modes_match_reference": True, "chooser_vs_oracle": 1.03, "adapters": 16, "requests": 60,
            "max_new_tokens": 16, "switch_cost": {}, "paper_latency_ratio_vs_baselines": [0.11, 0.8],
            "adapter_names": ["a"], "load": 0.7, "clients": 16, "sat_requests": 48, "slo_s": 2.0}


def test_combine_takes_an_earlier_report_as_input(tmp_path):
    """Adding skews to a combined report (without its parts) gives exactly the report of all parts at once, keeps
    every part's provenance, and a (seed, skew) given twice is a UserError naming it."""
    import json

    vb = _bench_script()

    def files(specs):
        out = []
        for seed, skew in specs:
            f = tmp_path / f"p{seed}_{skew}.json"
            f.write_text(json.dumps(_part(seed, skew)))
            out.append(f)
        return out

    old = [(0, 0.2), (1, 0.2), (0, 0.8), (1, 0.8)]
    new = [(0, 0.5), (0, "zipf")]
    report, _ = vb.combine(files(old))
    (tmp_path / "report.json").write_text(json.dumps(report | {"provenance": {"seed": 0}}))
    grown, seed = vb.combine([tmp_path / "report.json", *files(new)])
    at_once, _ = vb.combine(files(old + new))
    assert seed == 0 and grown == at_once
    assert grown["skews"] == ["0.2", "0.5", "0.8", "zipf"]
    assert {(m["seed"], str(m["skews"][0]), m["commit"]) for m in grown["parts"]} == {
        (s, str(k), f"c{s}{k}") for s, k in old + new}
    assert grown["per_seed"]["mean_latency_ratio_vs_best_baseline"]["0.8"].keys() == {"0", "1"}
    with pytest.raises(UserError, match="seed 1 skew 0.8"):
        vb.combine([tmp_path / "report.json", *files([(1, 0.8)])])
