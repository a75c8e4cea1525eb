"""Batched-engine benchmark, one run: writes docs/results/llm_engine.{json,md,png}.

    .venv/bin/python bench/llm_engine.py          # 1,500-token prefill, 32 decode steps at batch 1/4/16
    .venv/bin/python bench/llm_engine.py --quick
    .venv/bin/python bench/llm_engine.py --peer vllm --peer-url http://127.0.0.1:8000   # a running vLLM server
"""

from __future__ import annotations

import sys
from pathlib import Path

from edgecloud.main import main

OUT = Path(__file__).resolve().parent.parent / "docs" / "results"

if __name__ == "__main__":
    sys.argv = [sys.argv[0], "llm", "bench", "--out", str(OUT), *sys.argv[1:]]
    main()
