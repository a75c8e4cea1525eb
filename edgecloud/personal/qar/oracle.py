"""Is there a questioner signal in the held-out replies at all? Text-only oracles, no LM.

The bench's QAR arms did not beat plain LoRA, and the probe found the specific tower no more questioner-aware than
the general one. Before asking more of the model, this asks the data, on the bench's exchanges:

- **attribution**: per responder, logistic regression on TF-IDF word + character n-grams of the responder's
  *replies* predicts who asked; held-out accuracy vs the majority questioner (if replies to different questioners
  cannot be told apart, a questioner-aware responder has nothing to adapt);
- **LM gain**: the held-out reply's per-word log-likelihood under a unigram model of the responder's training
  replies to *this* questioner (interpolated half/half with the responder's all-questioner model) minus under the
  responder's model alone, paired bootstrap over exchanges;
- **retrieval ROUGE-L**: answer with the training reply whose question is most BM25-similar, searching the
  responder's replies to this questioner only vs to everyone; ROUGE-L (the bench's metric and tokenization)
  against the reference, relative gain with a paired bootstrap.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from edgecloud.personal.anon.oracle import Unigram, paired_diff, words
from edgecloud.personal.qar.exchanges import Dataset


def attribution(ds: Dataset, seed: int = 0) -> dict:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline, make_union

    hit = maj = n = 0
    for r in ds.responders:
        tr = [e for e in ds.train if e.responder == r]
        te = [e for e in ds.heldout if e.responder == r]
        ys = [e.questioner for e in tr]
        if len(set(ys)) < 2 or not te:
            continue
        clf = make_pipeline(make_union(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True),
                                       TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), sublinear_tf=True)),
                            LogisticRegression(C=10.0, max_iter=3000, random_state=seed))
        clf.fit([e.reply for e in tr], ys)
        pred = clf.predict([e.reply for e in te])
        hit += int(sum(p == e.questioner for p, e in zip(pred, te)))
        vals, cnt = np.unique(ys, return_counts=True)
        maj += sum(e.questioner == vals[cnt.argmax()] for e in te)
        n += len(te)
    return {"accuracy": hit / n, "majority": maj / n, "n": n}


def lm_gain(ds: Dataset, seed: int = 0) -> dict:
    vocab = {w: i for i, w in enumerate(sorted({w for e in ds.train for w in words(e.reply)}))}
    by_r, by_p = defaultdict(list), defaultdict(list)
    for e in ds.train:
        by_r[e.responder].append(e.reply)
        by_p[e.pair].append(e.reply)
    mr = {r: Unigram(v, vocab) for r, v in by_r.items()}
    mp = {p: Unigram(v, vocab) for p, v in by_p.items()}
    base, aware = [], []
    for e in ds.heldout:
        pr = mr[e.responder].probs(e.reply)
        pp = mp[e.pair].probs(e.reply) if e.pair in mp else pr
        base.append(np.log(pr).mean())
        aware.append(np.log(0.5 * pp + 0.5 * pr).mean())
    return {"logp_responder": float(np.mean(base)), "logp_questioner_aware": float(np.mean(aware)),
            "gain_nats_per_word": paired_diff(np.array(aware), np.array(base), seed=seed)}


def retrieval(ds: Dataset, seed: int = 0) -> dict:
    from edgecloud.llm.retrieval import BM25
    from edgecloud.personal.qar.metrics import paired_bootstrap, rouge_l

    out = {}
    for name, key in (("responder", lambda e: e.responder), ("questioner_aware", lambda e: e.pair)):
        groups = defaultdict(list)
        for e in ds.train:
            groups[key(e)].append(e)
        index = {k: BM25([e.question for e in v]) for k, v in groups.items()}
        rl = []
        for e in ds.heldout:
            pool = groups.get(key(e)) or groups[e.responder]
            s = index[key(e)].scores(e.question) if key(e) in index else np.zeros(len(pool))
            rl.append(rouge_l(pool[int(np.argmax(s))].reply, e.reply))
        out[name] = np.array(rl)
    return {"rougeL_responder": float(out["responder"].mean()),
            "rougeL_questioner_aware": float(out["questioner_aware"].mean()),
            "aware_vs_responder": paired_bootstrap(out["questioner_aware"], out["responder"], seed=seed)}


def study(ds: Dataset, seed: int = 0) -> dict:
    return {"counts": ds.counts(), "attribution": attribution(ds, seed), "lm_gain": lm_gain(ds, seed),
            "retrieval": retrieval(ds, seed)}


def run(seed: int = 0, corpora=("plays", "chat")) -> dict:
    """The oracles on the bench's exchanges (240 training / 80 held-out per corpus) and on up to 2,000 / 500."""
    from edgecloud.personal.qar.exchanges import DataConfig, build

    sizes = {"bench": {"max_train": 240, "max_eval": 80}, "large": {"max_train": 2000, "max_eval": 500}}
    return {f"{c}/{s}": study(build(DataConfig(corpus=c, **kw)), seed) for c in corpora for s, kw in sizes.items()}


def to_result(d: dict, seed: int = 0):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edgecloud.results import Result

    res = Result("questioner_aware_oracle", d, seed=seed,
                 title="Questioner-aware responders: is there a questioner signal in the replies? (text oracles)")
    res.markdown = ("Per corpus, on the bench's exchanges (`bench`: 240 training / 80 held-out) and on up to "
                    "2,000 training / 500 held-out selected exchanges (`large`). Intervals: paired bootstrap over "
                    "held-out exchanges.\n")
    rows = []
    for k, v in d.items():
        at, lm, rt = v["attribution"], v["lm_gain"], v["retrieval"]
        g, b = lm["gain_nats_per_word"], rt["aware_vs_responder"]
        rows.append({"set": k, "n": v["counts"]["heldout_exchanges"], "att": f"{at['accuracy']:.3f}",
                     "maj": f"{at['majority']:.3f}",
                     "lm": f"{g['diff']:+.3f} [{g['ci95'][0]:+.3f}, {g['ci95'][1]:+.3f}]",
                     "rr": f"{rt['rougeL_responder']:.4f}", "ra": f"{rt['rougeL_questioner_aware']:.4f}",
                     "rg": f"{b['rel_gain']:+.1%} [{b['ci95'][0]:+.1%}, {b['ci95'][1]:+.1%}] p {b['p_value']:.3f}"})
    res.table(rows, ["set", "n", "att", "maj", "lm", "rr", "ra", "rg"],
              ["corpus / exchanges", "held-out", "questioner from reply (accuracy)", "majority questioner",
               "LM gain knowing the questioner (nats/word) [95% CI]", "retrieval ROUGE-L, responder's replies",
               "retrieval ROUGE-L, this questioner's", "relative gain [95% CI], p"])
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    keys = list(d)
    x = np.arange(len(keys))
    ax.bar(x - 0.2, [d[k]["attribution"]["accuracy"] for k in keys], 0.4, label="questioner from reply")
    ax.bar(x + 0.2, [d[k]["attribution"]["majority"] for k in keys], 0.4, label="majority questioner")
    ax.set_xticks(x, keys, fontsize=8)
    ax.set_ylabel("held-out accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    res.figure = fig
    return res
