"""Compressed KV caches for transformers models: CSR sparse codes, KIVI quantization, or plain fp16.

One :class:`CodecLayer` per decoder layer plugs into transformers' ``Cache`` API. New tokens land in a dense fp16
residual; once more than ``residual`` tokens are there, the oldest (in whole blocks) are encoded and only their
codes are kept. Attention reads the reconstruction: a decoded workspace grows by the newly encoded tokens only,
standing in for the fused decode-in-attention kernel a deployment would use, so it is not counted as cache memory.

Keys before RoPE (CSR's choice, their distribution does not drift with position): transformers hands ``update``
post-RoPE keys, so the layer un-rotates them by their known positions with the shared engine's RoPE
(:meth:`edgecloud.llm.engine.Engine.pre_rope_keys`, orthogonal: exact), codes the pre-RoPE key, and re-rotates the
reconstruction (:meth:`Engine.rotate`). ``pre_rope=False`` codes the post-RoPE key directly.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer

from edgecloud.errors import UserError
from edgecloud.kvcache.csr import quant
from edgecloud.kvcache.csr.coding import CODERS, QUANTS, STORE, reconstruct

# ---------------------------------------------------------------- codecs: (B, H, T, d) <-> dict of tensors on dim 2


class FP16Codec:
    block = 1
    pre_rope = False

    def encode(self, x):
        return {"x": x.half()}

    def decode(self, c):
        return c["x"].float()

    def extra_bytes(self) -> int:
        return 0


class KIVICodec:
    """Keys per channel over blocks of ``group`` tokens; values per token over channel groups of ``group``."""

    pre_rope = False

    def __init__(self, kind: str, bits: int, group: int):
        if bits not in (2, 4, 8):
            raise UserError(f"kivi bits={bits}: use 2, 4 or 8")
        self.kind, self.bits, self.group = kind, bits, group
        self.block = group if kind == "keys" else 1

    def encode(self, x):
        f = quant.quantize_keys if self.kind == "keys" else quant.quantize_values
        return f(x, self.bits, self.group)

    def decode(self, c):
        f = quant.dequantize_keys if self.kind == "keys" else quant.dequantize_values
        return f(c, self.bits)

    def extra_bytes(self) -> int:
        return 0


def index_bits(n_atoms: int) -> int:
    """Bits a packed atom index needs: ceil(log2 N)."""
    return max(1, math.ceil(math.log2(n_atoms)))


def pack_bits(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Non-negative ints (..., n) < 2**bits -> uint8 (..., ceil(n·bits/8)): the bit stream of each row."""
    n = x.shape[-1]
    b = ((x.long().unsqueeze(-1) >> torch.arange(bits)) & 1).reshape(*x.shape[:-1], n * bits)
    pad = -(n * bits) % 8
    b = torch.nn.functional.pad(b, (0, pad)).reshape(*x.shape[:-1], -1, 8)
    return (b << torch.arange(8)).sum(-1).to(torch.uint8)


def unpack_bits(p: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    b = ((p.long().unsqueeze(-1) >> torch.arange(8)) & 1).reshape(*p.shape[:-1], -1)[..., : n * bits]
    return (b.reshape(*p.shape[:-1], n, bits) << torch.arange(bits)).sum(-1)


class CSRCodec:
    """s atoms per channel chunk over ``atoms`` (s_n, N, dc): an index and a weight per atom.

    Indices are int16, or with ``packed`` bit-packed at ceil(log2 N) bits (12 bits for N = 4,096); weights are
    fp16 or fp8 (e4m3), rounded inside the pursuit (``coef``). ``online`` > 0 appends that many atoms sampled from
    the first encoded batch (the prompt's prefill) to this layer's dictionary; they are per-prompt state, so
    their fp16 bytes count as cache memory.
    """

    block = 1

    def __init__(self, atoms: torch.Tensor, s: int, coder: str = "mp", pre_rope: bool = True, online: int = 0,
                 seed: int = 0, coef: str = "fp16", packed: bool = False, prep=None, layer: int = 0):
        if coder not in CODERS:
            raise UserError(f"coder={coder!r}: use one of {sorted(CODERS)}")
        if coef not in QUANTS:
            raise UserError(f"coef={coef!r}: use one of {sorted(QUANTS)}")
        self.atoms = atoms.float()
        self.s, self.coder, self.pre_rope, self.online, self.seed = s, CODERS[coder], pre_rope, online, seed
        self.coef, self.quant = coef, QUANTS[coef]
        n_total = self.atoms.shape[1] + online
        if n_total > 32767:
            raise UserError("dictionary + online atoms exceed the int16 index range; lower --online")
        self.index_bits = index_bits(n_total) if packed else 16
        self.online_atoms: torch.Tensor | None = None
        self.prep, self.layer = prep, layer  # a keyprep.KeyPrep: centre and scale keys before coding

    def _add_online(self, flat: torch.Tensor) -> None:
        g = torch.Generator().manual_seed(self.seed)
        pick = torch.randperm(flat.shape[1], generator=g)[: self.online]
        new = torch.nn.functional.normalize(flat[:, pick], dim=-1).half()
        self.online_atoms = new
        self.atoms = torch.cat([self.atoms, new.float()], 1)

    def encode(self, x):
        if self.prep is not None:
            x = self.prep.forward(x, self.layer)
        B, H, T, d = x.shape
        s_n = self.atoms.shape[0]
        flat = x.reshape(-1, s_n, d // s_n).transpose(0, 1)  # (s_n, M, dc)
        if self.online and self.online_atoms is None:
            self._add_online(flat)
        idx, coef = self.coder(flat, self.atoms, self.s, self.quant)
        shape = (B, H, T, s_n * self.s)
        idx = idx.transpose(0, 1).reshape(shape)
        idx = idx.to(torch.int16) if self.index_bits == 16 else pack_bits(idx, self.index_bits)
        return {"idx": idx, "coef": coef.to(STORE[self.coef]).transpose(0, 1).reshape(shape)}

    def decode(self, c):
        B, H, T, n = c["coef"].shape
        s_n = self.atoms.shape[0]
        idx = c["idx"].long() if self.index_bits == 16 else unpack_bits(c["idx"], self.index_bits, n)
        idx = idx.reshape(-1, s_n, self.s).transpose(0, 1)
        coef = c["coef"].float().reshape(-1, s_n, self.s).transpose(0, 1)
        x = reconstruct(self.atoms, idx, coef).transpose(0, 1).reshape(B, H, T, -1)  # (s_n, M, dc) -> (B,H,T,d)
        return x if self.prep is None else self.prep.inverse(x, self.layer)

    def bits_per_element(self) -> float:
        """Stored bits per coded element (no online atoms): s·(index + weight bits)/dc."""
        return self.s * (self.index_bits + 8 * STORE[self.coef].itemsize) / self.atoms.shape[-1]

    def extra_bytes(self) -> int:
        """Per-prompt online atoms, and (conservatively, though they are model-side) the key mean and scale."""
        prep = 0 if self.prep is None else self.prep.nbytes(self.layer)
        online = 0 if self.online_atoms is None else self.online_atoms.numel() * self.online_atoms.element_size()
        return prep + online


# ---------------------------------------------------------------- the cache layer


def _nbytes(codes: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in codes.values())


class CodecLayer(DynamicLayer):
    """Dense fp16 residual (``self.keys``/``self.values``, post-RoPE) + encoded history (``codes``), and with
    ``sink`` > 0 the first ``sink`` tokens in fp16 (``sinks``): a model's attention sinks (Gemma's <bos>) carry
    outlier keys and values that a dictionary learned on ordinary tokens codes badly, yet every query attends
    to them."""

    def __init__(self, key_codec, value_codec, residual: int = 0, engine=None, layer: int | None = None,
                 sink: int = 0):
        super().__init__()
        self.layer = layer  # index in the model: per-layer-type RoPE (Gemma 3)
        self.codec = {"keys": key_codec, "values": value_codec}
        self.residual = residual
        self.sink = sink  # the first tokens (attention sinks) pinned in fp16, counted as cache memory
        self.sinks: dict[str, torch.Tensor | None] = {"keys": None, "values": None}
        self.engine = engine  # an edgecloud.llm Engine: its RoPE (un)rotates pre-RoPE-coded keys
        self.block = max(key_codec.block, value_codec.block)
        self.codes: dict[str, dict[str, torch.Tensor]] = {"keys": {}, "values": {}}
        self.work: dict[str, torch.Tensor | None] = {"keys": None, "values": None}
        self.n_coded = 0
        self.timing = {"encode_s": 0.0, "decode_s": 0.0, "tokens": 0}

    def lazy_initialization(self, key_states, value_states) -> None:
        super().lazy_initialization(key_states, value_states)
        self.keys = key_states.new_zeros(*key_states.shape[:2], 0, key_states.shape[-1], dtype=torch.float16)
        self.values = value_states.new_zeros(*value_states.shape[:2], 0, value_states.shape[-1], dtype=torch.float16)
        self.work = {"keys": torch.zeros_like(self.keys, dtype=key_states.dtype),
                     "values": torch.zeros_like(self.values, dtype=value_states.dtype)}

    def _encode(self, kind: str, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        codec = self.codec[kind]
        rot = kind == "keys" and codec.pre_rope
        if rot:
            if self.engine is None:
                raise UserError("pre-RoPE key coding needs the model's RoPE: pass engine=Engine(model)")
            x = self.engine.pre_rope_keys(x, pos, self.layer)
        t0 = time.perf_counter()
        c = codec.encode(x)
        t1 = time.perf_counter()
        rec = codec.decode(c)
        self.timing["encode_s"] += t1 - t0
        self.timing["decode_s"] += time.perf_counter() - t1
        for name, t in c.items():
            old = self.codes[kind].get(name)
            self.codes[kind][name] = t if old is None else torch.cat([old, t], 2)
        return self.engine.rotate(rec, pos, self.layer) if rot else rec

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys = torch.cat([self.keys, key_states.half()], -2)
        self.values = torch.cat([self.values, value_states.half()], -2)
        done = 0 if self.sinks["keys"] is None else self.sinks["keys"].shape[-2]
        if done < self.sink:  # the first tokens leave the residual into the fp16 sink store, never coded
            m = min(self.sink - done, self.keys.shape[-2])
            for kind, dense in (("keys", self.keys), ("values", self.values)):
                old = self.sinks[kind]
                self.sinks[kind] = dense[..., :m, :] if old is None else torch.cat([old, dense[..., :m, :]], -2)
                self.work[kind] = torch.cat([self.work[kind], dense[..., :m, :].to(self.work[kind].dtype)], -2)
            self.keys, self.values = self.keys[..., m:, :], self.values[..., m:, :]
            self.n_coded += m
        n_move = (max(0, self.keys.shape[-2] - self.residual) // self.block) * self.block
        if n_move:
            pos = torch.arange(self.n_coded, self.n_coded + n_move)
            # encode the original-precision states of the newest tokens (not their fp16 residual copy)
            fresh = min(key_states.shape[-2], self.keys.shape[-2])  # this call's tokens still in the residual
            new = self.keys.shape[-2] - fresh
            for kind, states, dense in (("keys", key_states, self.keys), ("values", value_states, self.values)):
                src = torch.cat([dense[..., :new, :].to(states.dtype), states[..., -fresh:, :]], -2)[..., :n_move, :]
                self.work[kind] = torch.cat([self.work[kind], self._encode(kind, src, pos)], -2)
            self.keys, self.values = self.keys[..., n_move:, :], self.values[..., n_move:, :]
            self.n_coded += n_move
            self.timing["tokens"] += n_move
        dt = key_states.dtype
        return (torch.cat([self.work["keys"], self.keys.to(dt)], -2),
                torch.cat([self.work["values"], self.values.to(dt)], -2))

    def get_seq_length(self) -> int:
        return 0 if not self.is_initialized else self.n_coded + self.keys.shape[-2]

    def nbytes(self) -> int:
        """Bytes actually held for this prompt: codes, dense residual, per-prompt online atoms."""
        if not self.is_initialized:
            return 0
        dense = (self.keys.numel() + self.values.numel()) * 2
        dense += sum(t.numel() * 2 for t in self.sinks.values() if t is not None)
        return (_nbytes(self.codes["keys"]) + _nbytes(self.codes["values"]) + dense
                + self.codec["keys"].extra_bytes() + self.codec["values"].extra_bytes())

    def n_elements(self) -> int:
        """Number of KV elements represented (keys + values)."""
        if not self.is_initialized:
            return 0
        B, H, _, d = self.keys.shape
        return 2 * B * H * self.get_seq_length() * d


# ---------------------------------------------------------------- building caches


@dataclass(frozen=True)
class CacheSpec:
    """One compressed-cache setting. ``method``: fp16, kivi or csr."""

    method: str = "fp16"
    bits: int = 2  # kivi
    group: int = 32  # kivi: token block for keys, channel group for values
    residual: int = 0  # most recent tokens kept dense (fp16)
    sink: int = 0  # first tokens kept dense (fp16): the attention sinks
    s_keys: int = 4  # csr atoms per chunk
    s_values: int = 4
    coder: str = "mp"
    online: int = 0  # csr: per-prompt atoms sampled from the prefill
    coef: str = "fp16"  # csr: stored weight precision, fp16 or fp8 (e4m3)
    packed: bool = False  # csr: indices bit-packed at ceil(log2 N) bits instead of int16
    name: str = ""

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.method == "kivi":
            return f"kivi{self.bits}-r{self.residual}"
        if self.method == "csr":
            return f"csr-{self.coder}-k{self.s_keys}v{self.s_values}-r{self.residual}"
        return self.method


def key_prep(dicts):
    """The dictionaries' key mean/scale (``keyprep``), if they were learned on prepared keys."""
    from edgecloud.kvcache.csr.keyprep import KeyPrep

    return KeyPrep.from_meta(dicts.meta, dicts.meta.get("n_layers"), dicts.meta.get("head_dim"))


def make_cache(spec: CacheSpec, n_layers: int, dicts=None, engine=None, seed: int = 0) -> Cache:
    """A transformers ``Cache`` whose layers store ``spec``'s encoding; ``engine`` (an ``edgecloud.llm`` Engine)
    supplies RoPE for pre-RoPE key codes."""
    layers = []
    prep = key_prep(dicts) if spec.method == "csr" and dicts is not None else None
    for li in range(n_layers):
        if spec.method == "fp16":
            kc, vc = FP16Codec(), FP16Codec()
        elif spec.method == "kivi":
            kc, vc = KIVICodec("keys", spec.bits, spec.group), KIVICodec("values", spec.bits, spec.group)
        elif spec.method == "csr":
            if dicts is None:
                raise UserError("method csr needs dictionaries (run calibration first)")
            kc = CSRCodec(dicts.for_layer("keys", li), spec.s_keys, spec.coder, dicts.pre_rope, spec.online,
                          seed + 2 * li, spec.coef, spec.packed, prep, li)
            vc = CSRCodec(dicts.for_layer("values", li), spec.s_values, spec.coder, False, spec.online,
                          seed + 2 * li + 1, spec.coef, spec.packed)
        else:
            raise UserError(f"method={spec.method!r}: use fp16, kivi or csr")
        layers.append(CodecLayer(kc, vc, spec.residual, engine, li, spec.sink))
    return Cache(layers=layers)


def cache_bits_per_element(cache: Cache) -> float:
    """Stored bits per KV element over all layers, every overhead counted (see CodecLayer.nbytes)."""
    b = sum(layer.nbytes() for layer in cache.layers)
    n = sum(layer.n_elements() for layer in cache.layers)
    return 8.0 * b / max(n, 1)


def cache_timing(cache: Cache) -> dict[str, float]:
    """Encode / decode seconds per token (all layers, keys and values)."""
    tok = max(cache.layers[0].timing["tokens"], 1)
    return {k: sum(layer.timing[k] for layer in cache.layers) / tok for k in ("encode_s", "decode_s")}
