"""The CLI contract: JSON keys, and one clear line (no traceback) with a non-zero exit on bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest


def run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "edgecloud.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_evaluate_json_keys(trace, tmp_path):
    starts = tmp_path / "starts.npy"
    np.save(starts, np.array([72412, 73551, 97066]))
    r = run("vmsched", "evaluate", "--policy", "first-fit", "--split", str(starts), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    for k in ("policy", "n_pms", "split", "episodes", "trimmed_mean", "mean", "p50", "p90", "p99"):
        assert k in out
    assert out["episodes"] == 3 and out["n_pms"] == 5
    assert out["mean"] == pytest.approx((1775535 + 2691967 + 6767) / 3, abs=1e-3)


def test_flex_writes_table_and_plot(trace, tmp_path):
    starts = tmp_path / "starts.txt"
    starts.write_text("72412\n73551\n97066\n")
    r = run("vmsched", "flex", "--split", str(starts), "--pms-min", "2", "--pms-max", "3", "--out", str(tmp_path / "f"),
            "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    rows = out["rows"]
    assert [row["n_pms"] for row in rows] == [2, 3] and out["policies"] == ["first-fit", "balance-fit"]
    assert all(isinstance(row[p], float) for row in rows for p in out["policies"])
    assert "commit" in out["provenance"]  # through edgecloud.results, like the files below
    on_disk = json.loads((tmp_path / "f" / "flex.json").read_text())
    assert on_disk["rows"] == rows and "commit" in on_disk["provenance"]
    assert (tmp_path / "f" / "flex.png").stat().st_size > 1000
    assert "| n_pms | first-fit | balance-fit |" in (tmp_path / "f" / "flex.md").read_text()
    assert (tmp_path / "f" / "flex.csv").read_text().startswith("n_pms,first-fit,balance-fit")


@pytest.mark.parametrize("args,match", [
    (["vmsched", "evaluate", "--policy", "fastest-fit", "--split", "valid"], "unknown policy 'fastest-fit'"),
    (["vmsched", "evaluate", "--pms", "0", "--split", "valid"], "'--pms': Input should be greater than or equal to 1"),
    (["vmsched", "evaluate", "--split", "/no/such/file.npy"], "neither test, valid, select, outside"),
    (["vmsched", "evaluate", "--trace", "/no/such/trace.csv"], "trace file not found: looked at /no/such/trace.csv"),
])
def test_bad_input_is_one_clear_line(trace, args, match):
    r = run(*args)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert match in " ".join(r.stderr.split())


def test_start_past_end_of_trace(trace, tmp_path):
    f = tmp_path / "s.txt"
    f.write_text(f"{len(trace) - 3}\n")
    r = run("vmsched", "evaluate", "--split", str(f))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "end of the trace" in " ".join(r.stderr.split())


def test_malformed_trace_via_cli(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("vmid,cpu,mem,at,lt\n0,1,2,0,5\n1,1,2,oops,5\n")
    r = run("vmsched", "evaluate", "--trace", str(p), "--split", "valid")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "line 3, field 'at'" in " ".join(r.stderr.split())
