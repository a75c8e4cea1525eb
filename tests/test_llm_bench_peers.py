"""`edgecloud llm bench --peer ...`: a peer that is not installed or not reachable fails at once, with one line,
before anything is measured (a peer number is only ever one that was measured)."""

from __future__ import annotations

import importlib.util

import pytest
from typer.testing import CliRunner

from edgecloud.errors import UserError  # the CLI entry point turns it into one line and exit 2
from edgecloud.llm.cli import app


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is not None, reason="llama_cpp is installed here")
def test_llamacpp_absent_is_one_line():
    r = CliRunner().invoke(app, ["bench", "--quick", "--peer", "llamacpp"])
    assert isinstance(r.exception, UserError) and "llama_cpp is not importable" in str(r.exception)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_vllm_unreachable_is_one_line():
    r = CliRunner().invoke(app, ["bench", "--quick", "--peer", "vllm", "--peer-url", "http://127.0.0.1:9"])
    assert isinstance(r.exception, UserError) and "no vLLM server answers" in str(r.exception)


def test_unknown_peer():
    r = CliRunner().invoke(app, ["bench", "--peer", "tgi"])
    assert isinstance(r.exception, UserError) and "choose vllm or llamacpp" in str(r.exception)


def test_bad_result_name():
    r = CliRunner().invoke(app, ["bench", "--name", "../x"])
    assert isinstance(r.exception, UserError) and "--name '../x'" in str(r.exception)
