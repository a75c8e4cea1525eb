"""Key preparation before sparse coding: subtract a per-channel key mean, weight channels by what queries read.

Why: Gemma-3's pre-RoPE keys carry a large constant part (the channel mean holds 30–88 % of a key's energy per
layer after QK-norm), so MP spends atoms on it and every key's relative error lands on the part attention reads.
A per-layer, per-KV-head channel mean ``mean`` removes it exactly; the mean is added back after decoding. And the
error a query feels is ``q · R(Δ)(k̂ − k)``: with RoPE rotating channel pairs (i, i + d/2), its expectation over
queries weights each pair by the queries' energy in it, so keys are scaled per pair by the RMS query there
(``scale``, normalised to RMS 1) before coding and divided by it after: MP's squared error becomes the
query-weighted one (KIVI quantizes keys per channel for the same outlier channels).

Both are fitted once on the calibration text, like the dictionaries (model-side), and stored in the dictionary
file's metadata in fp16; a cache that uses them also counts their bytes per prompt (``nbytes``), conservatively.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from edgecloud.errors import UserError

MODES = ("", "center", "center+qscale")
FLOOR = 0.05  # smallest pair scale (a pair no query reads still gets coded, at 1/20 of the mean weight)


@dataclass
class KeyPrep:
    """``mean`` and ``scale``: (L, H, d) fp16-rounded, per layer and KV head; x -> (x − mean) · scale."""

    mean: torch.Tensor
    scale: torch.Tensor

    def forward(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """(B, H, T, d) pre-RoPE keys of ``layer`` -> the vectors that are coded."""
        return (x - self.mean[layer][:, None].to(x.dtype)) * self.scale[layer][:, None].to(x.dtype)

    def inverse(self, y: torch.Tensor, layer: int) -> torch.Tensor:
        return y / self.scale[layer][:, None].to(y.dtype) + self.mean[layer][:, None].to(y.dtype)

    def nbytes(self, layer: int) -> int:
        """fp16 bytes of one layer's mean (d per KV head) and scale (one per RoPE pair: d/2; none when all ones)."""
        unit = bool((self.scale[layer] == 1).all())
        return 2 * (self.mean[layer].numel() + (0 if unit else self.scale[layer].numel() // 2))

    def to_meta(self) -> dict:
        return {"key_mean": self.mean.tolist(), "key_scale": self.scale.tolist()}

    @classmethod
    def from_meta(cls, meta: dict, n_layers: int, head_dim: int, path="dictionary file") -> KeyPrep | None:
        if "key_mean" not in meta:
            return None
        try:
            mean = torch.tensor(meta["key_mean"], dtype=torch.float32)
            scale = torch.tensor(meta["key_scale"], dtype=torch.float32)
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{path}: key preparation metadata is corrupt ({e}); delete it and re-run") from None
        if mean.dim() != 3 or mean.shape != scale.shape or mean.shape[0] != n_layers or mean.shape[2] != head_dim \
                or not bool((scale > 0).all()):
            raise UserError(f"{path}: key mean/scale of shape {tuple(mean.shape)} do not fit {n_layers} layers x "
                            f"head_dim {head_dim} (or a scale is not positive); delete it and re-run")
        return cls(mean, scale)


def fit(keys: torch.Tensor, queries: torch.Tensor | None, mode: str) -> KeyPrep:
    """keys (L, H, M, d) pre-RoPE; queries (L, Hq, M', d) pre-RoPE, Hq a multiple of H (grouped-query attention).
    ``center``: the channel mean, unit scale; ``center+qscale``: also the per-RoPE-pair RMS query of the heads
    that read each KV head, normalised to RMS 1 over channels, floored at ``FLOOR``."""
    if mode not in MODES[1:]:
        raise UserError(f"keyprep={mode!r}: use one of {', '.join(repr(m) for m in MODES)}")
    L, H, _, d = keys.shape
    mean = keys.mean(2)
    scale = torch.ones_like(mean)
    if mode == "center+qscale":
        if queries is None:
            raise UserError("keyprep center+qscale needs calibration queries")
        e = queries.pow(2).mean(2)  # (L, Hq, d)
        e = e.reshape(L, H, -1, d).mean(2)  # the query heads sharing each KV head
        pair = (e[..., : d // 2] + e[..., d // 2:]) / 2  # RoPE rotates channel i with i + d/2
        s = torch.cat([pair, pair], -1).sqrt()
        s = s / s.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-12)
        scale = s.clamp_min(FLOOR)
    return KeyPrep(mean.half().float(), scale.half().float())


@contextmanager
def capture_queries(engine, on: bool = True):
    """Pre-RoPE queries (Hq, T, d) per layer of every forward pass inside the block: the output of the attention's
    q_norm where the model has one (Gemma 3), else of q_proj. Yields {layer: [tensor, ...]} (empty when not ``on``)."""
    out: dict[int, list[torch.Tensor]] = {}
    hooks = []
    for li, layer in enumerate(engine.model.model.layers if on else []):
        att = layer.self_attn
        mod = getattr(att, "q_norm", None) or att.q_proj
        hd = att.head_dim

        def hook(m, i, o, li=li, hd=hd, normed=mod is not att.q_proj):
            q = o[0] if normed else o[0].reshape(o.shape[1], -1, hd).transpose(0, 1)  # (Hq, T, d)
            out.setdefault(li, []).append(q.detach().float())

        hooks.append(mod.register_forward_hook(hook))
    try:
        yield out
    finally:
        for h in hooks:
            h.remove()
