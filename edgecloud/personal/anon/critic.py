"""A discriminative style head: which text goes with which upload embedding, learned from uploads alone.

The LM arms rank candidates by their likelihood given the embedding; that likelihood is dominated by what every
user shares, so identity used generatively moves almost nothing (the identity oracles, :mod:`.oracle`). This head
uses the embedding the way the author classifier does: a bilinear critic ``s(c, z) = g(c)^T W z`` between the
candidate's style coordinates ``g(c)`` (MiniLM of the text in the public basis, computed by the cloud) and the
upload's embedding ``z``, trained with InfoNCE over the cloud's (embedding, text) uploads: in a batch, each
upload's own text must score above the other uploads' texts. No identifier is used; the critic is a shared map
from style to style, not a table. At inference the candidate with the highest ``s(c, z)`` wins.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edgecloud.errors import UserError


@dataclass(frozen=True)
class CriticConfig:
    steps: int = 300
    batch: int = 256
    lr: float = 0.01
    weight_decay: float = 1e-3
    temperature: float = 1.0

    def __post_init__(self):
        if self.steps < 1 or self.batch < 2 or not self.lr > 0 or self.weight_decay < 0 or not self.temperature > 0:
            raise UserError("critic: need steps >= 1, batch >= 2, lr > 0, weight_decay >= 0, temperature > 0")


def train(text_coords: torch.Tensor, z: torch.Tensor, cfg: CriticConfig, seed: int = 0) -> torch.Tensor:
    """``W`` (text dim, emb dim) by in-batch InfoNCE over uploads (``text_coords[i]`` was sent with ``z[i]``)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.zeros(text_coords.shape[1], z.shape[1], requires_grad=True)
    opt = torch.optim.Adam([w], lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = len(z)
    for _ in range(cfg.steps):
        idx = torch.randint(0, n, (min(cfg.batch, n),), generator=gen)
        logits = (z[idx] @ w.T @ text_coords[idx].T) / cfg.temperature  # (b uploads, b texts)
        loss = torch.nn.functional.cross_entropy(logits, torch.arange(len(idx)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return w.detach()


def hits(w: torch.Tensor, cand_coords: torch.Tensor, z: torch.Tensor) -> list[float]:
    """Per request: 1 when its real reply (candidate 0) scores highest, 1/k when it ties with k - 1 others (the
    expected hit of a random tie-break: z = 0 gives exactly chance)."""
    s = torch.einsum("nct,te,ne->nc", cand_coords, w, z)
    top = s == s.max(1, keepdim=True).values
    return (top[:, 0].float() / top.sum(1)).tolist()
