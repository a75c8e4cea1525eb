"""How user-dependent is the task? Oracles that *know* the held-out user's identity and training-period replies.

The bench's static-ID arm (the non-private upper bound) gained +1.6 points of reply-selection accuracy, inside the
noise. Before blaming the cloud model, this asks whether identity can help on this task at all: text-only scorers
with no LM, given the true user's training-period replies, rank the same 10 candidates.

- ``none``: a unigram model of every selected user's training replies pooled (no identity), mean log-prob per word.
- ``user n-gram``: the same, interpolated half/half with the true user's own unigram model (identity used the way a
  personalized LM would use it: it shifts the likelihood of every candidate).
- ``author classifier``: logistic regression on TF-IDF word + character n-grams of the training replies, labelled
  by user; a candidate's score is log P(true user | candidate). The strongest oracle here: every negative is by
  another selected user, so identifying the author solves the task.

Each is measured on the bench's examples (24 training / 4 held-out per user: the LM's budget), knowing 400
training-period replies per user, and that on a ten-times larger held-out set; accuracy differences get paired
bootstrap intervals over examples.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import replace

import numpy as np

from edgecloud.personal.anon import data

_WORD = re.compile(r"[a-z0-9']+|[^\sa-z0-9']")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower()) or ["<empty>"]


class Unigram:
    """Add-one smoothed word unigram over a fixed vocabulary (unknown words share one slot)."""

    def __init__(self, texts: list[str], vocab: dict[str, int]):
        c = Counter(w for t in texts for w in words(t))
        counts = np.ones(len(vocab) + 1)
        for w, n in c.items():
            counts[vocab.get(w, len(vocab))] += n
        self.p = counts / counts.sum()
        self.vocab = vocab

    def probs(self, text: str) -> np.ndarray:
        return self.p[[self.vocab.get(w, len(self.vocab)) for w in words(text)]]


def paired_diff(a: np.ndarray, b: np.ndarray, n_boot: int = 4000, seed: int = 0) -> dict:
    """Mean of ``a - b`` over paired examples, its 95% percentile bootstrap interval and P(diff <= 0)."""
    rng = np.random.default_rng(seed)
    d = np.asarray(a, float) - np.asarray(b, float)
    boot = d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(1)
    return {"diff": float(d.mean()), "ci95": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
            "p_le_0": float((boot <= 0).mean()), "n": int(len(d))}


def _hits(scores: list[np.ndarray]) -> np.ndarray:
    """1 where the real reply (candidate 0) has the strictly highest score; ties count as misses."""
    return np.array([float(s[0] > np.max(s[1:])) for s in scores])


def _train_texts(cfg: data.DataConfig, chosen: list[str], by: dict, n_train: int) -> list[list[str]]:
    out = []
    for u, s in enumerate(chosen):
        tr, _ = data.split_user(by[s], cfg, f"sender {u}")
        out.append([e.reply for e in data.evenly(tr, n_train)])
    return out


def _fit(per_user: list[list[str]], seed: int):
    """(vocabulary, background unigram, per-user unigrams, author classifier) from the users' training replies."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline, make_union

    pooled = [t for ts in per_user for t in ts]
    vocab = {w: i for i, w in enumerate(sorted({w for t in pooled for w in words(t)}))}
    labels = np.repeat(np.arange(len(per_user)), [len(ts) for ts in per_user])
    clf = make_pipeline(
        make_union(TfidfVectorizer(analyzer="word", ngram_range=(1, 2), min_df=1, sublinear_tf=True),
                   TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), min_df=2, sublinear_tf=True)),
        LogisticRegression(C=10.0, max_iter=300, random_state=seed))
    clf.fit(pooled, labels)
    return Unigram(pooled, vocab), [Unigram(ts, vocab) for ts in per_user], clf


def evaluate(cfg: data.DataConfig, n_train: int, seed: int = 0, convs=None, fitted: dict | None = None) -> dict:
    """Every oracle on ``cfg``'s held-out examples, knowing ``n_train`` training-period replies per user (evenly
    spaced, like the bench's sample); ``fitted`` caches the scorers by ``n_train`` across calls."""
    ds = data.build(cfg, convs)
    chosen, by = data.select_users(cfg, convs)
    per_user = _train_texts(cfg, chosen, by, n_train)
    fitted = {} if fitted is None else fitted
    if n_train not in fitted:
        fitted[n_train] = _fit(per_user, seed)
    bg, um, clf = fitted[n_train]
    none, user, author, ratio = [], [], [], []
    for e, cands in zip(ds.eval, ds.candidates):
        pb = [bg.probs(c) for c in cands]
        pu = [um[e.user].probs(c) for c in cands]
        none.append(np.array([np.log(b).mean() for b in pb]))
        user.append(np.array([np.log(0.5 * u + 0.5 * b).mean() for u, b in zip(pu, pb)]))
        ratio.append(np.array([np.log(u / b).sum() for u, b in zip(pu, pb)]))
        author.append(clf.predict_log_proba(cands)[:, e.user])
    hits = {"none": _hits(none), "user n-gram": _hits(user), "user/background ratio": _hits(ratio),
            "author classifier": _hits(author)}
    arms = []
    for name, h in hits.items():
        row = {"oracle": name, "acc": float(h.mean()), "n": int(len(h))}
        if name != "none":
            row["vs_none"] = paired_diff(h, hits["none"], seed=seed)
        arms.append(row)
    return {"users": len(chosen), "train_replies": sum(len(ts) for ts in per_user), "eval_examples": len(ds.eval),
            "candidates": cfg.n_candidates, "chance": 1.0 / cfg.n_candidates, "n_train_per_user": n_train,
            "n_eval_per_user": cfg.n_eval, "arms": arms, "hits": {k: v.astype(int).tolist() for k, v in hits.items()}}


def study(cfg: data.DataConfig, big_train: int = 400, big_eval: int = 40, seed: int = 0, convs=None) -> dict:
    """The oracles at the bench's budget (``cfg.n_train`` replies per user), knowing ``big_train`` replies per user,
    and that on a ``big_eval``-per-user held-out set."""
    from edgecloud.personal.chitchat import load_conversations

    convs = convs if convs is not None else load_conversations()
    fitted: dict = {}
    return {"bench_budget": evaluate(cfg, cfg.n_train, seed, convs, fitted),
            "more_train": evaluate(cfg, big_train, seed, convs, fitted),
            "more_train_big_eval": evaluate(replace(cfg, n_eval=big_eval), big_train, seed, convs, fitted)}


SETTINGS = {"bench_budget": "bench's examples, 24 replies/user known",
            "more_train": "bench's examples, 400 replies/user known",
            "more_train_big_eval": "40 held-out/user, 400 replies/user known"}


def to_result(d: dict, seed: int = 0):
    """Oracle table (accuracy, gain over ``none`` with its paired interval) and a bar chart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edgecloud.results import Result

    res = Result("anonymous_embeddings_oracle", d, seed=seed,
                 title="Anonymous user embeddings: is reply selection user-dependent? (identity oracles, no LM)")
    b = d["bench_budget"]
    res.markdown = (f"{b['users']} chitchat users, {b['candidates']} candidates (the real reply + 9 by other users "
                    f"in BM25-similar contexts), chance {b['chance']:.2f}. Gain = accuracy minus `none`, paired "
                    "bootstrap 95% interval over held-out examples.\n")
    rows = []
    for key, label in SETTINGS.items():
        for a in d[key]["arms"]:
            g = a.get("vs_none")
            rows.append({"setting": label, "n": a["n"], "oracle": a["oracle"], "acc": f"{a['acc']:.3f}",
                         "gain": f"{g['diff']:+.3f} [{g['ci95'][0]:+.3f}, {g['ci95'][1]:+.3f}]" if g else "—",
                         "p": f"{g['p_le_0']:.4f}" if g else "—"})
    res.table(rows, ["setting", "n", "oracle", "acc", "gain", "p"],
              ["setting", "held-out examples", "scorer", "reply-selection acc", "gain vs none [95% CI]",
               "P(gain ≤ 0)"])
    fig, ax = plt.subplots(figsize=(7.2, 4.2))
    names = [a["oracle"] for a in b["arms"]]
    w = 0.8 / len(SETTINGS)
    for i, (key, label) in enumerate(SETTINGS.items()):
        arms = d[key]["arms"]
        acc = np.array([a["acc"] for a in arms])
        lo = np.array([a["vs_none"]["ci95"][0] - a["vs_none"]["diff"] if "vs_none" in a else 0 for a in arms])
        hi = np.array([a["vs_none"]["ci95"][1] - a["vs_none"]["diff"] if "vs_none" in a else 0 for a in arms])
        ax.bar(np.arange(len(arms)) + i * w, acc, w, yerr=[-lo, hi], capsize=3, label=label)
    ax.axhline(b["chance"], color="gray", ls=":", label="chance")
    ax.set_xticks(np.arange(len(names)) + w * (len(SETTINGS) - 1) / 2, names, fontsize=8)
    ax.set_ylabel("reply-selection accuracy (error bar: 95% CI of the gain vs none)")
    ax.legend(fontsize=7)
    ax.set_title("Identity oracles on the bench's reply-selection task", fontsize=10)
    fig.tight_layout()
    res.figure = fig
    return res
