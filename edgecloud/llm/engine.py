"""The one place that runs a language model: prefill, decode, and explicit control of the KV cache and positions.

KV layout used everywhere in edgecloud: per layer, keys and values of shape (batch=1, kv_heads, tokens, head_dim);
``stack_kv`` packs a whole cache as two tensors (layers, kv_heads, tokens, head_dim). Keys in a transformers cache are
*post*-RoPE (rotated by their absolute positions); :meth:`Engine.rotate` moves them to other positions and
:meth:`Engine.pre_rope_keys` un-rotates them (RoPE is orthogonal, so both are exact up to float rounding).

:meth:`Engine.forward_layers` is a hand-written layer loop over the decoder (Llama-family: Llama, SmolLM2, Qwen2,
Mistral; also the text model inside Llava-style VLMs). It takes any object with ``update(k, v, layer_idx, **kw)``
as the cache, an explicit position per token and an explicit boolean attention mask, which is what MPIC's linker
and CSR's custom caches need. Plain prefill/decode go through ``model(...)`` with a ``DynamicCache``.
"""

from __future__ import annotations

import ctypes
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch

from edgecloud.errors import UserError


def set_threads(n: int | None = None) -> int:
    """Cap torch threads: EDGECLOUD_THREADS, else the idle cores (at most 4; 1 when the machine is busy, since
    OpenMP threads that spin against other processes on 2 cores are several times slower than one thread)."""
    cores = os.cpu_count() or 1
    idle = max(1, round(cores - os.getloadavg()[0]))
    n = n or int(os.environ.get("EDGECLOUD_THREADS", "0")) or min(4, idle)
    torch.set_num_threads(n)
    return n


_MALLOC_TUNED: bool | None = None


def tune_malloc() -> bool:
    """Let glibc keep freed memory in the process instead of handing large blocks back to the kernel.

    Why: by default glibc serves every allocation above its mmap threshold (128 KiB, rising to at most 32 MiB) with
    a fresh ``mmap`` and unmaps it on free, so each temporary tensor of a long prefill (a 1,500 x 576 activation is
    3.5 MB) page-faults in freshly zeroed pages: an RMSNorm over 1,500 rows took 2.7 ms instead of 0.3 ms, and the
    whole 1,500-token prefill ran ~10% slower (``docs/llm.md``). Raising the mmap and trim thresholds to 1 GiB makes
    freed blocks reusable, which is what tcmalloc/jemalloc (recommended by vLLM's CPU docs) do. The cost is that
    the process keeps its peak heap. Process-wide, once; ``EDGECLOUD_MALLOC=default`` leaves glibc alone. Returns
    whether the thresholds were set (False off Linux/glibc)."""
    global _MALLOC_TUNED
    if _MALLOC_TUNED is None:
        _MALLOC_TUNED = False
        if sys.platform.startswith("linux") and os.environ.get("EDGECLOUD_MALLOC", "") != "default":
            try:
                libc = ctypes.CDLL("libc.so.6")
                m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's mallopt parameter numbers
                _MALLOC_TUNED = bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and \
                    bool(libc.mallopt(m_trim_threshold, 1 << 30))
            except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
                _MALLOC_TUNED = False
    return _MALLOC_TUNED


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@dataclass
class Generation:
    tokens: list[int]
    text: str
    ttft_s: float  # prompt processing until the first token's logits
    decode_s: list[float] = field(default_factory=list)  # per generated token after the first
    first_logits: torch.Tensor | None = None

    @property
    def total_s(self) -> float:
        return self.ttft_s + sum(self.decode_s)


class Engine:
    """A loaded model plus the operations the KV-cache systems need. ``lm`` is a :class:`LoadedModel`."""

    def __init__(self, lm, threads: int | None = None):
        self.lm = lm
        self.model = lm.model
        self.tok = lm.tokenizer
        self.threads = set_threads(threads)
        tune_malloc()
        m = self.model
        base = getattr(m, "model", m)
        self.decoder = getattr(base, "language_model", base)  # Llava-style VLMs keep the text model inside
        if not hasattr(self.decoder, "layers"):
            raise UserError(f"model {lm.name}: no decoder layers found; only decoder-only / Llava-style supported")
        self.lm_head = m.lm_head if hasattr(m, "lm_head") else m.get_output_embeddings()
        self.config = self.decoder.config
        self.n_layers = self.config.num_hidden_layers
        self.context = getattr(self.config, "max_position_embeddings", 2048)
        rope = getattr(self.config, "rope_parameters", None) or {}
        self.rope_type = (rope.get("rope_type") if isinstance(rope, dict) else None) or "default"
        self.use_fused = os.environ.get("EDGECLOUD_FUSED", "1") != "0"  # the batch's fused path where it applies
        self._fused = None

    def fused(self):
        """The fused decode path (:mod:`edgecloud.llm.fused`) for this model, or None where it does not apply
        (not a plain Llama decoder, a wrapper or hook on a layer, ``use_fused`` off). Rebuilt if weights changed."""
        from edgecloud.llm.fused import FusedLlama

        if not self.use_fused:
            return None
        if self._fused is not None and self._fused.fresh():
            return self._fused
        self._fused = FusedLlama(self) if FusedLlama.supports(self) else None
        return self._fused

    def new_kv(self, b: int, cap: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Zeroed key and value buffers (layers, b, kv_heads, cap, head_dim) in the model's dtype (the batch's
        preallocated cache layout)."""
        cfg = self.config
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        dtype = self.decoder.embed_tokens.weight.dtype
        k = torch.zeros(self.n_layers, b, cfg.num_key_value_heads, cap, hd, dtype=dtype)
        return k, torch.zeros_like(k)

    # ---------------------------------------------------------------- text
    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def encode_prompt(self, text: str) -> list[int]:
        """A whole prompt, with the tokenizer's own start tokens (Gemma needs <bos>; SmolLM2 adds none)."""
        return self.tok(text)["input_ids"]

    def decode_text(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def chat_prompt(self, system: str, user: str) -> str:
        """The instruct chat format (ChatML for SmolLM2); plain text for base models (see ``prompts``)."""
        from edgecloud.llm.prompts import chat_prompt

        return chat_prompt(system, user, self.lm.chat)

    @property
    def eos_ids(self) -> set[int]:
        if self.tok is None:  # tokenizer-less test models: no stop token
            return set()
        ids = {self.tok.eos_token_id} if self.tok.eos_token_id is not None else set()
        end = self.tok.convert_tokens_to_ids("<|im_end|>") if self.lm.chat else None
        if isinstance(end, int) and end >= 0:
            ids.add(end)
        return ids

    def embed(self, ids) -> torch.Tensor:
        """Input embeddings (1, n, hidden) for token ids."""
        t = torch.as_tensor(ids, dtype=torch.long).reshape(1, -1)
        return self.decoder.embed_tokens(t)

    def check_length(self, n: int, what: str = "prompt") -> None:
        if n > self.context:
            raise UserError(f"{what} has {n} tokens, more than the model's context of {self.context}; "
                            f"shorten it or use fewer chunks")

    # ---------------------------------------------------------------- RoPE
    def cos_sin(self, positions: torch.Tensor, layer: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Unscaled RoPE cos/sin (n, head_dim) for integer positions (attention_scaling divided out). Models with
        per-layer-type RoPE (Gemma 3: local layers base 1e4, global 1e6) need ``layer``."""
        rot = self.decoder.rotary_emb
        pos = torch.as_tensor(positions, dtype=torch.long).reshape(1, -1)
        dummy = torch.zeros(1, dtype=torch.float32)
        types = getattr(self.config, "layer_types", None)
        if types and hasattr(rot, "layer_types"):
            if layer is None:
                raise UserError(f"model {self.lm.name} has per-layer RoPE: say which layer")
            cos, sin = rot(dummy, pos, types[layer])
            s = float(getattr(rot, f"{types[layer]}_attention_scaling", 1.0))
        else:
            cos, sin = rot(dummy, pos)
            s = float(getattr(rot, "attention_scaling", 1.0))
        return cos[0] / s, sin[0] / s

    def rotate(self, k: torch.Tensor, delta: int | torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """Move post-RoPE keys (..., n, head_dim) by ``delta`` positions: R(p+d) = R(d) R(p), exact for RoPE."""
        if self.rope_type not in ("default", "linear", "llama3", "dynamic"):
            raise UserError(f"rope type {self.rope_type!r}: re-rotation not supported")
        d = torch.as_tensor(delta).reshape(-1)
        if d.numel() == 1 and int(d) == 0:
            return k
        n = k.shape[-2]
        cos, sin = self.cos_sin(d.expand(n) if d.numel() == 1 else d, layer)
        return k * cos + rotate_half(k) * sin

    def pre_rope_keys(self, keys: torch.Tensor, positions, layer: int | None = None) -> torch.Tensor:
        """Un-rotate post-RoPE keys (..., n, head_dim) at ``positions`` back to the projection output (pre-RoPE)."""
        pos = torch.as_tensor(positions, dtype=torch.long).reshape(-1)
        cos, sin = self.cos_sin(pos, layer)
        return keys * cos - rotate_half(keys) * sin

    # ---------------------------------------------------------------- passes
    @torch.inference_mode()
    def prefill(self, ids=None, embeds: torch.Tensor | None = None, cache=None):
        """Run the prompt (ids or input embeddings) after whatever ``cache`` holds; returns (last logits, cache).

        An empty cache on a model the fused path supports (:meth:`fused`) runs :mod:`edgecloud.llm.fused`: the same
        maths as transformers' layers (to ~1e-4: prepacked GEMMs sum in another order) with prepacked projections
        and block-causal GQA attention; anything else runs ``model(...)``."""
        from transformers import DynamicCache

        cache = cache if cache is not None else DynamicCache()
        past = cache.get_seq_length()
        if embeds is None:
            embeds = self.embed(ids)
        n = embeds.shape[1]
        self.check_length(past + n)
        pos = torch.arange(past, past + n).unsqueeze(0)
        fused = self.fused() if past == 0 else None
        if fused is not None:  # a fresh prompt on a plain Llama: fused projections, causal SDPA, no mask
            k, v = self.new_kv(1, n)
            h = fused.forward(None, pos, k, v, 0, None, embeds=embeds)
            for i in range(self.n_layers):
                cache.update(k[i], v[i], i)
            return fused.logits(h)[0], cache
        out = self.model(inputs_embeds=embeds, position_ids=pos, cache=cache, use_cache=True,
                         logits_to_keep=1)
        return out.logits[0, -1].float(), cache

    @torch.inference_mode()
    def logits_for(self, ids, cache) -> torch.Tensor:
        """Teacher-forced logits (n, vocab) for ``ids`` appended to ``cache`` (which grows)."""
        past = cache.get_seq_length()
        pos = torch.arange(past, past + len(ids)).unsqueeze(0)
        out = self.model(inputs_embeds=self.embed(ids), position_ids=pos, cache=cache, use_cache=True)
        return out.logits[0].float()

    @torch.inference_mode()
    def forward_layers(self, embeds: torch.Tensor, positions: torch.Tensor, cache, mask: torch.Tensor,
                       layers: range | None = None, final: bool = True):
        """Decoder layers over ``embeds`` (1, q, h) at ``positions`` (q,), attending per ``mask`` (q, kv) bool.

        ``cache.update(k, v, layer_idx)`` receives this pass's post-RoPE keys/values and returns the full keys and
        values to attend over (any custom store can stand behind it). Returns the final-normed hidden states when
        ``final``, else the raw hidden states after the given ``layers``.
        """
        pos = positions.reshape(1, -1)
        pe = self.decoder.rotary_emb(embeds, pos)
        m4 = mask.reshape(1, 1, *mask.shape)
        h = embeds
        for i in layers if layers is not None else range(self.n_layers):
            h = self.decoder.layers[i](h, attention_mask=m4, position_ids=pos, cache=cache,
                                       use_cache=True, position_embeddings=pe)
        return self.decoder.norm(h) if final else h

    @torch.inference_mode()
    def kv_of(self, ids=None, embeds: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """KV of a chunk computed on its own, positions 0..n-1: stacked (layers, kv_heads, n, head_dim) each."""
        from transformers import DynamicCache

        _, cache = self.prefill(ids=ids, embeds=embeds, cache=DynamicCache())
        return stack_kv(cache)

    @torch.inference_mode()
    def greedy(self, cache, first_logits: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
               seed: int = 0) -> tuple[list[int], list[float]]:
        """Decode from a filled cache; greedy when temperature is 0, else seeded sampling. Returns tokens, times."""
        gen = torch.Generator().manual_seed(seed)
        stop = self.eos_ids
        logits, tokens, times = first_logits, [], []
        for step in range(max_new_tokens):
            if temperature > 0:
                p = torch.softmax(logits / temperature, -1)
                t = int(torch.multinomial(p, 1, generator=gen))
            else:
                t = int(logits.argmax())
            tokens.append(t)
            if t in stop or step == max_new_tokens - 1:
                break
            t0 = time.perf_counter()
            logits = self.logits_for([t], cache)[-1]
            times.append(time.perf_counter() - t0)
        return tokens, times

    def generate(self, prompt: str, max_new_tokens: int = 32, temperature: float = 0.0, seed: int = 0) -> Generation:
        """Full prefill then decode: the reference path (no reuse)."""
        ids = self.encode_prompt(prompt)
        t0 = time.perf_counter()
        logits, cache = self.prefill(ids)
        ttft = time.perf_counter() - t0
        toks, times = self.greedy(cache, logits, max_new_tokens, temperature, seed)
        return Generation(toks, self.decode_text(toks), ttft, times, logits)

    @torch.inference_mode()
    def perplexity(self, text: str, max_tokens: int = 1024) -> float:
        """Perplexity of the model on ``text`` (first ``max_tokens`` tokens), one forward pass."""
        ids = torch.tensor(self.encode_prompt(text)[:max_tokens]).unsqueeze(0)
        if ids.shape[1] < 2:
            raise UserError("perplexity needs at least two tokens of text")
        logits = self.model(input_ids=ids).logits[0, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:])
        return math.exp(float(nll))

    def logits_from_hidden(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(h).float()


def stack_kv(cache) -> tuple[torch.Tensor, torch.Tensor]:
    """A transformers cache as two tensors (layers, kv_heads, tokens, head_dim) (batch 1)."""
    ks = [layer.keys[0] for layer in cache.layers]
    vs = [layer.values[0] for layer in cache.layers]
    return torch.stack(ks), torch.stack(vs)


def cache_from_kv(k: torch.Tensor, v: torch.Tensor):
    """A ``DynamicCache`` holding stacked keys/values (layers, kv_heads, tokens, head_dim), ready to decode from."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for i in range(k.shape[0]):
        cache.update(k[i : i + 1].clone(), v[i : i + 1].clone(), i)
    return cache
