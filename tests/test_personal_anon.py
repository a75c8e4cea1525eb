"""Anonymous user embeddings without the model: time split, candidates, device distributions, the attacker."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgecloud.errors import UserError
from edgecloud.personal.anon import attack, data, device
from edgecloud.personal.anon.features import block_mask, positions
from edgecloud.personal.chitchat import Turn


def synthetic_convs(n_users=4, per_user=30):
    """Conversations between user u and a partner; user u's replies are about topic u."""
    convs = []
    t = 0
    for u in range(n_users):
        for i in range(per_user):
            t += 1
            ts = f"2020-01-01T00:{t // 60:02d}:{t % 60:02d}Z"
            convs.append((Turn(f"c{u}-{i}", 0, f"partner-{u}", f"what about topic {i % 5} today", ts),
                          Turn(f"c{u}-{i}", 1, f"user-{u}", f"user {u} says thing {i} about topic {i % 5}", ts)))
    return tuple(convs)


def test_time_split_candidates_and_counts():
    cfg = data.DataConfig(users=4, n_train=10, n_eval=3, n_candidates=4, min_replies=20)
    ds = data.build(cfg, synthetic_convs())
    assert ds.summary() == {"users": 4, "train_examples": 40, "eval_examples": 12, "candidates": 4}
    assert sorted(ds.user_ids) == [f"user-{u}" for u in range(4)]
    for u in range(4):
        tr = [e.timestamp for e in ds.train if e.user == u]
        ev = [e.timestamp for e in ds.eval if e.user == u]
        assert len(tr) == 10 and len(ev) == 3 and max(tr) < min(ev)  # held out = later in time
    for e, cands in zip(ds.eval, ds.candidates):
        assert cands[0] == e.reply and len(cands) == 4 and len(set(cands)) == 4
        owner = ds.user_ids[e.user].split("-")[1]
        assert all(f"user {owner} " not in c for c in cands[1:])  # negatives come from other users


def test_too_little_data_is_one_clear_error():
    with pytest.raises(UserError, match="only 0 senders have at least"):
        data.build(data.DataConfig(users=2, n_train=40, n_eval=3), synthetic_convs(per_user=30))
    ex = [data.Example(0, "a", "b", f"t{i}") for i in range(10)]
    with pytest.raises(UserError, match="sender 7: 10 replies, need at least 50"):
        data.split_user(ex, data.DataConfig(), "sender 7")
    with pytest.raises(UserError, match="n_train"):
        data.DataConfig(n_train=1)


def test_block_mask_and_positions():
    seg = torch.tensor([0, 0, 1, 1, 2])
    m = block_mask(seg)
    assert m[4].tolist() == [True, True, False, False, True]  # candidate 2 sees the prompt and itself
    assert m[3].tolist() == [True, True, True, True, False]
    assert positions(seg).tolist() == [0, 1, 2, 3, 2]


def make_basis(dim=4, anchors=3, hidden=12, n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(n, hidden, generator=g) * torch.linspace(3, 0.5, hidden)
    return device.fit_basis(pool, dim, anchors, "model-A", seed=seed), pool


def test_basis_is_pca_of_the_pool():
    b, pool = make_basis()
    c = b.coords(pool)
    assert torch.allclose(c.mean(0), torch.zeros(4), atol=1e-4)
    assert torch.allclose(c.std(0), torch.ones(4), atol=1e-3)  # scaled to unit variance per direction
    assert torch.allclose(b.dirs @ b.dirs.T, torch.eye(4), atol=1e-5)


def test_gaussian_fit_radius_and_sampling_law():
    b, pool = make_basis()
    feats = pool[:50] + 5 * b.dirs[0]  # a user far out along the first direction
    d = device.fit(feats, b, "gaussian", sigma=0.7, radius=1.0)
    assert abs(float(d.mean.norm()) - 1.0) < 1e-5  # pulled inside the public radius
    z = d.sample(20000, b, torch.Generator().manual_seed(1))
    assert torch.allclose(z.mean(0), d.mean, atol=0.03)
    assert torch.allclose(torch.cov(z.T), 0.49 * torch.eye(4), atol=0.03)  # covariance sigma^2 I in the basis
    near = device.fit(pool[:50], b, "gaussian", sigma=0.0, radius=100.0)
    assert torch.allclose(near.mean, b.coords(pool[:50]).mean(0), atol=1e-5)  # inside the radius: kept


def test_mixture_weights_and_sampling_law():
    b, pool = make_basis()
    d = device.fit(pool[:60], b, "mixture", sigma=0.0, alpha=1.0)
    near = torch.cdist(b.coords(pool[:60]), b.anchors).argmin(1)
    want = (torch.bincount(near, minlength=3).float() + 1) / (60 + 3)
    assert torch.allclose(d.mean, want) and abs(float(d.mean.sum()) - 1) < 1e-6
    z = d.sample(30000, b, torch.Generator().manual_seed(2))
    hits = (torch.cdist(z, b.anchors) < 1e-6).float().mean(0)  # sigma 0: every sample is an anchor
    assert torch.allclose(hits, d.mean, atol=0.01)
    users = torch.tensor([0, 1, 0])
    many = device.sample_many([d, d], users, b, torch.Generator().manual_seed(3))
    assert many.shape == (3, 4)


def test_distribution_files_round_trip_and_refusals(tmp_path):
    b, pool = make_basis()
    d = device.fit(pool[:40], b, "gaussian", sigma=0.5)
    b.save(tmp_path / "basis.safetensors")
    d.save(tmp_path / "u.safetensors")
    b2 = device.Basis.load(tmp_path / "basis.safetensors", "model-A")
    assert b2.fingerprint() == b.fingerprint()
    d2 = device.Distribution.load(tmp_path / "u.safetensors", b2)
    assert torch.equal(d2.mean, d.mean) and d2.sigma == 0.5
    with pytest.raises(UserError, match="basis made for model model-A, this cloud runs model-B"):
        device.Basis.load(tmp_path / "basis.safetensors", "model-B")
    other, _ = make_basis(seed=5)
    with pytest.raises(UserError, match="fitted in basis"):
        device.Distribution.load(tmp_path / "u.safetensors", other)
    other.model_fingerprint = "model-B"
    with pytest.raises(UserError, match="fitted for model model-A"):
        device.Distribution.load(tmp_path / "u.safetensors", other)
    raw = (tmp_path / "u.safetensors").read_bytes()
    (tmp_path / "bad.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(UserError, match="corrupt or truncated"):
        device.Distribution.load(tmp_path / "bad.safetensors", b)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 7)
    with pytest.raises(UserError, match="corrupt or truncated"):
        device.Basis.load(tmp_path / "junk.safetensors")
    with pytest.raises(UserError, match="format"):
        device.Distribution.load(tmp_path / "basis.safetensors", b)  # a basis file is not a distribution
    with pytest.raises(UserError, match="needs at least 8"):
        device.fit(pool[:3], b)
    with pytest.raises(UserError, match="kind="):
        device.fit(pool[:40], b, "uniform")


def test_attacker_extremes():
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(8), 20)
    static = rng.normal(size=(8, 6))[users]  # one fixed embedding per user
    assert attack.classifier_top1(static, users, static, users) == 1.0
    assert attack.linker(static, users, 8)["top1"] == 1.0
    same = rng.normal(size=(len(users), 6))  # every user draws from the same distribution
    later = rng.normal(size=(len(users), 6))
    assert attack.classifier_top1(same, users, later, users) < 0.125 + 0.1
    assert attack.linker(later, users, 8)["ari"] < 0.05
    zero = np.zeros((len(users), 6))
    assert attack.classifier_top1(zero, users, zero, users) == pytest.approx(1 / 8)


def test_attacker_matches_the_bayes_rate_of_two_gaussians():
    """Two users N(+m, 1) and N(-m, 1) in 1-D: the best attribution is Phi(m); the classifier must get close."""
    from scipy.stats import norm

    rng = np.random.default_rng(1)
    m = 0.5
    u = np.repeat([0, 1], 4000)
    z = (np.where(u == 0, m, -m) + rng.normal(size=len(u)))[:, None]
    z2 = (np.where(u == 0, m, -m) + rng.normal(size=len(u)))[:, None]
    assert abs(attack.classifier_top1(z, u, z2, u) - norm.cdf(m)) < 0.02


def test_identity_oracles_find_a_planted_author_signal():
    from edgecloud.personal.anon import oracle

    cfg = data.DataConfig(users=4, n_train=10, n_eval=3, n_candidates=4, min_replies=20)
    r = oracle.evaluate(cfg, 10, convs=synthetic_convs())
    acc = {a["oracle"]: a for a in r["arms"]}
    assert r["eval_examples"] == 12 and r["chance"] == 0.25
    # every reply names its author ("user u says ..."): knowing the user's replies identifies the real one
    assert acc["author classifier"]["acc"] == 1.0 and acc["user/background ratio"]["acc"] == 1.0
    assert acc["author classifier"]["vs_none"]["diff"] == pytest.approx(1.0 - acc["none"]["acc"])


def test_paired_diff_and_strict_hits():
    from edgecloud.personal.anon.oracle import _hits, paired_diff

    a, b = np.array([1, 1, 0, 1.0]), np.array([0, 1, 0, 0.0])
    d = paired_diff(a, b, n_boot=500)
    assert d["diff"] == 0.5 and 0 <= d["ci95"][0] <= 0.5 <= d["ci95"][1] <= 1 and d["n"] == 4
    same = paired_diff(a, a, n_boot=200)
    assert same["diff"] == 0 and same["ci95"] == [0, 0] and same["p_le_0"] == 1.0
    assert _hits([np.array([2.0, 1.0]), np.array([1.0, 1.0]), np.array([0.0, 1.0])]).tolist() == [1, 0, 0]


def test_summary_keys_gain_intervals_and_contrast():
    from edgecloud.personal.anon import bench

    dcfg = data.DataConfig(users=4, n_train=10, n_eval=3, n_candidates=4, min_replies=20)
    ds = data.build(dcfg, synthetic_convs())
    cfg = bench.BenchConfig(data=dcfg, anchors=2, sigmas=(2.0,), seeds=(0,), skip_mixture=True)
    assert [a[0] for a in bench.arms(cfg)] == ["none", "static", "gaussian s=2"]
    n = len(ds.eval)

    def row(kind, hits, chits=None):
        r = {"kind": kind, "sigma": 0.0, "acc": sum(hits) / n, "lm_loss": 4.0, "ppl": 54.6, "attack_top1": 0.25,
             "link_top1": 0.25, "link_ari": 0.0, "hits": hits}
        return r | ({"acc_contrast": sum(chits) / n, "hits_contrast": chits} if chits else {})

    none, static = [0] * n, [1] * 6 + [0] * (n - 6)
    per_seed = [{"none": row("none", none), "static": row("static", static, [1] * n),
                 "gaussian s=2": row("gaussian", [1] * 3 + [0] * (n - 3), [1] * 9 + [0] * (n - 9))}]
    d = bench.summarize(cfg, ds, per_seed, 1.0)
    assert all(k in d for k in bench.CONTRACT) and d["acc_mixture"] is None
    assert d["gain_recovered"] == pytest.approx(0.5) and d["gain_recovered_contrast"] == pytest.approx(0.75)
    assert d["static_gain"]["diff"] == pytest.approx(0.5) and d["static_gain_contrast"]["diff"] == 1.0
    assert d["anonymous_gain_contrast"]["ci95"][0] > 0


def test_style_history_is_the_training_period_only_evenly_spaced():
    from edgecloud.personal.anon import style

    cfg = data.DataConfig(users=3, n_train=5, n_eval=2, min_replies=20)
    chosen, by = data.select_users(cfg, synthetic_convs(n_users=3, per_user=30))
    texts, users = style.history(cfg, chosen, by, 10)
    assert users.tolist() == [0] * 10 + [1] * 10 + [2] * 10
    for u, s in enumerate(chosen):
        tr, ho = data.split_user(by[s], cfg)
        mine = texts[10 * u:10 * u + 10]
        assert set(mine) <= {e.reply for e in tr} and not set(mine) & {e.reply for e in ho}
        assert mine[0] == tr[0].reply and mine[-1] == tr[-1].reply  # spread over the whole period
    texts, users = style.history(cfg, chosen, by, 1000)  # capped by what the device has
    assert np.bincount(users).tolist() == [24, 24, 24]


def test_static_mean_arm_is_the_users_exact_mean_and_configs_are_checked():
    from edgecloud.personal.anon import bench

    g = torch.Generator().manual_seed(0)
    users = torch.arange(3).repeat_interleave(20)
    feats = torch.randn(60, 10, generator=g) + 4 * torch.nn.functional.one_hot(users, 10)  # users far apart
    basis = device.fit_basis(feats, 4, 2, "m")
    cfg = bench.BenchConfig(data=data.DataConfig(users=4), anchors=2)
    dists = bench.fit_users("gaussian", 0.0, cfg, feats, users, 3, basis, radius=float("inf"))
    for u in range(3):
        want = basis.coords(feats[users == u]).mean(0)
        torch.testing.assert_close(dists[u].mean, want)  # not pulled inside the radius
        z = device.sample_many(dists, torch.tensor([u, u]), basis, g)
        torch.testing.assert_close(z, want.expand(2, -1))  # no noise: the same vector on every upload
    clipped = bench.fit_users("gaussian", 0.0, cfg, feats, users, 3, basis)
    assert all(float(d.mean.norm()) == pytest.approx(cfg.radius) for d in clipped)  # all were outside: pulled in
    for bad, msg in (({"space": "bow"}, "space="), ({"static": "id"}, "static="), ({"history": 2}, "history=")):
        with pytest.raises(UserError, match=msg):
            bench.BenchConfig(data=data.DataConfig(users=4), anchors=2, **bad)


def test_style_head_learns_a_planted_style_map_and_no_embedding_is_chance():
    from edgecloud.personal.anon import critic

    g = torch.Generator().manual_seed(0)
    users = torch.arange(8).repeat_interleave(50)
    means = torch.randn(8, 6, generator=g) * 2
    z = means[users]  # static embeddings: the user's mean
    texts = z @ torch.randn(6, 6, generator=g) + 0.5 * torch.randn(400, 6, generator=g)  # style follows the user
    w = critic.train(texts, z, critic.CriticConfig(steps=200, batch=64, lr=0.05), seed=0)
    # each request: its own user's text among 4 texts by other users
    ev_u = torch.arange(8)
    cands = torch.stack([texts[(users == u).nonzero()[-1, 0]] for u in range(8)])
    cc = torch.stack([cands[torch.tensor([u] + [(u + k) % 8 for k in (1, 2, 3)])] for u in range(8)])
    assert sum(critic.hits(w, cc, means[ev_u])) >= 7
    assert critic.hits(w, cc, torch.zeros(8, 6)) == pytest.approx([0.25] * 8)  # all tie: a random pick's hit rate
    with pytest.raises(UserError, match="critic"):
        critic.CriticConfig(batch=1)
