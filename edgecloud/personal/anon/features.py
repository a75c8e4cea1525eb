"""The frozen lower layers of the cloud LM, run once over every sequence and cached.

Only the top ``n_top`` decoder layers of SmolLM2 are trained (LoRA) and conditioned on the user embedding (the soft
prefix is prepended to *their* input), so the hidden states entering them do not depend on the arm, the seed or the
embedding: they are computed once per data configuration and model, stored as safetensors under the cache, and every
arm trains and evaluates on them. That is what makes a per-arm training run affordable on a CPU.

Sequences: a training example is ``prompt + reply``; a held-out example is packed as ``prompt + cand_1 + ... +
cand_10`` in one sequence where each candidate attends to the prompt and to itself only (a block mask), positions
restarting after the prompt: the same hidden states as ten separate sequences, for the prompt's cost once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from edgecloud.llm.prompts import IM_END, chat_prompt

SYSTEM = "Reply to the chat message."
CACHE_VERSION = "anon-features-1"


@dataclass
class Packed:
    """Sequences stored flat: ``hidden[off[i]:off[i+1]]`` is sequence i; ``ids`` are its token ids."""

    hidden: torch.Tensor  # (total tokens, hidden) float16, the input of the first trainable layer
    ids: torch.Tensor  # (total tokens,) int64
    off: torch.Tensor  # (n + 1,) int64
    prompt_len: torch.Tensor  # (n,) int64
    seg: torch.Tensor  # (total tokens,) int64: 0 for the prompt, c+1 for candidate c (training: 1 for the reply)

    def seq(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a, b = int(self.off[i]), int(self.off[i + 1])
        return self.hidden[a:b], self.ids[a:b], self.seg[a:b]

    def __len__(self) -> int:
        return len(self.off) - 1

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.{k}": v.contiguous() for k, v in asdict(self).items()}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], prefix: str) -> Packed:
        return cls(**{k: t[f"{prefix}.{k}"] for k in ("hidden", "ids", "off", "prompt_len", "seg")})


def encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def prompt_ids(tok, context: str, ctx_tokens: int) -> list[int]:
    """ChatML prompt (``edgecloud.llm.prompts``) around the context's last ``ctx_tokens`` tokens."""
    head, tail = chat_prompt(SYSTEM, "\x00").split("\x00")
    return encode(tok, head) + encode(tok, context)[-ctx_tokens:] + encode(tok, tail)


def reply_ids(tok, reply: str, reply_tokens: int) -> list[int]:
    """The reply's first ``reply_tokens`` tokens, closed by ``<|im_end|>`` when it fits whole."""
    r = encode(tok, reply)
    return r[:reply_tokens] if len(r) >= reply_tokens else r + encode(tok, IM_END)


def block_mask(seg: torch.Tensor) -> torch.Tensor:
    """(q, kv) bool: causal, and a candidate token sees the prompt (segment 0) and its own segment only."""
    n = len(seg)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    same = (seg[:, None] == seg[None, :]) | (seg[None, :] == 0)
    return causal & same


def positions(seg: torch.Tensor) -> torch.Tensor:
    """Prompt at 0..P-1; each candidate continues from P (as if it were the only one)."""
    p = int((seg == 0).sum())
    pos = torch.arange(len(seg))
    for c in seg.unique():
        if c > 0:
            idx = (seg == c).nonzero().squeeze(1)
            pos[idx] = p + torch.arange(len(idx))
    return pos


def run_layers(layers, rotary, h: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Decoder layers over a padded batch: ``h`` (B, q, d), ``pos`` (B, q), ``mask`` (B, q, q) bool (True = attend).

    Batched and gradient-enabled (``Engine.forward_layers`` is single-sequence and inference-only)."""
    pe = rotary(h, pos)
    m4 = mask[:, None]
    for layer in layers:
        h = layer(h, attention_mask=m4, position_ids=pos, position_embeddings=pe)
    return h


def pad_batch(seqs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    """Right-pad (embeds, pos, mask) triples; a padded query row attends to key 0 only (never an all-False row)."""
    n = max(len(p) for _, p, _ in seqs)
    d = seqs[0][0].shape[-1]
    h = torch.zeros(len(seqs), n, d, dtype=seqs[0][0].dtype)
    pos = torch.zeros(len(seqs), n, dtype=torch.long)
    mask = torch.zeros(len(seqs), n, n, dtype=torch.bool)
    mask[:, :, 0] = True
    for b, (e, p, m) in enumerate(seqs):
        t = len(p)
        h[b, :t], pos[b, :t], mask[b, :t, :t] = e, p, m
    return h, pos, mask


@torch.no_grad()
def lower_hidden(lm, id_lists: list[list[int]], seg_lists: list[list[int]], n_lower: int,
                 batch_tokens: int = 1024) -> list[torch.Tensor]:
    """Hidden states after the first ``n_lower`` decoder layers for each sequence (float32)."""
    dec = lm.model.model
    emb = lm.model.get_input_embeddings()
    order = sorted(range(len(id_lists)), key=lambda i: len(id_lists[i]))
    out: list[torch.Tensor | None] = [None] * len(id_lists)
    i = 0
    while i < len(order):
        j = i + 1
        while j < len(order) and (j - i + 1) * len(id_lists[order[j]]) <= batch_tokens:
            j += 1
        chunk = order[i:j]
        seqs = []
        for k in chunk:
            seg = torch.tensor(seg_lists[k])
            seqs.append((emb(torch.tensor(id_lists[k])), positions(seg), block_mask(seg)))
        h, pos, mask = pad_batch(seqs)
        h = run_layers(dec.layers[:n_lower], dec.rotary_emb, h, pos, mask)
        for b, k in enumerate(chunk):
            out[k] = h[b, :len(id_lists[k])].clone()
        i = j
    return out  # type: ignore[return-value]


def pack(lm, ids: list[list[int]], segs: list[list[int]], n_lower: int) -> Packed:
    hid = lower_hidden(lm, ids, segs, n_lower)
    lens = torch.tensor([len(x) for x in ids])
    off = torch.zeros(len(ids) + 1, dtype=torch.long)
    off[1:] = lens.cumsum(0)
    return Packed(torch.cat(hid).half(), torch.tensor([t for x in ids for t in x]), off,
                  torch.tensor([s.count(0) for s in segs]), torch.tensor([t for s in segs for t in s]))


def build_features(lm, ds, n_top: int, cache: bool = True) -> tuple[Packed, Packed]:
    """(training sequences, packed held-out sequences) for dataset ``ds``; cached by data config and model."""
    from safetensors.torch import load_file, save_file

    from edgecloud import atomic
    from edgecloud.paths import cache_root
    from edgecloud.results import code_key

    n_lower = lm.model.config.num_hidden_layers - n_top
    key = code_key(asdict(ds.cfg), lm.fingerprint, n_lower, SYSTEM, version=CACHE_VERSION)
    path = cache_root() / "anon" / f"features-{key}.safetensors"
    if cache and path.exists():
        t = load_file(str(path))
        return Packed.from_tensors(t, "train"), Packed.from_tensors(t, "eval")
    tok, c = lm.tokenizer, ds.cfg
    tr_ids, tr_seg = pair_ids(tok, [(e.context, e.reply) for e in ds.train], c)
    ev_ids, ev_seg = [], []
    for e, cands in zip(ds.eval, ds.candidates):
        p = prompt_ids(tok, e.context, c.ctx_tokens)
        ids, seg = list(p), [0] * len(p)
        for j, cand in enumerate(cands):
            r = reply_ids(tok, cand, c.reply_tokens)
            ids += r
            seg += [j + 1] * len(r)
        ev_ids.append(ids)
        ev_seg.append(seg)
    train, evals = pack(lm, tr_ids, tr_seg, n_lower), pack(lm, ev_ids, ev_seg, n_lower)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic.atomic_path(path) as tmp:
            save_file({**train.tensors("train"), **evals.tensors("eval")}, str(tmp))
    return train, evals


def reply_features(p: Packed) -> torch.Tensor:
    """Per training sequence: the mean hidden state over its reply tokens (what a device summarizes its texts by)."""
    out = torch.zeros(len(p), p.hidden.shape[1])
    for i in range(len(p)):
        h, _, seg = p.seq(i)
        out[i] = h[seg == 1].float().mean(0)
    return out


def pair_ids(tok, pairs, cfg) -> tuple[list[list[int]], list[list[int]]]:
    """(ids, segments) of prompt + reply sequences for (context, reply) pairs."""
    ids, segs = [], []
    for context, reply in pairs:
        p, r = prompt_ids(tok, context, cfg.ctx_tokens), reply_ids(tok, reply, cfg.reply_tokens)
        ids.append(p + r)
        segs.append([0] * len(p) + [1] * len(r))
    return ids, segs


def pack_pairs(lm, pairs, cfg, n_top: int) -> Packed:
    """Training sequences for (context, reply) pairs (e.g. the cloud's store of uploads)."""
    return pack(lm, *pair_ids(lm.tokenizer, pairs, cfg), lm.model.config.num_hidden_layers - n_top)


def message_features(lm, examples, cfg, n_top: int) -> torch.Tensor:
    """Device side: per own message (context, reply), the mean lower-layer hidden state over the reply tokens."""
    return reply_features(pack_pairs(lm, [(e.context, e.reply) for e in examples], cfg, n_top))
