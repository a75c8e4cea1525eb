"""Route metrics with the textbook definitions (the public PathGPT v1 code swaps precision and recall).

precision = matched / generated, recall = matched / ground truth, over sets of directed edges (or road names);
length Jaccard = metres on both / metres on either.
"""

from __future__ import annotations

import numpy as np


def prf(generated, truth) -> tuple[float, float, float]:
    g, t = set(generated), set(truth)
    m = len(g & t)
    p = m / len(g) if g else 0.0
    r = m / len(t) if t else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def length_jaccard(generated, truth, length: np.ndarray) -> float:
    g, t = set(generated), set(truth)
    union = length[list(g | t)].sum() if g | t else 0.0
    return float(length[list(g & t)].sum() / union) if union else 0.0
