"""Adapter generation: resumable peft training, next-fit fusion with rollback, the classification task head."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from edgecloud.errors import UserError
from edgecloud.llm.engine import Engine
from edgecloud.llm.models import LoadedModel, resolve
from edgecloud.lora.fusion import fuse
from edgecloud.lora.head import Head, compare, features, fit
from edgecloud.lora.tasks import CLASSES, examples


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve("smollm2-135m")[1], local_files_only=True)


def tiny_lm(tok) -> LoadedModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LoadedModel(LlamaForCausalLM(cfg).eval(), tok, "tiny", "tiny", Path("."))


def test_training_resumes_to_the_same_weights(tok, tmp_path, monkeypatch):
    """Interrupted after its step-2 checkpoint and run again, training ends with exactly the uninterrupted
    weights (AdamW moments and the data order are restored), in peft's on-disk format."""
    from edgecloud.lora import train as tr

    cfg = tr.TrainConfig(tasks=("arith", "json"), steps=4, batch=2, train_examples=16, checkpoint_every=2)
    tr.train(cfg, tmp_path / "full", "tiny", lm=tiny_lm(tok), log=lambda s: None)
    real, calls = tr.answer_loss, []

    def dies_at_step_3(*a):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(tr, "answer_loss", dies_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        tr.train(cfg, tmp_path / "cut", "tiny", lm=tiny_lm(tok), log=lambda s: None)
    assert (tmp_path / "cut" / "checkpoint-2" / "optimizer.safetensors").is_file()
    monkeypatch.setattr(tr, "answer_loss", real)
    info = tr.train(cfg, tmp_path / "cut", "tiny", lm=tiny_lm(tok), log=lambda s: None)
    assert info["resumed_at"] == 2
    a = load_file(str(tmp_path / "full" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "cut" / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny"
    assert not list((tmp_path / "cut").glob("checkpoint-*"))


def test_fusion_rolls_back_below_target():
    """c drags a below target in a+b+c: rolled back, c opens a new group; c+d fits; groups close at max_group."""
    acc = {("a+b", "a"): .9, ("a+b", "b"): .8, ("a+b+c", "a"): .5, ("a+b+c", "b"): .8, ("a+b+c", "c"): .9,
           ("c+d", "c"): .85, ("c+d", "d"): .7}
    trained = []

    def train_union(tasks, init, name):
        trained.append((name, init))
        return name

    groups, attempts = fuse(["a", "b", "c", "d"], dict.fromkeys("abcd", 0.6), {t: (t, 1.0) for t in "abcd"},
                            train_union, lambda ad, t: acc[(ad, t)], log=lambda s: None)
    assert [g.tasks for g in groups] == [["a", "b"], ["c", "d"]] and [g.adapter for g in groups] == ["a+b", "c+d"]
    assert [x["accepted"] for x in attempts] == [True, False, True] and attempts[1]["below_target"] == ["a"]
    assert trained == [("a+b", "a"), ("a+b+c", "a+b"), ("c+d", "c")]  # warm start from the group's adapter
    g2, att2 = fuse(["a", "b", "c"], dict.fromkeys("abc", 0.6), {t: (t, 1.0) for t in "abc"}, train_union,
                    lambda ad, t: acc[(ad, t)], max_group=2, log=lambda s: None)
    assert [g.tasks for g in g2] == [["a", "b"], ["c"]] and len(att2) == 1
    g3, att3 = fuse(["a", "b"], dict.fromkeys("ab", 0.6), {t: (t, 1.0) for t in "ab"}, train_union,
                    lambda ad, t: 1.0, stop=lambda name: name == "a+b", log=lambda s: None)
    assert [g.tasks for g in g3] == [["a"], ["b"]] and att3[0]["not_attempted"] == "time budget"
    with pytest.raises(UserError, match="target"):
        fuse(["a", "z"], {"a": 0.5}, {"a": ("a", 1.0)}, train_union, lambda ad, t: 1.0)


def test_head_fit_save_load_and_compare(tok, tmp_path):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(60, 8, generator=g)
    y = ["x" if v > 0 else "y" for v in h[:, 0]]
    head = fit(h, y, ["x", "y"])
    assert sum(p == t for p, t in zip(head.predict(h), y)) >= 57  # linearly separable (L2 keeps a margin)
    head.save(tmp_path / "head.safetensors")
    back = Head.load(tmp_path / "head.safetensors")
    assert back.labels == ["x", "y"] and torch.equal(back.logits(h), head.logits(h))

    from edgecloud.lora.layer import LoRAModel

    e = Engine(tiny_lm(tok), threads=1)
    lm = LoRAModel(e.model, "tiny")
    exs = examples("speaker", "train", 6)
    f = features(e, lm, None, exs, batch=4)
    alone = torch.cat([features(e, lm, None, [x]) for x in exs])
    assert f.shape == (6, 32) and torch.allclose(f, alone, atol=1e-5)  # right padding changes nothing
    head = fit(f, [x.answer for x in exs], CLASSES["speaker"]())
    r = compare(e, lm, None, head, exs[:2], max_new_tokens=3)
    assert r["n"] == 2 and 0 <= r["head_accuracy"] <= 1 and r["head_latency_ms"] > 0 and r["decode_latency_ms"] > 0
