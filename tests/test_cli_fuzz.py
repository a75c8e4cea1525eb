"""Property tests of the CLI boundary: random bytes, random CSV rows and random option values given to the main
commands end in exit 0 or 2, never a traceback, and never a partial output file. The CLI runs in-process through
:func:`edgecloud.cli.main` (the same UserError / usage-error handling as the console script), so it is fast."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgecloud.cli import main

FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
                derandomize=True)


def run_cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return code, out.getvalue(), err.getvalue()


def check(code: int, err: str) -> None:
    assert code in (0, 2), (code, err[-2000:])
    assert "Traceback" not in err, err[-2000:]
    if code == 2:
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), err


def small_trace(tmp: Path, rows: list[tuple]) -> Path:
    p = tmp / "trace.csv"
    p.write_text("vmid,cpu,mem,at,lt\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
    return p


GOOD_ROWS = [(i, 2, 4, 10 * i, 50) for i in range(12)]


@pytest.fixture
def split(tmp_path) -> Path:
    p = tmp_path / "split.txt"
    p.write_text("0\n3\n")
    return p


@FUZZ
@given(data=st.binary(max_size=400))
def test_random_bytes_as_trace_or_split(tmp_path, split, data):
    f = tmp_path / "blob.csv"
    f.write_bytes(data)
    code, _, err = run_cli("vmsched", "evaluate", "--trace", f, "--split", split, "--json")
    check(code, err)
    good = small_trace(tmp_path, GOOD_ROWS)
    for name in ("blob.npy", "blob.txt"):
        s = tmp_path / name
        s.write_bytes(data)
        code, _, err = run_cli("vmsched", "evaluate", "--trace", good, "--split", s, "--json")
        check(code, err)


field = st.one_of(st.integers(-5, 100), st.floats(allow_nan=True, allow_infinity=True, width=32),
                  st.text(alphabet="0123456789.-eainf ,\"x", max_size=6))


@FUZZ
@given(rows=st.lists(st.tuples(field, field, field, field, field), min_size=0, max_size=8))
def test_random_csv_rows(tmp_path, split, rows):
    code, out, err = run_cli("vmsched", "evaluate", "--trace", small_trace(tmp_path, rows), "--split", split,
                             "--json")
    check(code, err)


num = st.one_of(st.integers(-10, 10**6), st.floats(allow_nan=True, allow_infinity=True),
                st.sampled_from(["nan", "-inf", "x", "", "1e400"]))


@FUZZ
@given(pms=num, cpu=num, mem=num, thr=num, policy=st.sampled_from(["first-fit", "random", "bogus", "spane", ""]))
def test_random_options_evaluate(tmp_path, split, pms, cpu, mem, thr, policy):
    code, _, err = run_cli("vmsched", "evaluate", "--trace", small_trace(tmp_path, GOOD_ROWS), "--split", split,
                           "--pms", pms, "--cpu", cpu, "--mem", mem, "--double-threshold", thr, "-p", policy,
                           "--json")
    check(code, err)


@FUZZ
@given(lo=num, hi=num, cpu=num, out_kind=st.sampled_from(["new", "file", "nested-in-file"]))
def test_random_options_flex_no_partial_output(tmp_path, split, lo, hi, cpu, out_kind):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    out = {"new": tmp_path / "flexout", "file": blocker, "nested-in-file": blocker / "sub"}[out_kind]
    if isinstance(lo, int) and isinstance(hi, int) and hi - lo > 3:
        hi = lo + 3  # keep the sweep short
    code, _, err = run_cli("vmsched", "flex", "--trace", small_trace(tmp_path, GOOD_ROWS), "--split", split,
                           "--pms-min", lo, "--pms-max", hi, "--cpu", cpu, "--out", out, "--json")
    check(code, err)
    if code == 2 and out_kind == "new" and out.exists():
        assert not any(out.iterdir()), "a failed run left files behind"
    if code == 0:
        assert (out / "flex.md").exists()
    assert blocker.read_text() == "x"


bad_count = st.one_of(st.integers(-10**6, -2), st.sampled_from(["x", "nan", "", "1e400", "-inf"]))


@FUZZ
@given(cmd=st.sampled_from([("bench", "--threads"), ("bench", "--k"), ("csr-bench", "--seq-len"),
                            ("csr-bench", "--atoms"), ("csr-bench", "--eval-seqs"), ("csr-bench", "--threads"),
                            ("serve", "--mem-mb"), ("serve", "--port")]),
       value=bad_count)
def test_random_bad_options_kvcache(tmp_path, cmd, value):
    """Out-of-range kvcache options fail at parse time, in one line, before any model loads or output is written
    (in-range values are not run here: they start minutes of compute)."""
    out = tmp_path / "o.json"
    extra = ["--out", out] if cmd[0] == "csr-bench" else []
    code, _, err = run_cli("kvcache", cmd[0], cmd[1], value, *extra)
    assert code == 2
    check(code, err)
    assert not out.exists()


@pytest.mark.parametrize("args", [
    ["kvcache", "csr-bench", "--out", "/proc/nope/x.json"],
    ["vmsched", "train", "--set", "lr=-1"],
    ["vmsched", "train", "--set", "weight_decay=-1"],
    ["vmsched", "train", "--set", "eps_start=2"],
    ["vmsched", "train", "--set", "eps_end=-0.5"],
    ["kvcache", "bench", "--threads", "-3"],
    ["kvcache", "bench", "--k", "-3"],
    ["kvcache", "csr-bench", "--seq-len", "-5"],
    ["kvcache", "csr-bench", "--atoms", "-1"],
    ["kvcache", "csr-bench", "--eval-seqs", "-1"],
    ["kvcache", "serve", "--mem-mb", "-5"],
    ["vmsched", "evaluate", "--double-threshold", "nan"],
])
def test_issue12_rows_exit_2_one_line(tmp_path, args):
    code, _, err = run_cli(*args, *(["--out", tmp_path / "t"] if args[1] == "train" else []))
    assert code == 2
    check(code, err)


def test_issue12_file_rows(tmp_path, split):
    blob = tmp_path / "bin.csv"
    blob.write_bytes(bytes(range(256)) * 8)
    good = small_trace(tmp_path, GOOD_ROWS)
    text_npy = tmp_path / "t.npy"
    text_npy.write_text("0\n1\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    existing = tmp_path / "afile"
    existing.write_text("keep")
    for args, needle in [
        (["vmsched", "evaluate", "--trace", blob, "--split", split], "UTF-8"),
        (["vmsched", "evaluate", "--trace", good, "--split", text_npy], "not a NumPy array file"),
        (["vmsched", "evaluate", "--trace", good, "--split", empty], "no start rows"),
        (["vmsched", "evaluate", "--trace", good, "--split", split, "-p", "bogus"], "spane-numa"),
        (["vmsched", "flex", "--trace", good, "--split", split, "--out", existing], "not a directory"),
    ]:
        code, _, err = run_cli(*args)
        assert code == 2, (args, err)
        check(code, err)
        assert needle in err, err
    assert existing.read_text() == "keep"


def test_version():
    from edgecloud import __version__

    code, out, _ = run_cli("--version")
    assert code == 0 and out.strip() == f"edgecloud {__version__}"


def tiny_checkpoint(path: Path) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from edgecloud.llm.models import load_model

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(path)
    AutoTokenizer.from_pretrained(load_model().path, local_files_only=True).save_pretrained(path)
    return path


@pytest.mark.slow  # loads and re-saves real weights (~30 s)
def test_truncated_safetensors_is_one_line_and_cache_rebuilds(tmp_path, monkeypatch):
    from edgecloud.errors import UserError
    from edgecloud.llm import models

    src = tiny_checkpoint(tmp_path / "tiny")
    w = src / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(UserError, match="model.safetensors is damaged"):
        models.load_model(str(src))
    code, _, err = run_cli("kvcache", "bench", "--quick", "--model", src)
    check(code, err)
    assert code == 2 and "model.safetensors" in err

    # a damaged conversion in the cache is removed and converted again
    good = tiny_checkpoint(tmp_path / "good")
    calls = []

    def fake_convert(_src, out):
        calls.append(out)
        import shutil

        shutil.copytree(good, out)
        if len(calls) == 1:  # the first conversion is truncated, as by a killed process or full disk
            (out / "model.safetensors").write_bytes(b"\x00" * 40)

    monkeypatch.setenv("EDGECLOUD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "_convert", fake_convert)
    lm = models.load_model("smollm2-135m")
    assert len(calls) == 2 and lm.model.config.hidden_size == 16


def test_help_has_no_bool_noise():
    import typer

    from edgecloud.cli import app

    root = typer.main.get_command(app)
    for group in root.commands:
        for cmd in root.commands[group].commands:
            code, out, err = run_cli(group, cmd, "--help")
            assert code == 0 and "<bool>" not in out and "Traceback" not in err, (group, cmd)
