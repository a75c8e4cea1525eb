"""The results layer: provenance present, files written together and atomically, bad output paths caught early."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from edgecloud.errors import UserError
from edgecloud.results import Result, check_out_dir, check_out_file, code_key, markdown_table, report


def test_result_writes_json_md_png_with_provenance(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([1, 2], [3, 4])
    r = Result("demo", {"x": 1.5, "bad": float("nan")}, seed=7)
    r.table([{"m": "ours", "v": 0.123456}, {"m": "base", "v": None}])
    r.figure = fig
    paths = r.write(tmp_path / "out")
    doc = json.loads(paths["json"].read_text())
    assert doc["x"] == 1.5 and doc["bad"] is None  # strict JSON: NaN becomes null
    prov = doc["provenance"]
    for k in ("commit", "command", "seed", "versions", "cpu", "cpu_count", "torch_threads", "wall_s"):
        assert k in prov
    assert prov["seed"] == 7 and len(prov["commit"]) in (40, 7)  # a sha, or "unknown" outside a checkout
    md = paths["md"].read_text()
    assert "| ours | 0.1235 |" in md and "| base | — |" in md and "![demo](demo.png)" in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temp files left


def test_report_is_one_json_line_with_provenance():
    line = report({"k": 1}, seed=3)
    assert "\n" not in line and json.loads(line)["provenance"]["seed"] == 3


def test_bad_out_paths_fail_before_compute(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(UserError, match="not a directory"):
        check_out_dir(f)
    with pytest.raises(UserError, match="is a directory"):
        check_out_file(tmp_path)
    if os.geteuid() != 0:  # root can write anywhere; /proc is never writable
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        with pytest.raises(UserError):
            check_out_dir(ro / "sub")
    with pytest.raises(UserError):
        check_out_dir("/proc/nope/results")


def test_code_key_changes_with_version_and_config():
    assert code_key({"a": 1}, version="1") == code_key({"a": 1}, version="1")
    assert code_key({"a": 1}, version="1") != code_key({"a": 1}, version="2")
    assert code_key({"a": 1}, version="1") != code_key({"a": 2}, version="1")


def test_markdown_table_formats():
    t = markdown_table([{"a": 123456.7, "b": True}], ["a", "b"])
    assert t.splitlines()[2] == "| 123,457 | yes |"


def test_broken_system_module_is_a_loud_error(tmp_path):
    """A system whose CLI module fails to import makes `edgecloud --help` fail with that module named."""
    code = ("import sys, edgecloud.cli as c; c.SYSTEMS.append(('ghost', 'edgecloud.ghost.cli', 'x'));"
            "\ntry:\n    c.build_app()\nexcept c.SystemImportError as e:\n    print(e); sys.exit(3)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 3
    assert "'ghost' system's CLI module edgecloud.ghost.cli failed to import: ModuleNotFoundError" in r.stdout


def test_version_flag():
    r = subprocess.run([sys.executable, "-m", "edgecloud", "--version"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("edgecloud ")
