"""QAR (issue 16): metrics against hand-computed values, the contrastive loss against a per-example computation,
the plays parser, exchange selection/split on the real corpora."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgecloud.errors import UserError
from edgecloud.personal.qar.contrastive import MemoryBank, contrastive_loss, project
from edgecloud.personal.qar.metrics import (
    bleu_counts,
    bleu_from_counts,
    lcs,
    paired_bootstrap,
    probe_accuracy,
    rouge_l,
    words,
)
from edgecloud.personal.qar.plays import parse_play


def test_words_lowercase_no_stopword_removal():
    assert words("The cat, the HAT! Don't.") == ["the", "cat", "the", "hat", "don't"]


def test_rouge_l_hand_computed():
    # LCS("the cat sat on the mat", "the cat is on the mat") = the cat on the mat = 5; P = R = 5/6
    assert lcs("the cat sat on the mat".split(), "the cat is on the mat".split()) == 5
    assert rouge_l("The cat sat on the mat.", "the cat is on the mat") == pytest.approx(5 / 6)
    # P = 2/2, R = 2/4 -> F = 2 * 1 * 0.5 / 1.5
    assert rouge_l("good night", "good my lord night") == pytest.approx(2 / 3)
    assert rouge_l("", "anything") == 0.0
    assert rouge_l("nothing shared", "at all") == 0.0


def test_bleu_hand_computed():
    # the classic clipped-unigram example: 'the' x7 against a reference with 'the' twice -> 2/7, no brevity penalty
    c = bleu_counts("the the the the the the the", "the cat is on the mat")
    assert c[0] == 2 and c[4] == 7
    assert bleu_from_counts(c, 1) == pytest.approx(2 / 7)
    # hyp 4 words, ref 6: p1 = 4/4, p2 = 2/3 (the cat, cat sat? no: 'the cat' and 'on the'...), computed by hand:
    hyp, ref = "the cat on the", "the cat sat on the mat"
    # unigrams: the x2 (ref has 2), cat, on -> 4/4; bigrams: the-cat, cat-on (no), on-the -> 2/3
    c = bleu_counts(hyp, ref)
    assert list(c[:2]) == [4, 2] and list(c[4:6]) == [4, 3]
    bp = math.exp(1 - 6 / 4)
    assert bleu_from_counts(c, 1) == pytest.approx(bp * 1.0)
    assert bleu_from_counts(c, 2) == pytest.approx(bp * math.sqrt(1.0 * 2 / 3))
    assert bleu_from_counts(c, 3) == 0.0  # no trigram in common: 'the cat on', 'cat on the' are not in the ref
    # corpus BLEU sums counts over replies before dividing
    both = np.stack([bleu_counts("a b", "a b"), bleu_counts("c d", "c e")])
    assert bleu_from_counts(both, 1) == pytest.approx(3 / 4)


def test_paired_bootstrap():
    rng = np.random.default_rng(0)
    b = rng.uniform(0.1, 0.3, 200)
    same = paired_bootstrap(b, b.copy(), 300)
    assert same["rel_gain"] == 0 and same["p_value"] == 1.0
    up = paired_bootstrap(b * 1.1, b, 300)
    assert up["rel_gain"] == pytest.approx(0.1) and up["p_value"] == 0.0
    assert up["ci95"][0] == pytest.approx(0.1) and up["ci95"][1] == pytest.approx(0.1)
    noisy = paired_bootstrap(b + rng.normal(0, 0.2, 200), b, 300)
    assert noisy["ci95"][0] < noisy["rel_gain"] < noisy["ci95"][1]


def test_probe_separable_and_chance():
    rng = np.random.default_rng(0)
    y_tr, y_te = np.repeat([0, 1, 2], 30), np.repeat([0, 1, 2], 10)
    centers = rng.normal(0, 5, (3, 8))
    x_tr, x_te = centers[y_tr] + rng.normal(0, 1, (90, 8)), centers[y_te] + rng.normal(0, 1, (30, 8))
    g_tr, g_te = ["r"] * 90, ["r"] * 30
    assert probe_accuracy(x_tr, y_tr, g_tr, x_te, y_te, g_te)["accuracy"] == 1.0
    noise = probe_accuracy(rng.normal(size=(90, 8)), y_tr, g_tr, rng.normal(size=(30, 8)), y_te, g_te)
    assert noise["accuracy"] < 0.7 and noise["majority"] == pytest.approx(1 / 3)


def _direct_loss(z1, z2, cluster, pair, protos, valid, t):
    """The loss written out per example, with Python loops: cosine to every non-empty prototype of the example's
    cluster, softmax cross-entropy with the true pair, both views, averaged over usable examples."""
    total, used = 0.0, 0
    for i in range(len(pair)):
        c, p = int(cluster[i]), int(pair[i])
        cands = [j for j in range(valid.shape[1]) if valid[c, j]]
        if p not in cands or len(cands) < 2:
            continue
        ce = 0.0
        for z, view in ((z1[i], 1), (z2[i], 0)):  # view 1 against view-2 prototypes and vice versa
            logits = {j: float(F.cosine_similarity(z, protos[view, c, j], dim=0)) / t for j in cands}
            m = max(logits.values())
            lse = m + math.log(sum(math.exp(v - m) for v in logits.values()))
            ce += lse - logits[p]
        total += ce / 2
        used += 1
    return total / used if used else 0.0


def test_contrastive_loss_matches_direct_computation():
    torch.manual_seed(0)
    n_clusters, n_pairs, d = 3, 5, 6
    bank = MemoryBank(n_clusters, n_pairs, d, slots=2)
    # fill some (cluster, pair) cells, leave others empty; cluster 2 gets a single pair (no contrast possible)
    cells = [(0, 0), (0, 1), (0, 2), (1, 3), (1, 4), (1, 0), (2, 1), (0, 0), (0, 0)]
    for c, p in cells:
        bank.update(torch.randn(1, d), torch.randn(1, d), torch.tensor([c]), torch.tensor([p]))
    protos, valid = bank.prototypes()
    # ring buffer: (0, 0) was written 3 times into 2 slots -> the prototype is the mean of the last two writes
    assert int(bank.count[0, 0]) == 3 and valid.sum() == 7
    cluster = torch.tensor([0, 0, 1, 1, 2, 0, 1])
    pair = torch.tensor([0, 2, 3, 0, 1, 4, 1])  # (0, 4) and (1, 1) empty -> not used; cluster 2 has one candidate
    z1, z2 = torch.randn(7, d), torch.randn(7, d)
    got = contrastive_loss(z1, z2, cluster, pair, protos, valid, 0.1)
    want = _direct_loss(z1, z2, cluster, pair, protos, valid, 0.1)
    assert float(got) == pytest.approx(want, rel=1e-5)
    # nothing usable -> exactly zero (and still differentiable)
    zero = contrastive_loss(z1[4:5], z2[4:5], cluster[4:5], pair[4:5], protos, valid, 0.1)
    assert float(zero) == 0.0


def test_projection_heads_are_per_cluster():
    w1, w2 = torch.randn(3, 4, 2), torch.randn(3, 4, 2)
    x = torch.randn(5, 4)
    c = torch.tensor([0, 2, 1, 2, 0])
    a, b = project(x, w1, w2, c)
    for i in range(5):
        assert torch.allclose(a[i], x[i] @ w1[c[i]]) and torch.allclose(b[i], x[i] @ w2[c[i]])


def test_plays_parser_and_errors(tmp_path):
    f = tmp_path / "mini.md"
    f.write_text("# Mini\n\nDramatis personae\n\n### SCENE I. A room.\n\n_Enter A and\nB_\n\n**A**  \nWho's there?\n\n"
                 "**B**  \nA friend,  \n\n_Aside_\n\nno foe.\n\n**A**  \nWelcome.\n")
    sp = parse_play(f)
    assert [(s.speaker, s.text) for s in sp] == [("A", "Who's there?"), ("B", "A friend, no foe."), ("A", "Welcome.")]
    assert {s.scene for s in sp} == {1}
    f.write_text("### SCENE I.\n\n**A\nhello\n")
    with pytest.raises(UserError, match=r"mini.md:3: malformed speaker header"):
        parse_play(f)
    f.write_text("# Not a play\n\nJust prose.\n")
    with pytest.raises(UserError, match=r"mini.md:1: no speeches"):
        parse_play(f)


@pytest.mark.parametrize("corpus", ["plays", "chat"])
def test_exchanges_select_and_split(corpus):
    from edgecloud.personal.qar.exchanges import DataConfig, build

    ds = build(DataConfig(corpus=corpus))
    c = ds.counts()
    assert c["responders"] == 12 and 36 <= c["pairs"] <= 96
    assert c["heldout_exchanges"] == 100 and c["train_exchanges"] == 320
    train_pairs = {e.pair for e in ds.train}
    assert {e.pair for e in ds.heldout} <= train_pairs  # every held-out pair was seen in training
    for r in ds.responders:
        assert len(ds.questioners_of(r)) >= 3
    for e in ds.train[:50]:
        assert ds.pairs[e.pair] == (e.responder, e.questioner) and e.responder != e.questioner
        assert len(e.reply.split()) <= 12 and len(e.question.split()) <= 16
    # the split is fixed by data_seed, not by anything else
    again = build(DataConfig(corpus=corpus))
    assert [e.reply for e in again.heldout] == [e.reply for e in ds.heldout]
    with pytest.raises(UserError, match="--corpus"):
        DataConfig(corpus="films")


def test_summary_contract_keys_and_goal_logic():
    from edgecloud.personal.qar.bench import ARMS, BenchConfig, summarize

    rng = np.random.default_rng(0)
    base = rng.uniform(0.05, 0.2, 120)
    gain = {"base": 0.9, "lora": 1.0, "name_prompt": 1.0, "qar_nocon": 1.02, "qar_nocluster": 1.1, "qar": 1.2}
    run = {"corpus": "plays", "counts": {"responders": 12, "questioners": 50, "heldout_exchanges": 120},
           "arms": {a: {"rougeL": base * gain[a], "rougeL_mean": float((base * gain[a]).mean())} for a in ARMS},
           "probes": {"qar": [{"specific": {"accuracy": 0.5, "majority": 0.2}, "general": {"accuracy": 0.3}}]},
           "train": {}, "examples": {}, "wall_s": 1.0}
    s = summarize([run], BenchConfig(corpora=("plays",)))
    for k in ("rougeL_base", "rougeL_lora", "rougeL_name_prompt", "rougeL_qar", "rel_gain_vs_lora",
              "rel_gain_vs_name_prompt", "questioners", "responders"):
        assert k in s
    assert s["rel_gain_vs_lora"] == pytest.approx(0.2) and s["p_vs_lora"] == 0.0
    assert s["nocon_share_of_gain_lost"] == pytest.approx(0.18 / 0.2)  # QAR w/o contrastive keeps 0.02 of 0.2
    assert s["goal_met"] is True
    assert s["corpora"]["plays"]["probe"]["qar"] == {"specific": 0.5, "general": 0.3, "majority": 0.2}


def test_questioner_oracles_find_a_planted_signal():
    from edgecloud.personal.qar import oracle
    from edgecloud.personal.qar.exchanges import DataConfig, Dataset, Exchange

    qs = ["anna", "bob", "cleo"]
    pairs = [("R", q) for q in qs]

    def ex(i, j):  # R greets each questioner by name, on a topic that ignores who asks
        return Exchange("R", qs[j], f"tell me about topic {i % 4}", f"well {qs[j]} topic {i % 4} is fine", pair=j)

    ds = Dataset(DataConfig(), [ex(i, j) for i in range(12) for j in range(3)],
                 [ex(i, j) for i in range(12, 16) for j in range(3)], pairs, ["R"])
    r = oracle.study(ds)
    assert r["attribution"]["accuracy"] == 1.0 and r["attribution"]["n"] == 12
    assert r["lm_gain"]["gain_nats_per_word"]["diff"] > 0.05  # one word of six is the name
    # the questioner's own replies retrieve the reference exactly (same topic, same name)
    assert r["retrieval"]["rougeL_questioner_aware"] == 1.0 > r["retrieval"]["rougeL_responder"]
