"""Batched-engine benchmark, one run: writes docs/results/llm_engine.{json,md,png}.

    .venv/bin/python bench/llm_engine.py          # 1,500-token prefill, 32 decode steps at batch 1/4/16
    .venv/bin/python bench/llm_engine.py --quick
    .venv/bin/python bench/llm_engine.py --peer vllm --peer-url http://127.0.0.1:8000   # a running vLLM server

It runs ``edgecloud llm bench --out docs/results`` with the arguments given; ``sys.argv`` is left as typed, so the
results' provenance records this script's command line.
"""

from __future__ import annotations

import sys
from pathlib import Path

from edgecloud.errors import UserError

OUT = Path(__file__).resolve().parent.parent / "docs" / "results"

if __name__ == "__main__":
    from edgecloud.llm.cli import app

    try:
        app(["bench", "--out", str(OUT), *sys.argv[1:]], prog_name="bench/llm_engine.py")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
