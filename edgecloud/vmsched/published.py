"""Every published VM-scheduling number this project compares against, in one place, each named for what it is.

Source: the SPANE repository's reference results (``$EDGECLOUD_DATA/huawei-east-1/spane_reference_results``:
``wait_time/result.txt`` per-model test scores, ``wait_time/result.csv``, ``*_top_models_hparams.json``) and the
spec ``specs/vmsched.md``. All are 10% trimmed means of the total wait per episode (s) on the 1000-start test split
of Huawei-East-1, N=5 PMs unless a table is keyed by N; lower is better.

Three different summaries of the same per-model scores circulate; they are not interchangeable:
- ``MEAN_TOP3_BY_VALID``: the published headline (``result.csv`` ``mean_of_top3``): mean test score of the 3 models
  that the *validation* loss ranks best. SPANE 63,697 = (75,184 + 61,094 + 54,814) / 3; MLPDQN 117,552.
- ``MEAN_BEST3_BY_TEST``: mean of the 3 lowest *test* scores (picked on the test split itself, optimistic):
  SPANE 58,430, MLPDQN 102,993.
- ``BEST_BY_TEST``: the single lowest test score among the published models: SPANE 54,814, MLPDQN 98,723.
"""

from __future__ import annotations

HEURISTICS_N5 = {"first-fit": 89822.52, "balance-fit": 86009.91}

HEURISTICS_BY_N = {
    "first-fit": dict(zip(range(2, 10), (53866.54, 52483.26, 44461.24, 89822.52, 67176.55, 129369.66, 182132.77,
                                         201328.98), strict=True)),
    "balance-fit": dict(zip(range(2, 10), (38610.83, 38832.10, 37829.28, 86009.91, 62643.88, 118267.32, 176528.51,
                                           181041.99), strict=True)),
}

MEAN_TOP3_BY_VALID = {"spane": 63697.0, "mlpdqn": 117552.0, "mlpaug": 133852.0}
MEAN_BEST3_BY_TEST = {"spane": 58430.0, "mlpdqn": 102993.0, "mlpaug": 106372.0}
BEST_BY_TEST = {"spane": 54814.0, "mlpdqn": 98723.0, "mlpaug": 99929.0}


# Our policy names and the published agent each is compared with. ``spane`` is our best learner by validation
# (docs/spane.md), ``spane-paper`` the published architecture trained here; both, and our SPANE-NUMA variants, are
# set against the published SPANE headline.
PUBLISHED_AGENT = {"spane": "spane", "spane-paper": "spane", "spane-numa": "spane",
                   "mlpdqn": "mlpdqn", "mlpaug": "mlpaug"}


def reference(policy: str, n_pms: int) -> tuple[float, str] | None:
    """The published number to print beside ours for ``policy`` at ``n_pms`` on the test split, and its name."""
    key = policy.strip().lower()
    if key in HEURISTICS_BY_N and n_pms in HEURISTICS_BY_N[key]:
        return HEURISTICS_BY_N[key][n_pms], "published"
    agent = PUBLISHED_AGENT.get(key)
    if agent is not None and n_pms == 5:
        return MEAN_TOP3_BY_VALID[agent], f"published {agent.upper()} mean of top 3 by validation"
    return None
