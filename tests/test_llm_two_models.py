"""Both registry models load offline and model text sensibly (the second, larger one is Gemma-3-270M base)."""

from __future__ import annotations

import pytest

from edgecloud.llm import load_model
from edgecloud.llm.corpus import passages
from edgecloud.llm.engine import Engine


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_registry_model_perplexity_is_sane(name):
    lm = load_model(name)
    eng = Engine(lm, threads=1)
    text = passages()[0].text
    ppl = eng.perplexity(text, max_tokens=256)
    # a broken conversion (or a missing <bos> for Gemma) gives perplexities in the thousands
    assert 1.0 < ppl < 200.0, ppl
    assert len(eng.generate("The Python list type is", max_new_tokens=4).tokens) >= 1
