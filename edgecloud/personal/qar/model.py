"""The dual-tower responder on SmolLM2-135M-Instruct (``edgecloud.llm``), and batched greedy generation for it.

* **General tower**: the base model with LoRA (peft) on the top ``top_layers`` decoder layers.
* **Specific tower**: a second stream through the same top layers (same attention, same LoRA) whose input carries a
  learned embedding of the (responder, questioner) pair, and whose every layer *adds* a low-rank SwiGLU MLP with its
  own RMSNorm to the base MLP; its own final norm. The down projection and the pair embeddings start at zero, so at
  step 0 the specific stream equals the general one and the model equals base + LoRA (training starts from the
  base model's behaviour, not from a randomly perturbed one).
* **Output**: ``lm_head`` of the mean of the two towers' final-normed hidden states (the paper's merge).

Layers below the top ones are frozen and identical for both streams, so they run once (B rows) and the two streams
split at the top (2B rows); training precomputes them once per exchange (:meth:`DualTower.bottom`). The paper puts
the towers on every layer; restricting training to the top layers is what makes a run fit in minutes on 2 cores.

Generation is ours (left-padded batch, per-row positions, a plain per-layer KV list that holds B rows below the
split and 2B above): the shared batched engine drives a stock transformers forward, which has no second stream.
With the towers off it gives the same tokens as ``edgecloud.llm.batch.generate_batch`` (tested).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from edgecloud.errors import UserError

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelConfig:
    base: str = "smollm2-135m"
    top_layers: int = 4  # decoder layers that train (LoRA + specific tower); the ones below stay frozen
    lora: bool = True  # False: the untouched base model (the "base" arm)
    lora_rank: int = 8
    lora_alpha: float = 16.0
    towers: bool = True  # False: general tower only (plain LoRA arms)
    spec_rank: int = 16  # rank of the specific tower's SwiGLU MLP
    n_pairs: int = 1  # (responder, questioner) pairs: rows of the pair embedding
    n_clusters: int = 1  # question clusters: one pair of projection heads each
    proj_dim: int = 64  # contrastive projection width
    init_seed: int = 0  # LoRA A matrices and projection heads are drawn from this seed
    lora_targets: tuple[str, ...] = LORA_TARGETS

    def __post_init__(self):
        if self.top_layers < 1 or self.lora_rank < 1 or self.spec_rank < 1 or self.proj_dim < 1:
            raise UserError("model config: top_layers, lora_rank, spec_rank and proj_dim must be >= 1")
        if self.n_pairs < 1 or self.n_clusters < 1:
            raise UserError("model config: n_pairs and n_clusters must be >= 1")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        d = dict(d)
        d["lora_targets"] = tuple(d.get("lora_targets", LORA_TARGETS))
        return cls(**d)


class LowRankSwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) with a small inner width; ``down`` starts at zero (the block adds nothing)."""

    def __init__(self, hidden: int, rank: int):
        super().__init__()
        self.gate = nn.Linear(hidden, rank, bias=False)
        self.up = nn.Linear(hidden, rank, bias=False)
        self.down = nn.Linear(rank, hidden, bias=False)
        nn.init.zeros_(self.down.weight)

    def forward(self, x):
        return self.down(nn.functional.silu(self.gate(x)) * self.up(x))


class KV:
    """Per-layer key/value store for our own layer loop: ``update`` appends along the token axis; ``valid`` (B, slots)
    marks the real (non-padding) slots. Tensors are never modified in place, so a shallow copy can branch."""

    def __init__(self, valid: torch.Tensor):
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.valid = valid

    def copy(self) -> KV:
        c = KV(self.valid)
        c.k, c.v = dict(self.k), dict(self.v)
        return c

    def update(self, k, v, layer_idx, **_):
        if layer_idx in self.k:
            k = torch.cat([self.k[layer_idx], k], 2)
            v = torch.cat([self.v[layer_idx], v], 2)
        self.k[layer_idx], self.v[layer_idx] = k, v
        return k, v


@dataclass
class Batch:
    """Left-padded token ids with per-row positions and validity."""

    ids: torch.Tensor  # (B, T)
    valid: torch.Tensor  # (B, T) bool
    pos: torch.Tensor  # (B, T)
    lens: list[int] = field(default_factory=list)

    @classmethod
    def left_pad(cls, seqs: list[list[int]], pad: int = 0) -> Batch:
        t = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), t), pad, dtype=torch.long)
        valid = torch.zeros((len(seqs), t), dtype=torch.bool)
        for i, s in enumerate(seqs):
            ids[i, t - len(s):] = torch.tensor(s, dtype=torch.long)
            valid[i, t - len(s):] = True
        pos = (valid.long().cumsum(1) - 1).clamp(min=0)
        return cls(ids, valid, pos, [len(s) for s in seqs])


def attention_mask(valid_q: torch.Tensor, valid_k: torch.Tensor) -> torch.Tensor:
    """(B, 1, q, k) bool: causal over the last q of k slots, only real keys; a padding query sees itself (no
    all-masked row, which SDPA turns into NaN)."""
    b, q = valid_q.shape
    k = valid_k.shape[1]
    causal = torch.ones(q, k, dtype=torch.bool).tril(k - q)
    m = causal.unsqueeze(0) & valid_k.unsqueeze(1)
    diag = torch.zeros(q, k, dtype=torch.bool)
    diag[torch.arange(q), torch.arange(k - q, k)] = True
    m = m | (diag.unsqueeze(0) & ~valid_q.unsqueeze(2))
    return m.unsqueeze(1)


class DualTower(nn.Module):
    def __init__(self, lm, cfg: ModelConfig):
        """``lm``: an ``edgecloud.llm.models.LoadedModel``; its model is modified in place (LoRA injected)."""
        super().__init__()
        self.cfg, self.tok, self.fingerprint = cfg, lm.tokenizer, lm.fingerprint
        self.causal = lm.model
        for p in self.causal.parameters():
            p.requires_grad_(False)
        self.decoder = self.causal.model
        n = len(self.decoder.layers)
        if cfg.top_layers > n:
            raise UserError(f"top_layers {cfg.top_layers}: the model has only {n} layers")
        self.split = n - cfg.top_layers
        torch.manual_seed(cfg.init_seed)  # the same config always builds the same initial model
        if cfg.lora:
            from peft import LoraConfig, inject_adapter_in_model

            lc = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                            target_modules=list(cfg.lora_targets), layers_to_transform=list(range(self.split, n)))
            inject_adapter_in_model(lc, self.causal)
            for name, p in self.causal.named_parameters():
                p.requires_grad_("lora_" in name)
        h = self.decoder.config.hidden_size
        if cfg.towers:
            top = self.decoder.layers[self.split:]
            self.spec_norm = nn.ModuleList(copy.deepcopy(layer.post_attention_layernorm) for layer in top)
            self.spec_mlp = nn.ModuleList(LowRankSwiGLU(h, cfg.spec_rank) for _ in top)
            self.norm_spec = copy.deepcopy(self.decoder.norm)
            self.pair_emb = nn.Embedding(cfg.n_pairs, h)
            nn.init.zeros_(self.pair_emb.weight)
            # two projection heads per cluster (two views of the same pooled state), as (clusters, hidden, dim)
            self.proj1 = nn.Parameter(torch.randn(cfg.n_clusters, h, cfg.proj_dim) / h ** 0.5)
            self.proj2 = nn.Parameter(torch.randn(cfg.n_clusters, h, cfg.proj_dim) / h ** 0.5)
            for p in [*self.spec_norm.parameters(), *self.norm_spec.parameters()]:
                p.requires_grad_(True)
        self.eos_ids = {i for i in (self.tok.eos_token_id, self.tok.convert_tokens_to_ids("<|im_end|>"))
                        if isinstance(i, int) and i >= 0}

    # ----- state -----
    def trainable(self) -> dict[str, torch.Tensor]:
        """Every parameter that trains, by name (what a checkpoint holds)."""
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    # ----- forward pieces -----
    def _layer(self, i: int, h, pe, mask, cache, n_general: int):
        layer = self.decoder.layers[i]
        a, _ = layer.self_attn(layer.input_layernorm(h), position_embeddings=pe, attention_mask=mask, cache=cache)
        h = h + a
        m = layer.mlp(layer.post_attention_layernorm(h))
        if n_general < h.shape[0]:  # the specific stream's rows add their own low-rank MLP
            j = i - self.split
            extra = self.spec_mlp[j](self.spec_norm[j](h[n_general:]))
            m = torch.cat([m[:n_general], m[n_general:] + extra], 0)
        return h + m

    def bottom(self, b: Batch, cache: KV | None = None) -> torch.Tensor:
        """Hidden states entering the top layers (frozen part; no gradient needed)."""
        h = self.decoder.embed_tokens(b.ids)
        pe = self.decoder.rotary_emb(h, b.pos)
        mask = attention_mask(b.valid, b.valid if cache is None else cache.valid)
        for i in range(self.split):
            h = self._layer(i, h, pe, mask, cache, h.shape[0])
        return h

    def top(self, h, b: Batch, pairs: torch.Tensor | None, cache: KV | None = None, towers: bool | None = None):
        """Top layers from the split. Returns (general final-normed, specific final-normed or None)."""
        towers = self.cfg.towers if towers is None else towers
        n = h.shape[0]
        valid_k = b.valid if cache is None else cache.valid
        mask = attention_mask(b.valid, valid_k)
        pos = b.pos
        if towers:
            h = torch.cat([h, h + self.pair_emb(pairs).unsqueeze(1)], 0)
            mask, pos = torch.cat([mask, mask], 0), torch.cat([pos, pos], 0)
        pe = self.decoder.rotary_emb(h, pos)
        for i in range(self.split, len(self.decoder.layers)):
            h = self._layer(i, h, pe, mask, cache, n)
        g = self.decoder.norm(h[:n])
        s = self.norm_spec(h[n:]) if towers else None
        return g, s

    def merged(self, g, s):
        """The hidden state the LM head reads: the mean of the two towers (or the general one alone)."""
        return g if s is None else (g + s) / 2

    def logits(self, g, s):
        return self.causal.lm_head(self.merged(g, s))

    # ----- generation -----
    @staticmethod
    def chunks(prompts: list[list[int]], batch_size: int) -> list[list[int]]:
        """Prompt indices in batches of similar length (less padding)."""
        order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
        return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]

    @torch.inference_mode()
    def prefill_bottom(self, prompts: list[list[int]], batch_size: int = 32) -> list[tuple]:
        """The frozen layers' prefill of every batch of prompts: (indices, Batch, KV, hidden at the split). The
        frozen layers are the same in every arm built on the same base, so one prefill serves them all."""
        out = []
        for idx in self.chunks(prompts, batch_size):
            b = Batch.left_pad([prompts[i] for i in idx])
            kv = KV(b.valid)
            out.append((idx, b, kv, self.bottom(b, kv)))
        return out

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], pairs: list[int] | None, max_new_tokens: int = 24,
                 batch_size: int = 32, prefilled: list[tuple] | None = None) -> list[list[int]]:
        """Greedy decoding of every prompt (token ids), in batches; stops at an end-of-turn token. ``prefilled``:
        :meth:`prefill_bottom` of the same prompts (possibly by another arm's model: the frozen part is shared)."""
        out: list[list[int] | None] = [None] * len(prompts)
        for idx, b, kv, h in prefilled or self.prefill_bottom(prompts, batch_size):
            pr = torch.tensor([pairs[i] for i in idx]) if pairs is not None and self.cfg.towers else None
            for i, toks in zip(idx, self._generate(b, kv.copy(), h, pr, max_new_tokens), strict=True):
                out[i] = toks
        return out

    def _generate(self, b: Batch, cache: KV, h, pairs, max_new: int) -> list[list[int]]:
        n = b.ids.shape[0]
        g, s = self.top(h, b, pairs, cache)
        logits = self.logits(g[:, -1], None if s is None else s[:, -1])
        done = torch.zeros(n, dtype=torch.bool)
        toks: list[list[int]] = [[] for _ in range(n)]
        last_pos = b.pos[:, -1]
        for step in range(max_new):
            nxt = logits.argmax(-1)
            for i in range(n):
                if not done[i]:
                    toks[i].append(int(nxt[i]))
                    done[i] = int(nxt[i]) in self.eos_ids
            if bool(done.all()) or step == max_new - 1:
                break
            last_pos = last_pos + 1
            cache.valid = torch.cat([cache.valid, torch.ones(n, 1, dtype=torch.bool)], 1)
            step_b = Batch(nxt.unsqueeze(1), torch.ones(n, 1, dtype=torch.bool), last_pos.unsqueeze(1))
            g, s = self.top(self.bottom(step_b, cache), step_b, pairs, cache)
            logits = self.logits(g[:, -1], None if s is None else s[:, -1])
        return [[t for t in ts if t not in self.eos_ids] for ts in toks]
