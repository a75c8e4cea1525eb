"""SAM-COD (arXiv 2503.06042): a frozen SAM encoder with RGB and depth parallel adapters, two decoders, two distillers.

Variants (one class, chosen by ``CODConfig.variant``), all sharing the frozen LiteMedSAM encoder:

- ``zeroshot``: SAM as shipped, RGB + prompt, nothing trained.
- ``rgb`` / ``depth``: one stream, its adapters + a fine-tuned copy of the mask decoder.
- ``early``: early fusion: depth as a 4th input channel (a zero-initialised extra input filter in the patch embed),
  RGB adapters, fine-tuned decoder.
- ``samcod``: both streams; the RGB decoder is SAM's, the depth decoder a replica of it; a *hybrid prompt update*
  turns the mean of the two embeddings into an update added to the prompt's sparse tokens (box mode) and a dense
  prompt (both zero-initialised, so a fresh model is exactly SAM per stream) fed to both decoders; the
  prediction is the mean of the two decoders' logits. Losses: BCE + Dice on each decoder,
  a *model distiller* (each decoder's probability map pulled to the other's, detached: bidirectional) and a *modal
  distiller* (each stream's normalised embedding pulled to the other's, detached). ``distill=False`` drops both.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from edgecloud.errors import UserError
from edgecloud.vision.sam import SAM, Adapter, load_sam

VARIANTS = ("zeroshot", "rgb", "depth", "early", "samcod")


@dataclass
class CODConfig:
    variant: str = "samcod"
    distill: bool = True
    img_size: int = 128            # encoder input side (256 = the checkpoint's own; 128 is 4x cheaper on CPU)
    prompt: str = "box"            # "box" (a jittered box around the object) or "none"
    adapter_hidden: int = 16
    adapter_scale: float = 0.5
    lr: float = 1e-3               # adapters and prompt-update heads
    decoder_lr: float = 1e-4       # the fine-tuned mask decoder(s)
    steps: int = 60
    batch: int = 2
    w_model_distill: float = 0.5
    w_modal_distill: float = 0.5
    seed: int = 0
    sam_checkpoint: str = ""       # "" = LiteMedSAM (ships offline); or an official SAM ViT-B/L/H .pth/.safetensors

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise UserError(f"variant {self.variant!r}: choose one of {', '.join(VARIANTS)}")
        if self.prompt not in ("box", "none"):
            raise UserError(f"prompt {self.prompt!r}: choose 'box' or 'none'")
        if self.img_size % 32 or not 64 <= self.img_size <= 512:
            raise UserError(f"img_size {self.img_size}: give a multiple of 32 in 64..512")
        for name in ("adapter_hidden", "steps", "batch"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} {getattr(self, name)}: must be at least 1")

    def to_dict(self) -> dict:
        return asdict(self)


def dice_bce(logits, target):
    p = logits.sigmoid()
    inter = (p * target).sum((1, 2, 3))
    dice = 1 - (2 * inter + 1) / (p.sum((1, 2, 3)) + target.sum((1, 2, 3)) + 1)
    return F.binary_cross_entropy_with_logits(logits, target) + dice.mean()


class SAMCOD(nn.Module):
    def __init__(self, cfg: CODConfig, sam: SAM | None = None):
        super().__init__()
        self.cfg = cfg
        self.sam = sam if sam is not None else load_sam(cfg.img_size, cfg.sam_checkpoint or None)
        self.sam.img_size = self.sam.prompt_encoder.img_size = cfg.img_size
        for p in self.sam.parameters():
            p.requires_grad_(False)
        streams = {"rgb": ["rgb"], "early": ["rgb"], "depth": ["depth"], "samcod": ["rgb", "depth"]}
        self.streams = streams = streams.get(cfg.variant, [])
        for block in self.sam.image_encoder.attention_blocks():
            dim = block.attn.proj.out_features
            for s in streams:
                block.adapters[s] = Adapter(dim, cfg.adapter_hidden, cfg.adapter_scale)
        self.decoders = nn.ModuleDict({s: copy.deepcopy(self.sam.mask_decoder).requires_grad_(True) for s in streams})
        if cfg.variant == "early":
            self.depth_in = self.sam.image_encoder.early_fusion_conv()  # zero-initialised
        if cfg.variant == "samcod":
            self.prompt_token = nn.Linear(256, 256)
            self.prompt_dense = nn.Conv2d(256, 256, 1)
            for layer in (self.prompt_token, self.prompt_dense):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    def train(self, mode: bool = True):
        """The frozen SAM stays in eval mode: its BatchNorms keep the checkpoint's statistics while adapters train."""
        super().train(mode)
        self.sam.eval()
        return self

    def trainable(self):
        return [p for p in self.parameters() if p.requires_grad]

    def param_groups(self):
        dec = {id(p) for p in self.decoders.parameters()}
        return [{"params": [p for p in self.trainable() if id(p) not in dec], "lr": self.cfg.lr},
                {"params": list(self.decoders.parameters()), "lr": self.cfg.decoder_lr}]

    def _embed(self, x, stream: str | None, depth=None):
        enc = self.sam.image_encoder
        if self.cfg.variant == "early":  # the depth filter trains, so the stem runs with a graph
            return enc.trunk(*enc.stem(x, self.depth_in(depth)), stream)
        with torch.no_grad():
            tokens, hw = enc.stem(x)  # frozen and adapter-free: no graph needed
        return enc.trunk(tokens, hw, stream)

    def forward(self, rgb, depth, boxes):
        """rgb (B,3,S,S), depth (B,1,S,S) both in [0,1], boxes (B,4) or None -> dict of logits (B,1,S,S) + embeds."""
        boxes = boxes if self.cfg.prompt == "box" else None
        size = rgb.shape[2:]
        up = lambda t: F.interpolate(t, size=size, mode="bilinear", align_corners=False)  # noqa: E731
        if self.cfg.variant == "zeroshot":
            return {"logits": up(self.sam.decode(self.sam.image_encoder(rgb), boxes))}
        inputs = {"rgb": rgb, "depth": depth.repeat(1, 3, 1, 1)}
        embs = {s: self._embed(inputs[s], s, depth) for s in self.streams}
        extra_sparse = extra_dense = None
        if self.cfg.variant == "samcod":
            hybrid = (embs["rgb"] + embs["depth"]) / 2
            extra_sparse = self.prompt_token(hybrid.mean((2, 3)))[:, None]
            extra_dense = self.prompt_dense(hybrid)
        outs = {s: up(self.sam.decode(embs[s], boxes, self.decoders[s], extra_sparse, extra_dense))
                for s in self.streams}
        logits = torch.stack(list(outs.values())).mean(0)
        return {"logits": logits, "streams": outs, "embeddings": embs}

    def loss(self, out, target):
        total = sum(dice_bce(lg, target) for lg in out["streams"].values())
        parts = {"seg": float(total.detach())}
        if self.cfg.variant == "samcod" and self.cfg.distill:
            pr, pd = (out["streams"][s].sigmoid() for s in ("rgb", "depth"))
            model_kd = F.mse_loss(pr, pd.detach()) + F.mse_loss(pd, pr.detach())
            er, ed = (F.normalize(out["embeddings"][s].flatten(1), dim=1) for s in ("rgb", "depth"))
            modal_kd = F.mse_loss(er, ed.detach()) + F.mse_loss(ed, er.detach())
            modal_kd = modal_kd * er.shape[1]  # per-vector squared distance, not per-element
            total = total + self.cfg.w_model_distill * model_kd + self.cfg.w_modal_distill * modal_kd
            parts.update(model_kd=float(model_kd.detach()), modal_kd=float(modal_kd.detach()))
        return total, parts

    def trained_state(self) -> dict[str, torch.Tensor]:
        """Only what training changed (adapters, decoders, heads): the frozen SAM comes from its package."""
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v.detach().contiguous() for k, v in self.state_dict().items() if k in names}
