"""Which tokens the MPIC linker recomputes. A selector returns a bool mask over the prompt's positions.

Uncached text is always selected (it has no KV), and so is the last prompt token (its logits give the first answer
token). A chunk placed at position 0 is never selected: computed on its own from position 0 it *is* exact.

- ``MPICk(k)``: also the first ``k`` tokens of every other chunk (MPIC's choice, k=32): the chunk's first tokens
  carry its attention-sink mass, which is wrong once the chunk is no longer at the start of a sequence.
- ``CacheBlend(r)``: the ``r`` fraction of chunk tokens whose layer-1 KV deviates most from the reused KV. The
  deviation comes from a probe: layers 0-1 run over the whole prompt (2/L of a full prefill, counted in its time).
  The probe's fresh KV of layers 0-1 replaces the reused KV for *every* token (CacheBlend's reference code keeps it:
  it was computed anyway and is exact), so only layers 2.. carry reused KV for unselected tokens.
- ``FullReuse``: nothing beyond the text (MPIC-0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LinkContext:
    """What a selector may look at: the plan and the assembled (re-positioned) KV."""

    engine: object
    is_text: torch.Tensor  # (N,) bool: uncached text positions
    chunk_spans: list[tuple[int, int]]  # (start, end) of each cached chunk
    k: torch.Tensor  # (L, H, N, d) assembled keys
    v: torch.Tensor
    embeds: torch.Tensor  # (1, N, hidden) inputs


def base_mask(ctx: LinkContext) -> torch.Tensor:
    sel = ctx.is_text.clone()
    sel[-1] = True
    return sel


@dataclass
class MPICk:
    k: int = 32

    @property
    def name(self) -> str:
        return f"mpic-{self.k}"

    def __call__(self, ctx: LinkContext) -> torch.Tensor:
        sel = base_mask(ctx)
        for s, e in ctx.chunk_spans:
            if s > 0:
                sel[s : min(e, s + self.k)] = True
        return sel


def FullReuse() -> MPICk:  # noqa: N802 - reads as a selector name
    return MPICk(0)


@dataclass
class CacheBlend:
    r: float = 0.15
    probe_layer: int = 1

    @property
    def name(self) -> str:
        return f"cacheblend-{round(self.r * 100)}"

    def __call__(self, ctx: LinkContext) -> torch.Tensor:
        e = ctx.engine
        n = ctx.embeds.shape[1]
        probe = _Probe()
        pos = torch.arange(n)
        mask = pos[None, :] <= pos[:, None]
        e.forward_layers(ctx.embeds, pos, probe, mask, layers=range(self.probe_layer + 1), final=False)
        li = self.probe_layer
        fk, fv = probe.k[li], probe.v[li]
        dev = ((fk - ctx.k[li]) ** 2).sum((0, 2)) + ((fv - ctx.v[li]) ** 2).sum((0, 2))
        for layer, (k, v) in enumerate(zip(probe.k, probe.v)):  # keep the probe's exact KV for every token
            ctx.k[layer].copy_(k)
            ctx.v[layer].copy_(v)
        in_chunk = torch.zeros(n, dtype=torch.bool)
        for s, e_ in ctx.chunk_spans:
            if s > 0:
                in_chunk[s:e_] = True
        sel = base_mask(ctx)
        m = int(in_chunk.sum())
        if m:
            budget = max(1, round(self.r * m))
            dev = torch.where(in_chunk, dev, torch.full_like(dev, -1.0))
            sel[dev.topk(budget).indices] = True
        return sel


class _Probe:
    """A cache for the CacheBlend probe: full causal attention over fresh KV; keeps every probed layer's KV."""

    def __init__(self):
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []

    def update(self, k, v, layer_idx, *args, **kwargs):
        self.k.append(k[0])
        self.v.append(v[0])
        return k, v


SELECTORS = {"mpic": MPICk, "cacheblend": CacheBlend, "full-reuse": FullReuse}
