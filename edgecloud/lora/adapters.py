"""LoRA adapters in the standard peft on-disk format, read without peft (safetensors + adapter_config.json).

peft stores ``lora_A.weight`` (r, d_in) and ``lora_B.weight`` (d_out, r) under ``base_model.model.<module>``;
scaling is ``lora_alpha / r``. We keep A as (d_in, r) and B·scaling as (r, d_out), the layout ATMM multiplies.
Validation happens here, at the boundary: not a peft dir, another base (name or shape), rank beyond the operator.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from edgecloud.errors import UserError
from edgecloud.lora.atmm import MAX_RANK

PREFIX = "base_model.model."


@dataclass
class Adapter:
    name: str
    rank: int
    base: str
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A (d_in, r), B*scaling (r, d_out))


def linear_shapes(model) -> dict[str, tuple[int, int]]:
    """Linear layers by module name; a layer already wrapped by LoRALinear keeps its original name."""
    return {n.removesuffix(".base") if n.endswith(".base") else n: (m.in_features, m.out_features)
            for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def load_adapter(path: Path, model, base: str, name: str | None = None) -> Adapter:
    p = Path(path)
    cfg_p, w_p = p / "adapter_config.json", p / "adapter_model.safetensors"
    if not cfg_p.is_file() or not w_p.is_file():
        raise UserError(f"adapter {p}: not a peft adapter (needs adapter_config.json and adapter_model.safetensors)")
    try:
        cfg = json.loads(cfg_p.read_text())
    except ValueError as e:
        raise UserError(f"adapter {p}: adapter_config.json is not JSON ({e})") from e
    if cfg.get("peft_type", "LORA") != "LORA":
        raise UserError(f"adapter {p}: peft_type {cfg.get('peft_type')!r}, only LORA is served")
    r = int(cfg.get("r", 0))
    if not 1 <= r <= MAX_RANK:
        raise UserError(f"adapter {p}: rank r={r} is beyond the operator's 1..{MAX_RANK}; retrain with a smaller r")
    want = cfg.get("base_model_name_or_path")
    if want and Path(str(want)).name != base and want != base:
        raise UserError(f"adapter {p}: trained for base {want!r}, this server runs {base!r}")
    scaling = float(cfg.get("lora_alpha", r)) / r
    shapes = linear_shapes(model)
    tensors = load_file(str(w_p))
    weights = {}
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        mod = key[len(PREFIX):-len(".lora_A.weight")] if key.startswith(PREFIX) else key[:-len(".lora_A.weight")]
        b = tensors.get(key.replace(".lora_A.", ".lora_B."))
        if mod not in shapes or b is None:
            raise UserError(f"adapter {p}: module {mod!r} is not a linear layer of base {base!r}")
        d_in, d_out = shapes[mod]
        if tuple(a.shape) != (r, d_in) or tuple(b.shape) != (d_out, r):
            raise UserError(f"adapter {p}: {mod} has A{tuple(a.shape)} B{tuple(b.shape)}, base {base!r} needs "
                            f"A({r}, {d_in}) B({d_out}, {r}); adapter is for another base model")
        weights[mod] = (a.float().T.contiguous(), (b.float().T * scaling).contiguous())
    if not weights:
        raise UserError(f"adapter {p}: no lora_A/lora_B tensors found")
    return Adapter(name or p.name, r, base, weights)


def save_adapter(ad: Adapter, path: Path) -> None:
    """Write in peft format (scaling 1: lora_alpha = r), atomically (temp dir then rename)."""
    tensors = {}
    for mod, (a, b) in ad.weights.items():
        tensors[f"{PREFIX}{mod}.lora_A.weight"] = a.T.contiguous()
        tensors[f"{PREFIX}{mod}.lora_B.weight"] = b.T.contiguous()
    targets = sorted({m.rsplit(".", 1)[-1] for m in ad.weights})
    cfg = {"peft_type": "LORA", "r": ad.rank, "lora_alpha": ad.rank, "target_modules": targets,
           "base_model_name_or_path": ad.base, "task_type": "CAUSAL_LM", "bias": "none"}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        save_file(tensors, str(tmp / "adapter_model.safetensors"))
        (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=1))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def random_adapter(model, base: str, name: str, rank: int = 8, targets=("q_proj", "v_proj"), seed: int = 0,
                   scale: float = 0.02) -> Adapter:
    """A random-init adapter (both A and B non-zero so it changes outputs): bench variants and tests."""
    g = torch.Generator().manual_seed(seed)
    w = {}
    for mod, (d_in, d_out) in linear_shapes(model).items():
        if mod.rsplit(".", 1)[-1] in targets:
            w[mod] = (torch.randn(d_in, rank, generator=g) * scale, torch.randn(rank, d_out, generator=g) * scale)
    return Adapter(name, rank, base, w)
