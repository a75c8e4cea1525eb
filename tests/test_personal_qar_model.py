"""QAR's dual-tower model on the real SmolLM2-135M: generation equals the shared batched engine, the output is the
mean of the two towers (checked against a hand-written specific stream), training resumes exactly from a
checkpoint, and the respond/qar-train CLI's bad input is one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from edgecloud.errors import UserError
from edgecloud.personal.qar.exchanges import Exchange
from edgecloud.personal.qar.model import Batch, DualTower, ModelConfig


@pytest.fixture(scope="module")
def lm_loader():
    from edgecloud.llm.models import load_model

    torch.set_num_threads(1)
    return lambda: load_model("smollm2-135m")


PROMPTS = ["You are Hamlet. Reply briefly.", "You are Iago. Horatio speaks to you. Reply briefly."]
LINES = ["Who's there?", "My lord, I came to see your father's funeral."]


def _ids(tok):
    from edgecloud.llm.prompts import chat_prompt

    return [tok(chat_prompt(s, q))["input_ids"] for s, q in zip(PROMPTS, LINES)]


def test_generation_matches_shared_batched_engine(lm_loader):
    from edgecloud.llm.batch import generate_batch
    from edgecloud.llm.engine import Engine

    lm = lm_loader()
    ids = _ids(lm.tokenizer)
    eng = Engine(lm, threads=1)
    ref = [[t for t in r.tokens if t not in eng.eos_ids] for r in generate_batch(eng, ids, 8)]
    model = DualTower(lm, ModelConfig(lora=False, towers=False, top_layers=2))
    assert model.generate(ids, None, 8) == ref
    # the frozen prefill can be computed once and shared (what the bench does across arms)
    assert model.generate(ids, None, 8, prefilled=model.prefill_bottom(ids)) == ref


def _specific_stream(model: DualTower, ids, pair: int) -> torch.Tensor:
    """The specific tower written out for one unpadded sequence: base layers to the split, then the pair embedding,
    then per top layer attention + base MLP + the added low-rank SwiGLU on its own norm, then its own final norm."""
    dec = model.decoder
    x = torch.tensor([ids])
    pos = torch.arange(len(ids)).unsqueeze(0)
    mask = torch.ones(len(ids), len(ids), dtype=torch.bool).tril().reshape(1, 1, len(ids), len(ids))
    h = dec.embed_tokens(x)
    pe = dec.rotary_emb(h, pos)
    for i, layer in enumerate(dec.layers):
        if i == model.split:
            h = h + model.pair_emb.weight[pair]
        a, _ = layer.self_attn(layer.input_layernorm(h), position_embeddings=pe, attention_mask=mask)
        h = h + a
        hn = layer.post_attention_layernorm(h)
        m = layer.mlp(hn)
        if i >= model.split:
            j = i - model.split
            sn = model.spec_norm[j](h)
            sw = model.spec_mlp[j]
            m = m + sw.down(torch.nn.functional.silu(sw.gate(sn)) * sw.up(sn))
        h = h + m
    return model.norm_spec(h)[0]


@torch.no_grad()
def test_output_is_mean_of_towers(lm_loader):
    torch.manual_seed(0)
    model = DualTower(lm_loader(), ModelConfig(top_layers=2, n_pairs=3, n_clusters=2))
    ids = _ids(model.tok)
    b = Batch.left_pad(ids)
    pairs = torch.tensor([2, 1])
    # at initialization the specific tower adds nothing: the dual model equals its general tower (base + LoRA)
    g0, s0 = model.top(model.bottom(b), b, pairs)
    g_only, none = model.top(model.bottom(b), b, pairs, towers=False)
    assert none is None and torch.allclose(s0, g0, atol=1e-5) and torch.allclose(g0, g_only)
    # give every tower parameter a non-zero value, LoRA included
    for n, p in model.trainable().items():
        p.normal_(0, 0.02 if "lora_" in n or "spec_mlp" in n else 0.5) if "norm" not in n else p.mul_(1.1)
    g, s = model.top(model.bottom(b), b, pairs)
    g_alone, _ = model.top(model.bottom(b), b, pairs, towers=False)
    assert torch.allclose(g, g_alone, atol=1e-5)  # the streams do not see each other
    assert not torch.allclose(g, s, atol=1e-3)
    for row, seq in enumerate(ids):
        want_s = _specific_stream(model, seq, int(pairs[row]))
        got_s = s[row, s.shape[1] - len(seq):]
        assert torch.allclose(got_s, want_s, atol=1e-4)
        got = model.logits(g[row, -1], s[row, -1])
        want = model.causal.lm_head((g_alone[row, -1] + want_s[-1]) / 2)
        assert torch.allclose(got, want, atol=1e-3)
    # generation uses the same merged state: its first token is the argmax of the mean-of-towers logits
    first = [o[0] if o else None for o in model.generate(ids, pairs.tolist(), 1)]
    want_first = model.logits(g[:, -1], s[:, -1]).argmax(-1).tolist()
    assert [f for f in first if f is not None] == [w for w, f in zip(want_first, first) if f is not None]


EXS = [Exchange("Hamlet (hamlet)", q, line, reply, pair=p, cluster=c) for q, line, reply, p, c in [
    ("Horatio (hamlet)", "My lord, I think I saw him yesternight.", "Saw? who?", 0, 0),
    ("Polonius (hamlet)", "What do you read, my lord?", "Words, words, words.", 1, 0),
    ("Horatio (hamlet)", "Hail to your lordship!", "I am glad to see you well.", 0, 1),
    ("Polonius (hamlet)", "My lord, the queen would speak with you.", "Do you see yonder cloud?", 1, 1),
    ("Horatio (hamlet)", "It beckons you to go away with it.", "It will not speak; then I will follow it.", 0, 0),
    ("Polonius (hamlet)", "Will you walk out of the air, my lord?", "Into my grave.", 1, 0)]]


@pytest.mark.slow
def test_training_resumes_exactly(lm_loader, tmp_path):
    from edgecloud.personal.qar.train import TrainConfig, read_checkpoint, train

    mc = ModelConfig(top_layers=1, n_pairs=2, n_clusters=2, lora_rank=2, spec_rank=2, proj_dim=4)
    tc = TrainConfig(steps=4, batch_size=3, ckpt_every=2, seed=3)
    straight = DualTower(lm_loader(), mc)
    info = train(straight, EXS, tc, ckpt=tmp_path / "a.safetensors", meta={"pairs": [["H", "A"], ["H", "B"]]})
    assert info["steps_run"] == 4 and info["con_last"] > 0  # the contrastive loss was active
    # a run stopped after step 2, then resumed from its checkpoint, ends with the same parameters
    half = DualTower(lm_loader(), mc)
    train(half, EXS, TrainConfig(**{**tc.__dict__, "steps": 4}), ckpt=tmp_path / "b.safetensors",
          meta={"pairs": [["H", "A"], ["H", "B"]]}, stop_after=2)
    tensors, meta = read_checkpoint(tmp_path / "b.safetensors")
    assert meta["step"] == "2"
    resumed = DualTower(lm_loader(), mc)
    info = train(resumed, EXS, tc, ckpt=tmp_path / "b.safetensors", meta={"pairs": [["H", "A"], ["H", "B"]]})
    assert info["resumed_from"] == 2 and info["steps_run"] == 2
    a, b = straight.trainable(), resumed.trainable()
    for n in a:
        assert torch.allclose(a[n], b[n], atol=1e-6), n
    # another base model's checkpoint is refused in one line
    from edgecloud.personal.qar.train import check_base

    with pytest.raises(UserError, match="trained on base model"):
        check_base(meta, "gemma3-270m-0000", tmp_path / "b.safetensors")


def _cli(*args, env_cache):
    import os

    env = {**os.environ, "EDGECLOUD_CACHE": str(env_cache), "EDGECLOUD_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "edgecloud", "personal", *args], capture_output=True, text=True,
                          env=env, timeout=600)


@pytest.mark.slow
def test_respond_cli_errors_and_answer(lm_loader, tmp_path):
    from edgecloud.paths import cache_root
    from edgecloud.personal.qar.train import TrainConfig, save_checkpoint

    mc = ModelConfig(top_layers=1, n_pairs=2, n_clusters=1, lora_rank=2, spec_rank=2, proj_dim=4)
    model = DualTower(lm_loader(), mc)
    opt = torch.optim.AdamW(list(model.trainable().values()))
    meta = {"corpus": "plays", "arm": "qar", "pairs": [["Hamlet (hamlet)", "Horatio (hamlet)"],
                                                        ["Hamlet (hamlet)", "Polonius (hamlet)"]],
            "train_config": TrainConfig().__dict__}
    ck = tmp_path / "q.safetensors"
    save_checkpoint(ck, model, opt, None, 1, meta)
    cache = cache_root()
    r = _cli("respond", "--checkpoint", str(ck), "--responder", "Ophelia", "--questioner", "Horatio", "Hi",
             env_cache=cache)
    assert r.returncode == 2 and "unknown responder" in r.stderr and "Hamlet (hamlet)" in r.stderr
    r = _cli("respond", "--checkpoint", str(ck), "--responder", "hamlet", "--questioner", "Laertes", "Hi",
             env_cache=cache)
    assert r.returncode == 2 and "Horatio (hamlet), Polonius (hamlet)" in r.stderr
    r = _cli("respond", "--checkpoint", str(tmp_path / "none.safetensors"), "--responder", "hamlet",
             "--questioner", "Horatio", "Hi", env_cache=cache)
    assert r.returncode == 2 and "qar-train" in r.stderr
    # a checkpoint made on another base model
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(ck), framework="pt") as f:
        md, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    md["base_fingerprint"] = "gemma3-270m-0123456789abcdef"
    other = tmp_path / "other.safetensors"
    save_file(tensors, str(other), metadata=md)
    r = _cli("respond", "--checkpoint", str(other), "--responder", "hamlet", "--questioner", "Horatio", "Hi",
             env_cache=cache)
    assert r.returncode == 2 and "trained on base model gemma3-270m" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = _cli("respond", "--checkpoint", str(ck), "--responder", "hamlet", "--questioner", "horatio (hamlet)",
             "--max-new-tokens", "4", "--json", "Who's there?", env_cache=cache)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["responder"] == "Hamlet (hamlet)" and d["questioner"] == "Horatio (hamlet)" and d["reply"]
