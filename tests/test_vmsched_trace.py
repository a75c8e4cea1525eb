"""Trace and split loading, with the clear errors that bad files get."""

from __future__ import annotations

import numpy as np
import pytest

from edgecloud.errors import UserError
from edgecloud.vmsched.trace import load_event_trace, load_starts, load_trace

HEADER = "vmid,cpu,mem,at,lt\n"


def write(tmp_path, text, name="t.csv"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_real_trace(trace):
    assert len(trace) == 116_313
    assert trace.at[0] == 0 and trace.at[-1] == 2_678_081
    assert np.all(np.diff(trace.at) >= 0) and trace.lt.min() >= 1


def test_lifetime_form_roundtrip(tmp_path):
    t = load_trace(write(tmp_path, HEADER + "0,1,2,0,5\n1,4,16,3.0,7.0\n"))
    assert t.cpu.tolist() == [1, 4] and t.mem.tolist() == [2, 16] and t.lt.tolist() == [5, 7]


@pytest.mark.parametrize("text,match", [
    ("vmid,cpu,at,lt\n0,1,0,5\n", "missing column.*mem"),
    (HEADER + "0,1,2,0,5\n1,x,2,1,5\n", "line 3, field 'cpu'.*not a number"),
    (HEADER + "0,1,2,0,5\n1,1,nan,1,5\n", "line 3, field 'mem'.*finite"),
    (HEADER + "0,1,2,0,0.5\n", "line 2, field 'lt'.*lifetime 0.5 < 1"),
    (HEADER + "0,1,2,9,5\n1,1,2,3,5\n", "line 3, field 'at'.*sort the trace"),
    (HEADER + "0,1,2,0\n", "line 2: expected 5 fields"),
    (HEADER, "no rows"),
    ("", "empty"),
])
def test_malformed_lifetime_traces(tmp_path, text, match):
    with pytest.raises(UserError, match=match):
        load_trace(write(tmp_path, text))


def test_missing_trace_says_where_and_how(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGECLOUD_DATA", str(tmp_path))
    with pytest.raises(UserError, match=f"looked at {tmp_path}.*SPANE.*CC BY-NC"):
        load_trace()


def test_event_form(tmp_path):
    text = "vmid,cpu,memory,time,type\n7,1,2,0,0\n8,2,4,5,0\n7,1,2,10,1\n9,1,1,6,0\n9,1,1,20,1\n"
    p = write(tmp_path, text)
    t = load_trace(p)  # dispatch by header
    assert t.vmid.tolist() == [7, 9] and t.at.tolist() == [0, 6] and t.lt.tolist() == [10, 14]
    t = load_event_trace(p, horizon=100)  # never-deleted VM 8 kept until the horizon
    assert t.vmid.tolist() == [7, 8, 9] and t.lt.tolist() == [10, 95, 14]


@pytest.mark.parametrize("text,match", [
    ("vmid,cpu,memory,time,type\n1,1,1,0,3\n", "field 'type'"),
    ("vmid,cpu,memory,time,type\n1,1,1,0,0\n1,1,1,2,0\n", "created twice"),
    ("vmid,cpu,memory,time,type\n1,1,1,5,0\n1,1,1,5,1\n", "lifetimes must be >= 1"),
])
def test_malformed_event_traces(tmp_path, text, match):
    with pytest.raises(UserError, match=match):
        load_event_trace(write(tmp_path, text))


def test_splits(trace, tmp_path):
    assert load_starts("test", len(trace)).shape == (1000,)
    assert load_starts("valid", len(trace)).shape == (150,)
    np.save(tmp_path / "s.npy", np.array([1, 2, 3]))
    assert load_starts(tmp_path / "s.npy").tolist() == [1, 2, 3]
    assert load_starts(write(tmp_path, "5\n6\n", "s.txt")).tolist() == [5, 6]
    with pytest.raises(UserError, match="neither test, valid, select, outside"):
        load_starts(tmp_path / "missing.npy")
    with pytest.raises(UserError, match="past the end of the trace"):
        load_starts(write(tmp_path, "5\n999999\n", "far.txt"), len(trace))
    with pytest.raises(UserError, match="non-negative integers"):
        load_starts(write(tmp_path, "1.5\n", "frac.txt"))


def test_our_splits_use_rows_no_public_split_starts_at(trace):
    """select: 600 starts in [50000, 70000) outside SPANE's validation starts; outside: 300 in [110000, 113000),
    past the test range. Both seeded (the same rows every time) and without repeats."""
    valid, test = load_starts("valid", len(trace)), load_starts("test", len(trace))
    sel, out = load_starts("select", len(trace)), load_starts("outside", len(trace))
    assert sel.shape == (600,) and out.shape == (300,)
    assert len(np.unique(sel)) == 600 and len(np.unique(out)) == 300
    assert sel.min() >= 50_000 and sel.max() < 70_000 and out.min() >= 110_000 and out.max() < 113_000
    assert not set(sel) & set(valid) and not set(sel) & set(test) and not set(out) & set(test)
    np.testing.assert_array_equal(sel, load_starts("select"))
    with pytest.raises(UserError, match="split 'outside' needs starts up to row 113000"):
        load_starts("outside", 5_000)
