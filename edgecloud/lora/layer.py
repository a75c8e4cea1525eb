"""Per-request LoRA on a base model: every targeted nn.Linear is wrapped so that one batch can mix adapters.

The batched engine (``edgecloud.llm.batch``) publishes which sequence each batch row belongs to
(``current_rows()``); :class:`LoRAModel` maps sequence -> adapter and each :class:`LoRALinear` adds
``Σ mask_i (x A_i) B_i`` through ATMM. Three modes:

- ``unmerged``: W untouched, every adapter on the side.
- ``merged`` / ``mixture``: the hot adapter m folded into W (W + A_m B_m); its rows need no side path; any other
  row is corrected by ``x(ΔW_i − ΔW_m)``, computed exactly in low rank as ``x [A_i | A_m] [B_i ; −B_m]`` (a row
  with no adapter gets ``−x A_m B_m``). ``merged`` is the case where every row uses m (side path skipped).

Switching folds ΔW = A B for all layers at once (one bmm per weight shape) and unmerging restores the saved
original weights, so repeated switches never accumulate rounding.
"""

from __future__ import annotations

import time
from collections.abc import Hashable

import torch

from edgecloud.errors import UserError
from edgecloud.llm.batch import current_rows
from edgecloud.lora.adapters import Adapter
from edgecloud.lora.atmm import Dispatch, delta

TARGETS = ("q_proj", "v_proj")


class LoRALinear(torch.nn.Module):
    def __init__(self, base: torch.nn.Linear, name: str, owner: LoRAModel):
        super().__init__()
        self.base, self.name = base, name
        self._owner = [owner]  # a list: not registered as a sub-module (no cycle in named_modules)

    def forward(self, x):
        o = self._owner[0]
        y = self.base(x)
        stack = o.stacks.get(self.name)
        if stack is None:
            return y
        rows = current_rows()
        idx_rows = o.row_index(rows if rows is not None else [None] * x.shape[0])
        if idx_rows is None:
            return y
        A, B = stack
        t = x.shape[-2] if x.dim() == 3 else 1
        idx = idx_rows.repeat_interleave(t)
        xf = x.reshape(-1, x.shape[-1])
        impl, block = o.dispatch.choose(xf.shape[0], int(torch.unique(idx[idx >= 0]).numel()), A.shape[2])
        o.calls[impl] = o.calls.get(impl, 0) + 1
        return y + delta(xf.to(A.dtype), A, B, idx, impl, block).reshape(y.shape).to(y.dtype)


class LoRAModel:
    """Adapters, per-sequence adapter choice, the mode, and the wrapped layers of one base model."""

    def __init__(self, model, base: str, targets=TARGETS, dispatch: Dispatch | None = None):
        self.model, self.base, self.dispatch = model, base, dispatch or Dispatch()
        self.adapters: dict[str, Adapter] = {}
        self.slot: dict[str, int] = {}
        self.seq_adapter: dict[Hashable, str | None] = {}
        self.default: str | None = None  # adapter for unbatched calls (current_rows() is None)
        self.merged: str | None = None
        self.stacks: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.layers: dict[str, LoRALinear] = {}
        self.original: dict[str, torch.Tensor] = {}
        self.calls: dict[str, int] = {}
        self.switch_s: list[float] = []
        for name, mod in list(model.named_modules()):
            for cname, child in list(mod.named_children()):
                full = f"{name}.{cname}" if name else cname
                if cname in targets and isinstance(child, torch.nn.Linear):
                    w = LoRALinear(child, full, self)
                    setattr(mod, cname, w)
                    self.layers[full] = w
        if not self.layers:
            raise UserError(f"base {base!r}: no linear layers named {targets} to wrap")

    # ---------------------------------------------------------------- adapters
    def add(self, ad: Adapter) -> None:
        missing = set(ad.weights) - set(self.layers)
        if missing:
            raise UserError(f"adapter {ad.name!r}: targets {sorted(missing)[:2]}… that this server does not wrap "
                            f"(wrapped: {TARGETS})")
        self.adapters[ad.name] = ad
        self.slot = {n: i for i, n in enumerate(self.adapters)}
        self._restack()

    def _restack(self) -> None:
        """Per layer, A (K+1, d_in, r) and B (K+1, r, d_out); slot K = 'no adapter'. With a merged adapter m each
        slot holds the exact low-rank correction [A_i | A_m], [B_i ; −B_m]."""
        self.stacks = {}
        if not self.adapters:
            return
        names = list(self.adapters)
        rmax = max(a.rank for a in self.adapters.values())
        m = self.adapters.get(self.merged) if self.merged else None
        for lname, layer in self.layers.items():
            d_in, d_out = layer.base.in_features, layer.base.out_features
            r_tot = rmax + (m.rank if m else 0)
            A = torch.zeros(len(names) + 1, d_in, r_tot)
            B = torch.zeros(len(names) + 1, r_tot, d_out)
            for k, n in enumerate(names):
                w = self.adapters[n].weights.get(lname)
                if w is not None:
                    A[k, :, :w[0].shape[1]], B[k, :w[1].shape[0]] = w
            if m is not None and lname in m.weights:
                am, bm = m.weights[lname]
                A[:, :, rmax:], B[:, rmax:] = am, -bm
            self.stacks[lname] = (A, B)

    def row_index(self, rows) -> torch.Tensor | None:
        """Stack slot per batch row; -1 = nothing to add (no adapter in unmerged mode, or the merged one)."""
        none_slot = len(self.adapters)
        out = []
        for r in rows:
            a = self.default if r is None else self.seq_adapter.get(r)
            if a is not None and a not in self.slot:
                raise UserError(f"unknown adapter {a!r}; loaded: {sorted(self.adapters)}")
            if a == self.merged:
                out.append(-1)
            else:
                out.append(self.slot[a] if a is not None else (none_slot if self.merged else -1))
        idx = torch.tensor(out)
        return None if bool((idx < 0).all()) else idx

    # ---------------------------------------------------------------- modes
    @torch.inference_mode()
    def merge(self, name: str | None) -> float:
        """Fold adapter ``name`` into the base weights (None: unmerge). Returns the switching time in seconds."""
        if name == self.merged:
            return 0.0
        if name is not None and name not in self.adapters:
            raise UserError(f"unknown adapter {name!r}; loaded: {sorted(self.adapters)}")
        t = time.perf_counter()
        for lname, w0 in self.original.items():
            self.layers[lname].base.weight.copy_(w0)
        self.original = {}
        if name is not None:
            ad = self.adapters[name]
            by_shape: dict[tuple, list[str]] = {}
            for lname in ad.weights:
                by_shape.setdefault(tuple(self.layers[lname].base.weight.shape), []).append(lname)
            for lnames in by_shape.values():  # ΔW = (A B)^T for every layer of one shape in a single bmm
                A = torch.stack([ad.weights[n][0] for n in lnames])
                B = torch.stack([ad.weights[n][1] for n in lnames])
                dW = torch.bmm(A, B).transpose(1, 2)
                for n, d in zip(lnames, dW):
                    w = self.layers[n].base.weight
                    self.original[n] = w.detach().clone()
                    w.add_(d.to(w.dtype))
        self.merged = name
        self._restack()
        dt = time.perf_counter() - t
        self.switch_s.append(dt)
        return dt
