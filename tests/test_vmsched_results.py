"""vmsched's shared ground: heuristics import no torch, one policy registry, and every --json report and result file
goes through edgecloud.results (provenance with the commit)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from edgecloud.errors import UserError


def run(*args):
    return subprocess.run([sys.executable, "-m", "edgecloud.cli", *args], capture_output=True, text=True, timeout=300)


def test_heuristics_import_no_torch():
    code = ("import sys, edgecloud.vmsched.policies as p, edgecloud.vmsched.evaluate, edgecloud.vmsched.batched; "
            "p.make_policy('balance-fit'); p.make_policy('random', seed=1); assert 'torch' not in sys.modules, 'torch'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_learned_policies_join_the_one_registry():
    from edgecloud.vmsched import policies

    names = policies.policy_names()
    for n in ("first-fit", "balance-fit", "spane", "spane-paper", "spane-numa", "mlpdqn", "mlpaug",
              "checkpoint:..."):
        assert n in names
    assert policies.make_policy("SPANE-NUMA", n_pms=3).name == "spane-numa"  # case-insensitive, any N
    with pytest.raises(UserError, match="unknown policy 'nope'.*spane.*checkpoint:"):
        policies.make_policy("nope")

    class Always0:
        name = "always-0"

        def __call__(self, d):
            return np.zeros(len(d.cpu), np.int64)

    policies.register_policy("always-0", lambda name, seed, n_pms: Always0())
    try:
        assert policies.make_policy("Always-0").name == "always-0"
    finally:
        policies._NAMES.pop("always-0")


def _provenance_ok(out: dict) -> None:
    prov = out["provenance"]
    assert len(prov["commit"]) == 40 or prov["commit"] == "unknown"
    assert "vmsched" in prov["command"] and prov["seed"] == 0


def test_evaluate_json_has_one_shape_and_provenance(trace, tmp_path):
    starts = tmp_path / "starts.txt"
    starts.write_text("72412\n73551\n97066\n")
    keys = ("policy", "n_pms", "split", "episodes", "trimmed_mean", "mean", "p50", "p90", "p99")
    one = run("vmsched", "evaluate", "-p", "first-fit", "--split", str(starts), "--json")
    two = run("vmsched", "evaluate", "-p", "first-fit", "-p", "balance-fit", "--split", str(starts), "--json")
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    a, b = json.loads(one.stdout), json.loads(two.stdout)
    for out in (a, b):
        _provenance_ok(out)
        assert all(k in out for k in keys) and out["policy"] == "first-fit"  # the first policy at the top level
        assert [set(keys) <= set(r) for r in out["rows"]] == [True] * len(out["rows"])
    assert [r["policy"] for r in b["rows"]] == ["first-fit", "balance-fit"]
    assert b["rows"][0] == a["rows"][0] and a["mean"] == pytest.approx((1775535 + 2691967 + 6767) / 3, abs=1e-3)


def test_probe_cache_key_follows_the_code(trace, tmp_path, monkeypatch):
    """A cached probe result is served only to the same code: another code version misses the cache."""
    from edgecloud.vmsched import evaluate as ev
    from edgecloud.vmsched.cluster import ClusterConfig

    monkeypatch.setenv("EDGECLOUD_CACHE", str(tmp_path))
    starts = np.array([72412, 73551])
    calls = []
    real = ev.episode_lengths
    monkeypatch.setattr(ev, "episode_lengths", lambda *a: calls.append(1) or real(*a))
    first = ev.cached_episode_lengths(trace, ClusterConfig(), starts)
    again = ev.cached_episode_lengths(trace, ClusterConfig(), starts)
    assert len(calls) == 1 and first.tolist() == again.tolist() == [927, 574]
    ev.probe_code_version.cache_clear()
    monkeypatch.setattr(ev, "probe_code_version", lambda: "another-version")
    ev.cached_episode_lengths(trace, ClusterConfig(), starts)
    assert len(calls) == 2  # a code change recomputes instead of serving the old lengths
