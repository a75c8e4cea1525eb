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
