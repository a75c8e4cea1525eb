"""KIVI-style asymmetric quantization: keys per channel (groups of tokens), values per token (groups of channels).

Codes are bit-packed into uint8 so that stored bytes equal the nominal bits; scale and zero point are fp16 per group.
"""

from __future__ import annotations

import torch


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes < 2**bits, last dim a multiple of 8/bits -> packed uint8 (last dim · bits/8)."""
    per = 8 // bits
    q = q.to(torch.uint8).reshape(*q.shape[:-1], -1, per)
    shifts = (torch.arange(per, dtype=torch.uint8) * bits).to(q.device)
    return (q << shifts).sum(-1, dtype=torch.uint8)


def unpack(p: torch.Tensor, bits: int) -> torch.Tensor:
    per = 8 // bits
    shifts = (torch.arange(per, dtype=torch.uint8) * bits).to(p.device)
    return ((p.unsqueeze(-1) >> shifts) & (2**bits - 1)).reshape(*p.shape[:-1], -1)


def quantize(x: torch.Tensor, bits: int, dim: int) -> dict[str, torch.Tensor]:
    """Min/max asymmetric quantization with one (scale, zero) per slice reduced over ``dim``; codes packed on the
    last dim."""
    lo = x.amin(dim, keepdim=True)
    hi = x.amax(dim, keepdim=True)
    scale = ((hi - lo) / (2**bits - 1)).clamp_min(1e-8)
    q = ((x - lo) / scale).round().clamp(0, 2**bits - 1)
    return {"q": pack(q, bits), "scale": scale.half(), "zero": lo.half()}


def dequantize(c: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
    return unpack(c["q"], bits).float() * c["scale"].float() + c["zero"].float()


def quantize_keys(k: torch.Tensor, bits: int, group: int) -> dict[str, torch.Tensor]:
    """Per-channel: k (B, H, T, d) with T a multiple of ``group`` -> stats per (token block, channel)."""
    B, H, T, d = k.shape
    return quantize(k.reshape(B, H, T // group, group, d), bits, dim=-2)


def dequantize_keys(c: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
    x = dequantize(c, bits)  # (B, H, nblk, group, d)
    return x.reshape(x.shape[0], x.shape[1], -1, x.shape[-1])


def quantize_values(v: torch.Tensor, bits: int, group: int) -> dict[str, torch.Tensor]:
    """Per-token: v (B, H, T, d) -> stats per (token, channel group of ``group``)."""
    B, H, T, d = v.shape
    return quantize(v.reshape(B, H, T, d // group, group), bits, dim=-1)


def dequantize_values(c: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
    x = dequantize(c, bits)
    return x.reshape(*x.shape[:3], -1)
