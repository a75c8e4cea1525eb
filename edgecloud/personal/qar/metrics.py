"""Reply-quality metrics, paired bootstrap and the questioner probe.

Tokenization for ROUGE-L and BLEU: lower-cased word tokens ``[a-z0-9']+`` (punctuation dropped), **no stop-word
removal** (the public QAR code applies a Chinese stop-word list to English text; we do not). ROUGE-L is the
per-reply LCS F1 (beta = 1), averaged. BLEU-n is corpus BLEU (Papineni et al.): clipped n-gram precisions for
orders 1..n summed over the corpus, their geometric mean with uniform weights, times the brevity penalty; it is
computed from per-reply counts so a bootstrap resample recomputes it exactly.
"""

from __future__ import annotations

import math
import re
from collections import Counter

import numpy as np

_WORD = re.compile(r"[a-z0-9']+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(hyp: str, ref: str) -> float:
    h, r = words(hyp), words(ref)
    if not h or not r:
        return 0.0
    m = lcs(h, r)
    if m == 0:
        return 0.0
    p, rec = m / len(h), m / len(r)
    return 2 * p * rec / (p + rec)


def bleu_counts(hyp: str, ref: str, n: int = 4) -> np.ndarray:
    """[matches_1..n, totals_1..n, hyp_len, ref_len] for one reply (clipped n-gram matches)."""
    h, r = words(hyp), words(ref)
    out = np.zeros(2 * n + 2)
    for k in range(1, n + 1):
        hc = Counter(tuple(h[i:i + k]) for i in range(len(h) - k + 1))
        rc = Counter(tuple(r[i:i + k]) for i in range(len(r) - k + 1))
        out[k - 1] = sum(min(c, rc[g]) for g, c in hc.items())
        out[n + k - 1] = max(0, len(h) - k + 1)
    out[2 * n], out[2 * n + 1] = len(h), len(r)
    return out


def bleu_from_counts(counts: np.ndarray, order: int, n: int = 4) -> float:
    """Corpus BLEU-``order`` from summed :func:`bleu_counts` rows."""
    tot = counts.sum(0) if counts.ndim == 2 else counts
    logs = []
    for k in range(order):
        if tot[n + k] == 0 or tot[k] == 0:
            return 0.0
        logs.append(math.log(tot[k] / tot[n + k]))
    c, r = tot[2 * n], tot[2 * n + 1]
    bp = 1.0 if c > r else (math.exp(1 - r / c) if c > 0 else 0.0)
    return bp * math.exp(sum(logs) / order)


def scores(hyps: list[str], refs: list[str]) -> dict:
    """Per-reply ROUGE-L and BLEU counts, plus corpus values."""
    rl = np.array([rouge_l(h, r) for h, r in zip(hyps, refs, strict=True)])
    bc = np.stack([bleu_counts(h, r) for h, r in zip(hyps, refs, strict=True)])
    return {"rougeL": rl, "bleu_counts": bc, "rougeL_mean": float(rl.mean()),
            **{f"bleu{k}": bleu_from_counts(bc, k) for k in range(1, 5)}}


def paired_bootstrap(a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0) -> dict:
    """Relative gain of mean(a) over mean(b), resampling exchanges (the same indices for both): point estimate,
    95% percentile CI, and the one-sided p-value P(gain <= 0) under resampling."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(n_boot, len(a)))
    ma, mb = a[idx].mean(1), b[idx].mean(1)
    rel = ma / np.maximum(mb, 1e-12) - 1
    return {"rel_gain": float(a.mean() / max(b.mean(), 1e-12) - 1), "ci95": [float(np.percentile(rel, 2.5)),
            float(np.percentile(rel, 97.5))], "p_value": float(((ma - mb) <= 0).mean()),
            "abs_diff": float(a.mean() - b.mean())}


def probe_accuracy(x_tr: np.ndarray, y_tr, groups_tr, x_te: np.ndarray, y_te, groups_te, seed: int = 0) -> dict:
    """Logistic regression per responder (group): questioner accuracy on held-out states, and the majority-class
    baseline, both pooled over responders."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    y_tr, y_te, g_tr, g_te = map(np.asarray, (y_tr, y_te, groups_tr, groups_te))
    hit = maj = n = 0
    for g in sorted(set(g_te.tolist())):
        tr, te = g_tr == g, g_te == g
        if len(set(y_tr[tr].tolist())) < 2:
            continue
        sc = StandardScaler().fit(x_tr[tr])
        clf = LogisticRegression(max_iter=2000, C=0.1, random_state=seed).fit(sc.transform(x_tr[tr]), y_tr[tr])
        hit += int((clf.predict(sc.transform(x_te[te])) == y_te[te]).sum())
        vals, cnt = np.unique(y_tr[tr], return_counts=True)
        maj += int((y_te[te] == vals[cnt.argmax()]).sum())
        n += int(te.sum())
    return {"accuracy": hit / n if n else None, "majority": maj / n if n else None, "n": n}
