"""The published numbers in edgecloud.vmsched.published are the reference files' own numbers, each correctly named."""

from __future__ import annotations

import json
import re

import numpy as np

# `conftest`, the module pytest loaded: importing it as `tests.conftest` ran it a second time, which pointed
# EDGECLOUD_CACHE at a second, empty test cache, so every model was converted again (~27 s per test process)
from conftest import require_shared

from edgecloud.paths import data_root
from edgecloud.vmsched import published


def test_published_numbers_match_reference_files():
    ref = data_root() / "huawei-east-1" / "spane_reference_results"
    require_shared(ref)
    scores: dict[tuple[str, str], float] = {}
    for line in (ref / "wait_time" / "result.txt").read_text().splitlines():
        m = re.match(r"(\w+) Trial_id: (\w+), Result: ([\d.]+)", line.strip())
        if m:
            scores[(m.group(1), m.group(2))] = float(m.group(3))
    csv = {r.split(",")[0]: r.split(",") for r in (ref / "wait_time" / "result.csv").read_text().split()[1:]}
    for agent, key in (("SPANE", "spane"), ("MLPDQN", "mlpdqn"), ("MLPAUG", "mlpaug")):
        ranked = [t["trial_id"] for t in json.loads((ref / f"{agent}_top_models_hparams.json").read_text())]
        by_valid = np.mean([scores[(agent, t)] for t in ranked[:3]])  # the hparams file is ranked by valid loss
        test = sorted(v for (a, _), v in scores.items() if a == agent)
        assert round(by_valid) == published.MEAN_TOP3_BY_VALID[key] == float(csv[agent][2])
        assert round(np.mean(test[:3])) == published.MEAN_BEST3_BY_TEST[key]
        assert round(test[0]) == published.BEST_BY_TEST[key]


def test_reference_lookup():
    assert published.reference("first-fit", 5) == (89822.52, "published")
    assert published.reference("spane", 5)[0] == 63697.0
    assert published.reference("spane-paper", 5) == (63697.0, "published SPANE mean of top 3 by validation")
    assert published.reference("mlpaug", 5)[0] == 133852.0
    assert published.reference("spane", 7) is None and published.reference("checkpoint:x", 5) is None
