"""The cloud model against the real SmolLM2-135M: cached lower layers + packed candidates + the sparse last layer
reproduce the plain model, and the soft prefix / restricted vocabulary compute what they claim."""

from __future__ import annotations

import pytest
import torch

from edgecloud.personal.anon import cloud, features

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def lm():
    from edgecloud.llm.models import load_model

    torch.set_num_threads(1)
    m = load_model("smollm2-135m")
    for p in m.model.parameters():
        p.requires_grad_(False)
    return m


@pytest.fixture(scope="module")
def seqs(lm):
    tok = lm.tokenizer
    p = features.prompt_ids(tok, "do you like sports?", 20)
    cands = [features.reply_ids(tok, t, 12) for t in ("yes I love football", "not really, I prefer books", "nah")]
    return p, cands


def test_lower_layers_and_packing_match_the_model(lm, seqs):
    p, cands = seqs
    ids = p + [t for c in cands for t in c]
    seg = [0] * len(p) + [j + 1 for j, c in enumerate(cands) for _ in c]
    alone = [p + c for c in cands]
    n = lm.model.config.num_hidden_layers
    hs = features.lower_hidden(lm, [ids] + alone, [seg] + [[0] * len(p) + [1] * len(c) for c in cands], n)
    with torch.no_grad():
        ref = lm.model(input_ids=torch.tensor([alone[1]]), output_hidden_states=True).hidden_states[-1][0]
    assert (lm.model.model.norm(hs[2]) - ref).abs().max() < 1e-3  # all 30 layers == the HF model (normed)
    off = len(p)
    for j, c in enumerate(cands):  # packed candidate j == candidate j run alone after the prompt
        got, want = hs[0][off:off + len(c)], hs[1 + j][len(p):]
        assert (got - want).abs().max() / want.abs().max() < 1e-5
        off += len(c)


def test_prefix_model_matches_a_dense_reference(lm, seqs):
    """token_nll (sparse last layer, per-segment gather, restricted vocabulary) == the dense computation: every
    position through the HF layer behind the prefix, final norm, full head, log-softmax."""
    p, cands = seqs
    n_top = 1
    ids = p + [t for c in cands for t in c]
    seg = torch.tensor([0] * len(p) + [j + 1 for j, c in enumerate(cands) for _ in c])
    (h,) = features.lower_hidden(lm, [ids], [seg.tolist()], lm.model.config.num_hidden_layers - n_top)
    mean, std = h.mean(0), h.std(0)
    m = cloud.CloudModel(lm, cloud.CloudConfig(n_top=n_top, k_prefix=3), 4, mean, std, seed=0)
    z = torch.randn(1, 4)
    ids_t = torch.tensor(ids)
    vocab = torch.unique(torch.cat([ids_t, torch.arange(500)]))
    with torch.no_grad():
        (out,), (full,) = m.token_nll([(h.half(), ids_t, seg)], z, vocab, full_seg=2)
        dec = lm.model.model
        k = 3
        segp = torch.cat([torch.zeros(k, dtype=torch.long), seg])
        x = torch.cat([m.prefix(z)[0], h.half().float()])[None]
        pos = torch.cat([torch.arange(k), k + features.positions(seg)])[None]
        hd = dec.norm(features.run_layers(m.top, dec.rotary_emb, x, pos, features.block_mask(segp)[None]))[0]
        logp = torch.log_softmax(hd @ lm.model.get_output_embeddings().weight.T, -1)
        logp_v = torch.log_softmax(hd @ lm.model.get_output_embeddings().weight[vocab].T, -1)
    want_v, want_full = [], None
    for j in range(1, len(cands) + 1):
        idx = (seg == j).nonzero().squeeze(1)
        prev = torch.cat([torch.tensor([len(p) - 1]), idx[:-1]]) + k
        want_v.append(-logp_v[prev, torch.searchsorted(vocab, ids_t[idx])])
        if j == 2:
            want_full = -logp[prev, ids_t[idx]]
    nll, segid = out
    assert torch.allclose(nll, torch.cat(want_v), atol=1e-4)
    assert segid.tolist() == [j for j, c in enumerate(cands, 1) for _ in c]
    assert torch.allclose(full, want_full, atol=1e-4)
    assert (nll[segid == 2] <= full + 1e-5).all()  # a softmax over fewer tokens gives each target more mass


def test_the_embedding_steers_the_prefix_and_training_moves_it(lm, seqs):
    p, cands = seqs
    ids = torch.tensor(p + cands[0])
    seg = torch.tensor([0] * len(p) + [1] * len(cands[0]))
    (h,) = features.lower_hidden(lm, [ids.tolist()], [seg.tolist()], lm.model.config.num_hidden_layers - 1)
    m = cloud.CloudModel(lm, cloud.CloudConfig(batch=2, epochs=4.0), 4, h.mean(0), h.std(0), n_users=2, seed=0)
    z = torch.zeros(2, 4)
    z[1, 0] = 5.0
    pre = m.prefix(z)
    assert not torch.allclose(pre[0], pre[1]) and torch.allclose(pre[0], m.bias)  # z = 0: the learned bias alone
    train = features.Packed(torch.stack([h, h]).reshape(-1, h.shape[1]).half(), torch.cat([ids, ids]),
                            torch.tensor([0, len(ids), 2 * len(ids)]), torch.tensor([len(p)] * 2),
                            torch.cat([seg, seg]))
    before = m.table.weight.detach().clone()
    vocab = cloud.vocabulary(train)

    def loss():
        with torch.no_grad():
            return float(torch.cat([n for n, _ in m.token_nll([train.seq(0), train.seq(1)], m.table.weight,
                                                                 vocab)]).mean())

    l0 = loss()
    curve = cloud.train_model(m, train, torch.tensor([0, 1]), lambda idx, u, g: m.table(u), 0, vocab)
    assert curve["steps"] == 4 and loss() < l0
    assert not torch.equal(before, m.table.weight)  # the static-ID table is trained


@pytest.mark.slow
def test_cli_basis_then_device_fit_and_their_refusals(tmp_path, capsys):
    """Cloud fits the basis on anonymous texts, a device fits its distribution from its own messages; a device
    with too little data, a file for another model, and a corrupt file are one-line errors (exit 2)."""
    from edgecloud.cli import main
    from edgecloud.personal.anon import device

    def run(args):
        try:
            main(["personal", *args])
        except SystemExit as e:
            return e.code
        return 0

    basis = tmp_path / "basis.safetensors"
    rc = run(["anon-basis", "--out", str(basis), "--users", "3", "--n-train", "8", "--dim", "4",
             "--anchors", "2"])
    assert rc == 0
    rc = run(["anon-fit", "--basis", str(basis), "--user", "1", "--out", str(tmp_path / "u1.st"),
             "--users", "3", "--n-train", "8", "--sigma", "0.3"])
    assert rc == 0
    b = device.Basis.load(basis)
    d = device.Distribution.load(tmp_path / "u1.st", b)
    assert d.kind == "gaussian" and d.mean.shape == (4,) and d.sigma == pytest.approx(0.3)
    rc = run(["anon-fit", "--basis", str(basis), "--user", "1", "--out", str(tmp_path / "u.st"),
             "--users", "3", "--n-train", "4"])
    assert rc == 2 and "this user has 4 messages; fitting a distribution needs at least 8" in capsys.readouterr().err
    b.model_fingerprint = "another-model"
    b.save(tmp_path / "other.safetensors")
    rc = run(["anon-fit", "--basis", str(tmp_path / "other.safetensors"), "--user", "1", "--out",
             str(tmp_path / "u.st"), "--users", "3", "--n-train", "8"])
    assert rc == 2 and "basis made for model another-model" in capsys.readouterr().err
    (tmp_path / "cut.st").write_bytes(basis.read_bytes()[:100])
    rc = run(["anon-fit", "--basis", str(tmp_path / "cut.st"), "--user", "1", "--out",
             str(tmp_path / "u.st"), "--users", "3", "--n-train", "8"])
    assert rc == 2 and "corrupt or truncated" in capsys.readouterr().err


@pytest.mark.slow
def test_train_on_the_store_then_serve_personalized_scores(tmp_path, lm, capsys):
    """The cloud trains on its store of anonymous uploads (anon-train), then answers score requests over the
    wire with the trained model: the same numbers as scoring in process; a model for another basis is refused."""
    import asyncio

    from edgecloud.cli import main
    from edgecloud.errors import UserError
    from edgecloud.personal.anon import device
    from edgecloud.personal.anon.data import DataConfig
    from edgecloud.personal.anon.server import AnonServer, DeviceClient, UploadStore

    g = torch.Generator().manual_seed(0)
    b = device.fit_basis(torch.randn(50, 576, generator=g), 4, 2, lm.fingerprint)
    b.save(tmp_path / "basis.st")
    store = UploadStore(tmp_path / "store")
    for i in range(6):
        store.append({"context": f"how was your day {i}?", "text": "pretty good, thanks", "embedding":
                      torch.randn(4, generator=g).tolist()})
    try:
        main(["personal", "anon-train", "--store", str(tmp_path / "store"), "--basis", str(tmp_path / "basis.st"),
              "--out", str(tmp_path / "cloud.st"), "--epochs", "0.7"])
    except SystemExit as e:
        assert e.code == 0, capsys.readouterr().err
    assert "trained on 6 uploads" in capsys.readouterr().out
    from safetensors import safe_open

    with safe_open(str(tmp_path / "cloud.st"), "pt") as f:
        assert not any("table" in k for k in f.keys())  # nothing per-user is served
    m = cloud.load_model_file(tmp_path / "cloud.st", lm, b.fingerprint())
    score = cloud.scorer(m, lm, DataConfig())
    d = device.fit(torch.randn(10, 576, generator=g), b, sigma=0.0)  # sigma 0: the same embedding every request
    want = score("how was your day?", ["pretty good", "the cat sat on the mat"], d.mean)

    async def main_():
        srv = AnonServer(store, 4, scorer=score)
        port = await srv.start()
        c = await DeviceClient.connect("127.0.0.1", port, d, b)
        try:
            return await c.score("how was your day?", ["pretty good", "the cat sat on the mat"])
        finally:
            await c.close()
            await srv.close()

    got = asyncio.run(main_())
    assert got == pytest.approx(want, abs=1e-5) and len(got) == 2
    other = device.fit_basis(torch.randn(50, 576, generator=g), 4, 2, lm.fingerprint)
    with pytest.raises(UserError, match="trained for basis"):
        cloud.load_model_file(tmp_path / "cloud.st", lm, other.fingerprint())


def test_contrast_ranking_is_the_nll_difference_against_the_reference(lm, seqs):
    p, cands = seqs
    ids = torch.tensor(p + [t for c in cands for t in c])
    seg = torch.tensor([0] * len(p) + [j + 1 for j, c in enumerate(cands) for _ in c])
    (h,) = features.lower_hidden(lm, [ids.tolist()], [seg.tolist()], lm.model.config.num_hidden_layers - 1)
    m = cloud.CloudModel(lm, cloud.CloudConfig(), 4, h.mean(0), h.std(0), seed=0)
    ev = features.Packed(h.half(), ids, torch.tensor([0, len(ids)]), torch.tensor([len(p)]), seg)
    vocab = cloud.vocabulary(ev)
    z, ref = torch.randn(1, 4, generator=torch.Generator().manual_seed(1)), torch.zeros(1, 4)
    embed = lambda idx, users, gen: z  # noqa: E731
    with torch.no_grad():
        means = [torch.stack([n[s == c].mean() for c in (1, 2, 3)])
                 for n, s in (m.token_nll([ev.seq(0)], w, vocab)[0] for w in (z, ref))]
    d = means[0] - means[1]
    out = cloud.evaluate(m, ev, torch.tensor([0]), embed, 0, vocab, ref=ref)
    assert out["hits_contrast"] == [int(bool((d[0] < d[1:]).all()))]
    assert out["hits"] == [int(means[0].argmin() == 0)]
    # the reference equal to the request's embedding: every contrast is 0, a tie, which counts as a miss
    assert cloud.evaluate(m, ev, torch.tensor([0]), embed, 0, vocab, ref=z)["hits_contrast"] == [0]
    assert "hits_contrast" not in cloud.evaluate(m, ev, torch.tensor([0]), embed, 0, vocab)
