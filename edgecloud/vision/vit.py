"""The official SAM image encoder (ViT-B/L/H), written here so a ``sam_vit_b_01ec64.pth``-style checkpoint loads.

Layout of the released checkpoints (``image_encoder.*``): a 16x16 patch-embed conv, an absolute position
embedding on a 64x64 grid (1024 px input), transformer blocks with pre-norm (LayerNorm eps 1e-6), attention with
decomposed relative positions (``rel_pos_h``/``rel_pos_w``, one row per offset) that is *windowed* (14x14) in most
blocks and *global* in a few (ViT-B: 2, 5, 8, 11), a GELU MLP (``mlp.lin1``/``lin2``), and a conv neck to 256
channels. Every size is read from the checkpoint's shapes, so ViT-B, -L and -H all load; what cannot be read
from a shape (which blocks are global) is read from the rel-pos table's length (2·window−1 vs 2·grid−1).

Smaller inputs than 1024 px (CPU budgets, tests) work as in SAM itself: the position embedding is resized
(bicubic) and the global blocks' relative-position tables are resized (linear) to the smaller grid; windowed
blocks are unchanged. The encoder takes images in [0, 1] and applies SAM's pixel normalisation itself.

Every block takes optional parallel adapters keyed by stream, exactly as the TinyViT encoder in ``sam.py`` (the
SAM-COD model runs on either).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from edgecloud.errors import UserError
from edgecloud.vision.sam import LayerNorm2d, MLPBlock

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
VIT_B = {"dim": 768, "depth": 12, "heads": 12, "global_blocks": (2, 5, 8, 11)}


def resize_rel_pos(table: torch.Tensor, q: int, k: int) -> torch.Tensor:
    """Relative-position rows for every (query, key) pair of 1-D sizes q, k: (q, k, head_dim)."""
    n = 2 * max(q, k) - 1
    if table.shape[0] != n:
        table = F.interpolate(table.T[None], size=n, mode="linear")[0].T
    qc = torch.arange(q)[:, None] * max(k / q, 1.0)
    kc = torch.arange(k)[None] * max(q / k, 1.0)
    return table[((qc - kc) + (k - 1) * max(q / k, 1.0)).long()]


class RelPosAttention(nn.Module):
    def __init__(self, dim: int, heads: int, rel_len: int):
        super().__init__()
        self.heads, self.hd = heads, dim // heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(rel_len, self.hd))
        self.rel_pos_w = nn.Parameter(torch.zeros(rel_len, self.hd))

    def forward(self, x):  # (B, H, W, C)
        B, H, W, C = x.shape
        q, k, v = self.qkv(x).view(B, H * W, 3, self.heads, self.hd).permute(2, 0, 3, 1, 4).reshape(3, -1, H * W,
                                                                                                       self.hd)
        rq = q.view(-1, H, W, self.hd)
        bias_h = torch.einsum("bhwc,hkc->bhwk", rq, resize_rel_pos(self.rel_pos_h, H, H))
        bias_w = torch.einsum("bhwc,wkc->bhwk", rq, resize_rel_pos(self.rel_pos_w, W, W))
        bias = (bias_h[..., :, None] + bias_w[..., None, :]).reshape(-1, H * W, H * W)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.view(B, self.heads, H, W, self.hd).permute(0, 2, 3, 1, 4).reshape(B, H, W, C))


class ViTBlock(nn.Module):
    """Pre-norm block; ``window`` 0 = global attention. Adapters see the block input, beside the attention."""

    def __init__(self, dim: int, heads: int, window: int, grid: int):
        super().__init__()
        self.window = window
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = RelPosAttention(dim, heads, 2 * (window or grid) - 1)
        self.mlp = MLPBlock(dim, 4 * dim, F.gelu)
        self.adapters = nn.ModuleDict()

    def _attend(self, x):
        if not self.window:
            return self.attn(x)
        B, H, W, C = x.shape
        w = self.window
        ph, pw = (-H) % w, (-W) % w
        x = F.pad(x, (0, 0, 0, pw, 0, ph))
        nh, nw = (H + ph) // w, (W + pw) // w
        x = x.view(B, nh, w, nw, w, C).transpose(2, 3).reshape(-1, w, w, C)
        x = self.attn(x).view(B, nh, nw, w, w, C).transpose(2, 3).reshape(B, nh * w, nw * w, C)
        return x[:, :H, :W]

    def forward(self, x, stream: str | None = None):  # (B, H, W, C)
        y = self._attend(self.norm1(x))
        if stream is not None and stream in self.adapters:
            y = y + self.adapters[stream](x)
        x = x + y
        return x + self.mlp(self.norm2(x))


class ImageEncoderViT(nn.Module):
    """(B, 3, S, S) in [0, 1] -> (B, out, S/patch, S/patch); same adapter interface as ``sam.TinyViT``."""

    def __init__(self, dim: int = 768, depth: int = 12, heads: int = 12, global_blocks=(2, 5, 8, 11),
                 window: int = 14, grid: int = 64, patch: int = 16, out: int = 256):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch, patch)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, dim))
        self.blocks = nn.ModuleList(ViTBlock(dim, heads, 0 if i in global_blocks else window, grid)
                                    for i in range(depth))
        self.neck = nn.Sequential(nn.Conv2d(dim, out, 1, bias=False), LayerNorm2d(out),
                                  nn.Conv2d(out, out, 3, padding=1, bias=False), LayerNorm2d(out))
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(1, 3, 1, 1), persistent=False)

    def attention_blocks(self) -> list[ViTBlock]:
        return list(self.blocks)

    def early_fusion_conv(self) -> nn.Conv2d:
        """A zero-initialised filter from a 1-channel map to the patch embedding (early fusion's 4th channel)."""
        p = self.patch_embed.proj
        conv = nn.Conv2d(1, p.out_channels, p.kernel_size, p.stride, bias=False)
        nn.init.zeros_(conv.weight)
        return conv

    def stem(self, x, extra=None):
        """Patch embed (+ ``extra``, same shape as its output) + position embedding -> tokens (B, N, C), (h, w)."""
        x = self.patch_embed.proj((x * 255 - self.pixel_mean) / self.pixel_std)
        if extra is not None:
            x = x + extra
        x = x.permute(0, 2, 3, 1)
        h, w = x.shape[1:3]
        pos = self.pos_embed
        if pos.shape[1:3] != (h, w):
            pos = F.interpolate(pos.permute(0, 3, 1, 2), size=(h, w), mode="bicubic",
                                align_corners=False).permute(0, 2, 3, 1)
        return (x + pos).flatten(1, 2), (h, w)

    def trunk(self, tokens, hw, stream: str | None = None):
        x = tokens.view(tokens.shape[0], *hw, -1)
        for b in self.blocks:
            x = b(x, stream)
        return self.neck(x.permute(0, 3, 1, 2))

    def forward(self, x, stream: str | None = None):
        return self.trunk(*self.stem(x), stream)


def vit_config_from_state(sd: dict[str, torch.Tensor], prefix: str = "image_encoder.") -> dict:
    """Encoder sizes read from an official checkpoint's shapes; a missing or odd key is one clear error."""
    def get(key):
        if prefix + key not in sd:
            raise UserError(f"SAM checkpoint: no {prefix + key}; this is not an official SAM ViT checkpoint")
        return sd[prefix + key]

    pos, proj = get("pos_embed"), get("patch_embed.proj.weight")
    if pos.ndim != 4 or proj.ndim != 4 or pos.shape[1] != pos.shape[2] or proj.shape[1] != 3:
        raise UserError(f"SAM checkpoint: pos_embed {tuple(pos.shape)} / patch_embed {tuple(proj.shape)} are not "
                        "a ViT image encoder's shapes")
    depth = 1 + max((int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"blocks\.(\d+)\.", k))),
                    default=-1)
    if depth == 0:
        raise UserError("SAM checkpoint: no image_encoder.blocks.*; not an official SAM ViT checkpoint")
    grid, dim = pos.shape[1], pos.shape[3]
    lens = [get(f"blocks.{i}.attn.rel_pos_h").shape for i in range(depth)]
    hd = lens[0][1]
    global_blocks = tuple(i for i, s in enumerate(lens) if s[0] == 2 * grid - 1)
    windowed = {s[0] for i, s in enumerate(lens) if i not in global_blocks}
    if len(windowed) > 1 or dim % hd:
        raise UserError(f"SAM checkpoint: relative-position tables {sorted({s for s in lens})} do not fit one window "
                        "size; not an official SAM ViT checkpoint")
    window = (windowed.pop() + 1) // 2 if windowed else 14
    return {"dim": dim, "depth": depth, "heads": dim // hd, "global_blocks": global_blocks, "window": window,
            "grid": grid, "patch": proj.shape[2], "out": get("neck.0.weight").shape[0]}
