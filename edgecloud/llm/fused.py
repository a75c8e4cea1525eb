"""A fused layer loop for plain Llama-family decoders, writing keys/values into a preallocated cache in place.

Why: decode at small batch is bound by reading weights and by per-layer overhead, not by arithmetic. This path
runs the same maths as transformers' Llama layers with

* one Q|K|V and one gate|up GEMM per layer (weights concatenated once, on first use), in the layout that this CPU
  runs fastest for the number of rows (see :meth:`FusedLlama.ops`);
* every prefill through oneDNN's prepacked GEMMs, which compute each row independently of the others, so a prompt
  gets the same cache alone and inside a padded batch;
* prefill with no padding: causal attention with no mask built (:func:`causal_gqa_attention` from 64 tokens,
  SDPA's causal kernel below);
* keys/values written into a caller-owned preallocated buffer (no ``torch.cat`` of the whole cache per step);
* one boolean mask for all layers, positions and RoPE computed once per pass, no transformers mask building.

It only runs when the model is exactly what it knows: a ``llama`` decoder whose projections are plain
``nn.Linear`` with no hooks, weights unchanged since fusing (tensor identity and version counters are checked
on every pass). Anything else (a LoRA wrapper around ``q_proj``, Gemma, a hook) falls back to the transformers
path, so wrappers that look up :func:`edgecloud.llm.batch.current_rows` keep working unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from edgecloud.llm.engine import rotate_half

_PROJ = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"),
         ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))


def _sources(decoder) -> list[torch.Tensor]:
    return [getattr(getattr(layer, a), b).weight for layer in decoder.layers for a, b in _PROJ]


def _hooked(m) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks)


def _plain(engine) -> bool:
    """No wrapper or hook anywhere this path would bypass (a hook on the model counts its calls, say)."""
    decoder = engine.decoder
    if _hooked(engine.model) or _hooked(decoder) or _hooked(engine.lm_head):
        return False
    for layer in decoder.layers:
        for a, b in _PROJ:
            mod = getattr(getattr(layer, a), b)
            if type(mod) is not torch.nn.Linear or mod.bias is not None or mod._forward_hooks or \
                    mod._forward_pre_hooks:
                return False
        if layer._forward_hooks or layer._forward_pre_hooks or layer.self_attn._forward_hooks:
            return False
    return True


def causal_gqa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int = 64) -> torch.Tensor:
    """Causal attention of ``q`` (b, kv_heads, L * g, d), already times the softmax scale, with rows ordered
    (position, query head of the group): the ``g`` query heads that share a KV head next to each other. ``k``/``v``
    (b, kv_heads, L, d). Returns (b, kv_heads, L * g, d) in ``q``'s row order.

    Why: SDPA's CPU flash kernel runs GQA's per-head products separately. Stacking a KV head's query heads makes
    each block of ``block`` positions one (g * block, d) @ (d, keys) batched GEMM per KV head (the keys read once
    for the group), masked on the diagonal block only, and keys past the block's last position are never
    computed. Measured at 1 thread (docs/llm.md): ~28% faster than SDPA at 512 tokens, on par at 1,500."""
    b, hk, rows, d = q.shape
    L = k.shape[2]
    g = rows // L
    q, k, v = q.reshape(b * hk, rows, d), k.reshape(b * hk, L, d), v.reshape(b * hk, L, d)
    out = torch.empty_like(q)
    tri = torch.ones(block, block, dtype=torch.bool).triu(1).repeat_interleave(g, 0)  # (g * block, block)
    for s in range(0, L, block):
        e = min(L, s + block)
        sc = torch.bmm(q[:, s * g:e * g], k[:, :e].transpose(1, 2))
        sc[:, :, s:e].masked_fill_(tri[:(e - s) * g, :e - s], float("-inf"))
        torch.bmm(torch.softmax(sc, -1), v[:, :e], out=out[:, s * g:e * g])
    return out.view(b, hk, rows, d)


class FusedLlama:
    """Fused weights of one Llama decoder plus the layer loop over them (see the module docstring)."""

    attn_block = 64  # causal_gqa_attention's query block for a maskless prefill; 0: SDPA's causal kernel instead
    attn_min = 64  # shorter prompts use SDPA's causal kernel (faster there)

    def __init__(self, engine):
        d = engine.decoder
        cfg = engine.config
        self.engine, self.decoder = engine, d
        self.hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.hq, self.hk = cfg.num_attention_heads, cfg.num_key_value_heads
        self.scale = self.hd ** -0.5
        self.eps = cfg.rms_norm_eps
        self.inter = cfg.intermediate_size
        self.ln1 = [ly.input_layernorm.weight for ly in d.layers]
        self.ln2 = [ly.post_attention_layernorm.weight for ly in d.layers]
        self._ops: dict[str, dict] = {}
        self._lm: dict[str, object] = {}
        self._stamp = self._now()
        self._links, self._hookable = self._structure()

    def _now(self) -> list[tuple[torch.Tensor, int]]:
        # the tensors themselves, not id(): a replaced weight's id may be reused by its successor
        return [(w, w._version) for w in [*_sources(self.decoder), self.engine.lm_head.weight]]

    def _structure(self) -> tuple[list[tuple[dict, str, object]], list]:
        """Every (parent's ``_modules``/``_parameters`` dict, key, child) link from the decoder down to the weights,
        and every module whose hooks would be bypassed: :meth:`fresh` checks them by identity each pass (~0.1 ms)
        instead of walking the model with ``getattr`` (~2 ms, 4% of a batch-1 decode step)."""
        d, links = self.decoder, []
        hookable = [self.engine.model, d, self.engine.lm_head]
        links.append((self.engine.lm_head._parameters, "weight", self.engine.lm_head.weight))
        for key, layer in d.layers._modules.items():
            links.append((d.layers._modules, key, layer))
            hookable += [layer, layer.self_attn]
            for a, b in _PROJ:
                owner = getattr(layer, a)
                mod = getattr(owner, b)
                links += [(layer._modules, a, owner), (owner._modules, b, mod), (mod._parameters, "weight", mod.weight)]
                hookable.append(mod)
        return links, hookable

    @staticmethod
    def supports(engine) -> bool:
        cfg = engine.config
        return (getattr(cfg, "model_type", "") == "llama" and getattr(cfg, "hidden_act", "silu") == "silu"
                and not getattr(cfg, "attention_bias", False) and not getattr(cfg, "mlp_bias", False)
                and engine.rope_type in ("default", "llama3", "linear") and _plain(engine)
                and type(engine.lm_head) is torch.nn.Linear and engine.lm_head.bias is None)

    def fresh(self) -> bool:
        """The model still has the weights these were fused from (no wrapper, no hook, no in-place edit since)."""
        if len(self.decoder.layers._modules) != len(self.ln1) or self.engine.decoder is not self.decoder:
            return False
        if any(d.get(k) is not child for d, k, child in self._links):  # a module or weight replaced
            return False
        if any(m._forward_hooks or m._forward_pre_hooks for m in self._hookable):
            return False
        return all(w._version == v for w, v in self._stamp)  # in-place edits

    def _norm(self, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """transformers' LlamaRMSNorm as one fused op (the same maths; fp32 for fp32 models, op for op otherwise)."""
        if h.dtype == torch.float32 and w.dtype == torch.float32:
            return torch.rms_norm(h, (h.shape[-1],), w, self.eps)
        hf = h.float()
        return w * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + self.eps)).to(h.dtype)

    @staticmethod
    def kind(rows: int, q: int, start: int) -> str:
        """Which GEMM layout the layers of a pass of ``rows`` sequences x ``q`` new tokens after ``start`` cached
        slots use (see :meth:`ops`): every prefill (``start == 0``, even of one token) runs the prepacked GEMMs, so a
        prompt gets the same cache alone and in a batch."""
        return "packed" if start == 0 or q > 1 or rows >= 8 else "xw"

    @staticmethod
    def lm_kind(rows: int) -> str:
        """Which GEMM layout the lm_head uses for ``rows`` last positions (see :meth:`ops`)."""
        return "xw" if rows <= 2 else ("wx" if rows < 8 else "packed")

    def _make(self, kind: str, *ws: torch.Tensor, transpose: bool = True):
        """One projection (several fused along the output) as a callable in the given layout."""
        w = (torch.cat(ws) if len(ws) > 1 else ws[0]).detach()
        if kind == "packed" and w.dtype == torch.float32 and torch.backends.mkldnn.is_available():
            p = torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), 16)
            return lambda x: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")
        if kind in ("wx", "packed"):
            return lambda x: (w @ x.reshape(-1, x.shape[-1]).t()).t().reshape(*x.shape[:-1], -1)
        if transpose:
            wt = w.t().contiguous()
            return lambda x: x @ wt
        return lambda x: F.linear(x, w)

    def ops(self, kind: str) -> dict:
        """The projections as callables for one layout, built on first use. All are fp32 GEMMs that differ only in
        summation order; times below are a whole decode step's GEMMs with weights cold as in a real step, 1
        thread on this AVX2 EPYC (``docs/llm.md``).

        ``xw``: ``x @ W`` with Q|K|V and gate|up fused and W stored (in, out). At 1 row ~1.5x faster than
        ``F.linear`` (36 vs 53 ms; weight-read bound). From 4 rows MKL computes it bit for bit like ``F.linear``,
        so 3-7-row decode steps give exactly transformers' numbers: this keeps batched == single to 1e-4 over
        several decode steps, which the faster layouts below at 3-7 rows do not (1.4e-4 after 3 steps).
        ``wx``: ``(W @ x^T)^T`` on (out, in) weights; used for the lm_head at 3-7 rows, where MKL's ``x @ W``
        degrades to about one weight pass per row (lm_head at 4 rows: 12 vs 29 ms); its rounding reaches the
        logits only, not the cache. ``packed``: oneDNN's prepacked GEMM, for decode steps of >= 8 rows (16 rows:
        114 vs 136-150 ms a step) and every prefill (~13% less GEMM time at 1,500 rows). Its rows do not depend
        on each other (checked bit for bit), so a prompt prefilled alone and in a batch gets the same cache; it
        rounds differently from ``F.linear`` (~4e-6 relative), tested to 1e-4 against the single path."""
        if kind not in self._ops:
            d = self.decoder
            with torch.no_grad():
                self._ops[kind] = {
                    "qkv": [self._make(kind, ly.self_attn.q_proj.weight, ly.self_attn.k_proj.weight,
                                       ly.self_attn.v_proj.weight) for ly in d.layers],
                    "o": [self._make(kind, ly.self_attn.o_proj.weight) for ly in d.layers],
                    "gu": [self._make(kind, ly.mlp.gate_proj.weight, ly.mlp.up_proj.weight) for ly in d.layers],
                    "down": [self._make(kind, ly.mlp.down_proj.weight, transpose=False) for ly in d.layers]}
        return self._ops[kind]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """lm_head over final-normed last-position hidden states (rows, hidden) -> float logits."""
        kind = self.lm_kind(h.shape[0])
        if kind not in self._lm:
            with torch.no_grad():
                self._lm[kind] = self._make(kind, self.engine.lm_head.weight)
        return self._lm[kind](h).float()

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor | None, positions: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor,
                start: int, allowed: torch.Tensor | None, embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Final-normed hidden states of the last position per row, (batch, hidden).

        ``ids``/``positions`` (batch, q) (or ``embeds`` (batch, q, hidden) instead of ids); ``k_buf``/``v_buf``
        (layers, batch, kv_heads, capacity, head_dim) hold the cache; this pass writes its keys/values at slots
        ``start .. start+q`` and attends over slots ``0 .. start+q`` where ``allowed`` (batch, 1, q, start+q) bool
        is true. ``allowed=None`` (only with ``start=0``): plain causal attention, SDPA's ``is_causal`` kernel with
        no mask built (a prompt with no padding: half the attention FLOPs of a square masked pass)."""
        h = self.decoder.embed_tokens(ids) if embeds is None else embeds
        b, q = h.shape[:2]
        end = start + q
        if allowed is None and start:
            raise ValueError("causal attention without a mask needs start=0")
        cos, sin = self.decoder.rotary_emb(h, positions)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        nq, nk = self.hq * self.hd, self.hk * self.hd
        bias = None if allowed is None else \
            torch.zeros(allowed.shape, dtype=h.dtype).masked_fill_(~allowed, float("-inf"))  # once, not per layer
        ops = self.ops(self.kind(b, q, start))
        g = self.hq // self.hk
        grouped = allowed is None and self.attn_block > 0 and q >= self.attn_min
        if grouped:  # cos/sin per (position, query head of a group) row, times the softmax scale
            cq = (cos * self.scale).repeat_interleave(g, 2)
            sq = (sin * self.scale).repeat_interleave(g, 2)
        last = len(self.ln1) - 1
        for i in range(last + 1):
            x = self._norm(h, self.ln1[i])
            qkv = ops["qkv"][i](x)
            vs = qkv[..., nq + nk:].view(b, q, self.hk, self.hd).transpose(1, 2)
            v_buf[i, :, :, start:end] = vs
            if i == last and q > 1:
                # Only the last position's output is returned, and the last layer's keys/values depend on its input
                # alone: queries, attention, o_proj and the MLP run for that position only (~3% of a prefill).
                ks = qkv[..., nq:nq + nk].view(b, q, self.hk, self.hd).transpose(1, 2)
                k_buf[i, :, :, start:end] = ks * cos + rotate_half(ks) * sin
                qs = qkv[:, -1:, :nq].view(b, 1, self.hq, self.hd).transpose(1, 2)
                qs = qs * cos[:, :, -1:] + rotate_half(qs) * sin[:, :, -1:]
                a = F.scaled_dot_product_attention(
                    qs, k_buf[i, :, :, :end], v_buf[i, :, :, :end], scale=self.scale,
                    attn_mask=None if bias is None else bias[:, :, -1:], enable_gqa=self.hq != self.hk)
                h = h[:, -1:]
                a = a.transpose(1, 2).reshape(b, 1, nq)
            elif grouped:  # rows (kv head, position, query head of its group); scale folded into q's cos/sin
                ks = qkv[..., nq:nq + nk].view(b, q, self.hk, self.hd).transpose(1, 2)
                k_buf[i, :, :, start:end] = ks * cos + rotate_half(ks) * sin
                qs = qkv[..., :nq].view(b, q, self.hk, g, self.hd).permute(0, 2, 1, 3, 4).reshape(b, self.hk, q * g, -1)
                qs = qs * cq + rotate_half(qs) * sq
                a = causal_gqa_attention(qs, k_buf[i, :, :, :end], v_buf[i, :, :, :end], self.attn_block)
                a = a.view(b, self.hk, q, g, self.hd).transpose(1, 2).reshape(b, q, nq)
            else:  # queries and keys rotated together (one RoPE per layer)
                qk = qkv[..., :nq + nk].view(b, q, self.hq + self.hk, self.hd).transpose(1, 2)
                qk = qk * cos + rotate_half(qk) * sin
                k_buf[i, :, :, start:end] = qk[:, self.hq:]
                a = F.scaled_dot_product_attention(qk[:, :self.hq], k_buf[i, :, :, :end], v_buf[i, :, :, :end],
                                                   attn_mask=bias, is_causal=bias is None, scale=self.scale,
                                                   enable_gqa=self.hq != self.hk).transpose(1, 2).reshape(b, q, nq)
            h = h + ops["o"][i](a)
            gu = ops["gu"][i](self._norm(h, self.ln2[i]))
            h = h + ops["down"][i](F.silu(gu[..., :self.inter]) * gu[..., self.inter:])
        return self._norm(h[:, -1], self.decoder.norm.weight)

