"""Per-request LoRA on a base model: every targeted nn.Linear is wrapped so that one batch can mix adapters.

The batched engine (``edgecloud.llm.batch``) publishes which sequence each batch row belongs to
(``current_rows()``); :class:`LoRAModel` maps sequence -> adapter and each :class:`LoRALinear` adds
``Σ mask_i (x A_i) B_i`` through ATMM. Three modes:

- ``unmerged``: W untouched, every adapter on the side.
- ``merged`` / ``mixture``: the hot adapter m folded into W (W + A_m B_m); its rows need no side path; any other
  row i is corrected by ``x(ΔW_i − ΔW_m) = x [A_i | A_m] [B_i ; −B_m]``: one ATMM call over a rank-2r "mixture
  stack" built once per merged adapter (a row without adapter uses [0 | A_m] [0 ; −B_m]), so mixture pays one
  side path over the non-hot rows only — not two calls per layer, which made it slower than unmerged. ``merged``
  is the case where every row uses m (the side path skipped).

Switching folds ΔW = A B for all layers at once: the wrapped weights of one shape are views into one stacked
tensor, so a merge is one ``baddbmm`` per weight shape (W = W0 + Bᵀ Aᵀ, written from the pristine stack) and an
unmerge one copy of it; repeated switches never accumulate rounding, and a switch never rebuilds the adapter
stacks (they do not depend on the mode). The per-row adapter slots are computed once per forward pass, not per
layer.
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
        plan = o.row_index(rows if rows is not None else [None] * x.shape[0])
        if plan is None:
            return y
        idx, distinct = o.expand(plan, x.shape[-2] if x.dim() == 3 else 1)
        xf = x.reshape(-1, x.shape[-1])
        yf = y.reshape(-1, y.shape[-1])  # a view: the side paths add into y in place (no copy of the output)
        A, B = o.mix_stack(self.name) if o.merged is not None else stack
        impl, block = o.dispatch.choose(xf.shape[0], distinct, A.shape[2])
        o.calls[impl] = o.calls.get(impl, 0) + 1
        yf.add_(delta(xf.to(A.dtype), A, B, idx, impl, block).to(y.dtype))
        return yf.reshape(y.shape)


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
        self.original: dict[str, torch.Tensor] = {}  # layers the merged adapter changed -> their pristine weight
        self._plan: tuple | None = None
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
        # The wrapped weights of one shape become views into one (layers, out, in) tensor, with a pristine copy
        # kept once: a merge writes W = W0 + B^T A^T for every layer of that shape in one baddbmm (ΔW = BA for all
        # layers at once) and an unmerge is one copy (exact; repeated switches never accumulate rounding).
        self.groups: dict[tuple, list[str]] = {}
        for n, w in self.layers.items():
            self.groups.setdefault(tuple(w.base.weight.shape), []).append(n)
        self.wstack: dict[tuple, torch.Tensor] = {}
        self.pstack: dict[tuple, torch.Tensor] = {}
        with torch.no_grad():
            for shape, names in self.groups.items():
                W = torch.stack([self.layers[n].base.weight.detach() for n in names])
                for i, n in enumerate(names):
                    lin = self.layers[n].base
                    lin.weight = torch.nn.Parameter(W[i], requires_grad=lin.weight.requires_grad)
                self.wstack[shape], self.pstack[shape] = W, W.clone()
        self.pristine = {n: self.pstack[s][i] for s, names in self.groups.items() for i, n in enumerate(names)}
        self._delta_stacks: dict[str, dict[tuple, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._mix: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}

    # ---------------------------------------------------------------- adapters
    def add(self, ad: Adapter) -> None:
        missing = set(ad.weights) - set(self.layers)
        if missing:
            raise UserError(f"adapter {ad.name!r}: targets {sorted(missing)[:2]}… that this server does not wrap "
                            f"(wrapped: {TARGETS})")
        self.adapters[ad.name] = ad
        self._delta_stacks.pop(ad.name, None)
        self.slot = {n: i for i, n in enumerate(self.adapters)}
        self._restack()

    def _restack(self) -> None:
        """Per layer, A (K+1, d_in, r) and B (K+1, r, d_out) over every adapter (zero-padded to the largest rank:
        exact); slot K = 'no adapter' (zeros). Independent of the mode, so only adding an adapter rebuilds it."""
        self.stacks = {}
        self._mix = {}
        self._plan = None
        if not self.adapters:
            return
        names = list(self.adapters)
        rmax = max(a.rank for a in self.adapters.values())
        for lname, layer in self.layers.items():
            d_in, d_out = layer.base.in_features, layer.base.out_features
            A = torch.zeros(len(names) + 1, d_in, rmax)
            B = torch.zeros(len(names) + 1, rmax, d_out)
            for k, n in enumerate(names):
                w = self.adapters[n].weights.get(lname)
                if w is not None:
                    A[k, :, :w[0].shape[1]], B[k, :w[1].shape[0]] = w
            self.stacks[lname] = (A, B)

    def row_index(self, rows):
        """(stack slot per row, distinct adapters, cache), or None when no row needs a side path. Slot -1 = nothing
        to add (no adapter unmerged, or the merged adapter); in mixture a row without adapter takes slot K (the
        stack's zero slot, whose mixture entry is −ΔW_m). Cached for the forward pass: every wrapped layer asks with
        the same rows."""
        names = tuple(self.default if r is None else self.seq_adapter.get(r) for r in rows)
        key = (names, self.merged, len(self.adapters))
        if self._plan is not None and self._plan[0] == key:
            return self._plan[1]
        for a in names:
            if a is not None and a not in self.slot:
                raise UserError(f"unknown adapter {a!r}; loaded: {sorted(self.adapters)}")
        none = -1 if self.merged is None else len(self.slot)
        idx = torch.tensor([-1 if a == self.merged else none if a is None else self.slot[a] for a in names])
        distinct = len({a for a in names if a != self.merged})
        plan = None if bool((idx < 0).all()) else (idx, distinct, {})
        self._plan = (key, plan)
        return plan

    @staticmethod
    def expand(plan, t: int):
        """Per-token slots for ``t`` tokens per row, built once per plan (not per layer)."""
        idx, distinct, cache = plan
        if t not in cache:
            cache[t] = (idx.repeat_interleave(t), distinct)
        return cache[t]

    def mix_stack(self, lname: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``lname``'s mixture stack for the merged adapter m: A' = [A_k | A_m], B' = [B_k ; −B_m] for every
        slot k, so x A'_k B'_k = x(ΔW_k − ΔW_m) in one low-rank product. Built on first use for m (one cat per
        layer), kept for the last two merged adapters; layers m leaves alone use the plain stack."""
        m = self.merged
        if m not in self._mix:
            if len(self._mix) >= 2:
                self._mix.pop(next(iter(self._mix)))
            out = {}
            for n, (A, B) in self.stacks.items():
                w = self.adapters[m].weights.get(n)
                if w is not None:
                    k = A.shape[0]
                    out[n] = (torch.cat([A, w[0].to(A.dtype).expand(k, *w[0].shape)], 2),
                              torch.cat([B, -w[1].to(B.dtype).expand(k, *w[1].shape)], 1))
            self._mix[m] = out
        else:
            self._mix[m] = self._mix.pop(m)  # most recently used last
        return self._mix[m].get(lname) or self.stacks[lname]

    # ---------------------------------------------------------------- modes
    def _deltas(self, name: str) -> dict[tuple, tuple[torch.Tensor, torch.Tensor]]:
        """Adapter ``name`` as (B^T, A^T) stacks per weight shape (zeros for layers it leaves alone), built once."""
        if name not in self._delta_stacks:
            ad, out = self.adapters[name], {}
            for shape, names in self.groups.items():
                if not any(n in ad.weights for n in names):
                    continue
                r = max(ad.weights[n][0].shape[1] for n in names if n in ad.weights)
                W = self.wstack[shape]
                Bt = W.new_zeros(len(names), shape[0], r)
                At = W.new_zeros(len(names), r, shape[1])
                for i, n in enumerate(names):
                    if n in ad.weights:
                        A, B = ad.weights[n]
                        Bt[i, :, :A.shape[1]], At[i, :A.shape[1]] = B.T, A.T
                out[shape] = (Bt, At)
            self._delta_stacks[name] = out
        return self._delta_stacks[name]

    @torch.inference_mode()
    def merge(self, name: str | None) -> float:
        """Fold adapter ``name`` into the base weights (None: unmerge). Returns the switching time in seconds."""
        if name == self.merged:
            return 0.0
        if name is not None and name not in self.adapters:
            raise UserError(f"unknown adapter {name!r}; loaded: {sorted(self.adapters)}")
        t = time.perf_counter()
        touched = self._deltas(name) if name is not None else {}
        for shape in {tuple(self.layers[n].base.weight.shape) for n in self.original} - set(touched):
            self.wstack[shape].copy_(self.pstack[shape])  # unmerge: one copy per weight shape
        for shape, (Bt, At) in touched.items():  # merge: one kernel per weight shape, W = W0 + B^T A^T
            torch.baddbmm(self.pstack[shape], Bt, At, out=self.wstack[shape])
        self.original = {n: self.pristine[n] for shape in touched for n in self.groups[shape]}
        self.merged = name
        self._plan = None
        dt = time.perf_counter() - t
        self.switch_s.append(dt)
        return dt
