"""The cloud model: SmolLM2's top decoder layers with LoRA, conditioned on the upload's embedding by a soft prefix.

``prefix = bias + scale * (W z)`` reshaped to ``k`` vectors of the hidden size, prepended to the hidden states
entering the top ``n_top`` layers (the lower layers are frozen and cached, :mod:`.features`). The bias is a learned
prefix every arm has, so "no embedding" (``z = 0``) has the same parameters and training as the personalized arms
and any gain is the embedding's. ``scale`` is the per-dimension std of the hidden states there, so ``W`` learns in
normalized units. The frozen final norm and tied output head give the next-token distribution over the full
vocabulary: losses are the real model's.

The cloud trains on (embedding, text) pairs only; the static-ID arm (the non-private upper bound) is the one
exception: it owns a learned table of one embedding per user.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from edgecloud.errors import UserError
from edgecloud.personal.anon.features import Packed, block_mask, pad_batch, positions, run_layers


@dataclass(frozen=True)
class CloudConfig:
    n_top: int = 1  # trainable decoder layers at the top (LoRA + prefix)
    k_prefix: int = 4  # soft prefix vectors
    lora_r: int = 8
    lora_alpha: int = 16
    lr: float = 2e-3  # LoRA
    prefix_lr: float = 3e-3  # prefix projection, bias and the static-ID table
    batch: int = 16
    epochs: float = 1.5
    eval_batch: int = 8

    def __post_init__(self):
        if self.n_top < 1 or self.k_prefix < 1 or self.lora_r < 1 or self.batch < 1 or self.eval_batch < 1:
            raise UserError("n_top, k_prefix, lora_r, batch and eval_batch must be at least 1")
        if not self.lr > 0 or not self.prefix_lr > 0 or not self.epochs > 0:
            raise UserError(f"lr={self.lr}, epochs={self.epochs}: must be positive")


class CloudModel(nn.Module):
    def __init__(self, lm, cfg: CloudConfig, emb_dim: int, hidden_mean: torch.Tensor, hidden_std: torch.Tensor,
                 n_users: int = 0, seed: int = 0):
        from peft import LoraConfig, inject_adapter_in_model

        super().__init__()
        torch.manual_seed(seed)
        dec = lm.model.model
        self.cfg, self.emb_dim = cfg, emb_dim
        top = copy.deepcopy(dec.layers[len(dec.layers) - cfg.n_top:])
        for p in top.parameters():
            p.requires_grad_(False)
        self.top = inject_adapter_in_model(LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                                                      target_modules=["q_proj", "v_proj"]), top)
        self._frozen = (dec.norm, dec.rotary_emb, lm.model.get_output_embeddings().weight)  # shared, never trained
        hdim = hidden_mean.shape[0]
        self.proj = nn.Linear(emb_dim, cfg.k_prefix * hdim, bias=False)
        nn.init.normal_(self.proj.weight, std=0.1 / max(emb_dim, 1) ** 0.5)
        self.bias = nn.Parameter(hidden_mean.float().repeat(cfg.k_prefix, 1)
                                 + 0.1 * hidden_std.float() * torch.randn(cfg.k_prefix, hdim))
        self.register_buffer("scale", hidden_std.float().clone())
        self.table = nn.Embedding(n_users, emb_dim) if n_users else None  # static-ID arm only
        if self.table is not None:
            nn.init.normal_(self.table.weight)

    def prefix(self, z: torch.Tensor) -> torch.Tensor:
        """(B, emb_dim) embeddings -> (B, k, hidden) prefix vectors."""
        b = z.shape[0]
        return self.bias + self.proj(z).view(b, self.cfg.k_prefix, -1) * self.scale

    def query_hidden(self, seqs: list[tuple[torch.Tensor, torch.Tensor]], z: torch.Tensor,
                     queries: list[torch.Tensor]) -> torch.Tensor:
        """Final-normed hidden states (B, Q, hidden) at ``queries`` (indices into each text sequence) of
        (lower hidden, segment) sequences behind the prefix. Only the last layer's queries that predict a token are
        computed (:func:`last_layer_at`): keys/values need every token, the MLP only those."""
        norm, rotary, _ = self._frozen
        k = self.cfg.k_prefix
        pre = self.prefix(z)
        items = []
        for b, (h, seg) in enumerate(seqs):
            mask = block_mask(torch.cat([torch.zeros(k, dtype=seg.dtype), seg]))  # the prefix is prompt (segment 0)
            pos = torch.cat([torch.arange(k), k + positions(seg)])
            items.append((torch.cat([pre[b], h.float()]), pos, mask))
        hb, pos, mask = pad_batch(items)
        qn = max(len(q) for q in queries)
        qidx = torch.zeros(len(seqs), qn, dtype=torch.long)
        for b, q in enumerate(queries):
            qidx[b, :len(q)] = k + q
        if len(self.top) > 1:
            hb = run_layers(self.top[:-1], rotary, hb, pos, mask)
        return norm(last_layer_at(self.top[-1], rotary, hb, pos, mask, qidx))

    def token_nll(self, seqs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], z: torch.Tensor,
                  vocab: torch.Tensor | None = None, full_seg: int | None = None):
        """Per sequence: (NLL of every non-prompt token, its segment id), each token predicted from the previous
        token of its own segment (the prompt's last token for a segment's first).

        With ``vocab`` the softmax runs over those token ids only (training and candidate ranking: the head over
        49k tokens would cost more than the trained layer); ``full_seg`` also returns, per sequence, the NLL under
        the full vocabulary of that segment's tokens (the held-out LM loss)."""
        queries, tgts, segids = [], [], []
        for _, ids, seg in seqs:
            p = int((seg == 0).sum())
            q, t, c = [], [], []
            for s in seg.unique().tolist():
                if s == 0:
                    continue
                idx = (seg == s).nonzero().squeeze(1)
                q.append(torch.cat([torch.tensor([p - 1]), idx[:-1]]))
                t.append(ids[idx])
                c.append(torch.full((len(idx),), s))
            queries.append(torch.cat(q))
            tgts.append(torch.cat(t))
            segids.append(torch.cat(c))
        hs = self.query_hidden([(h, s) for h, _, s in seqs], z, queries)
        head = self._frozen[2]
        h = torch.cat([hs[b, :len(q)] for b, q in enumerate(queries)])
        tgt, segid = torch.cat(tgts), torch.cat(segids)
        owner = torch.cat([torch.full((len(q),), b) for b, q in enumerate(queries)])
        if vocab is None:
            nll = nn.functional.cross_entropy(h @ head.T, tgt, reduction="none")
        else:
            nll = nn.functional.cross_entropy(h @ head[vocab].T, torch.searchsorted(vocab, tgt), reduction="none")
        out = [(nll[owner == b], segid[owner == b]) for b in range(len(seqs))]
        if full_seg is None:
            return out
        sel = segid == full_seg
        full = nn.functional.cross_entropy(h[sel] @ head.T, tgt[sel], reduction="none")
        return out, [full[owner[sel] == b] for b in range(len(seqs))]


def last_layer_at(layer, rotary, h: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor,
                  qidx: torch.Tensor) -> torch.Tensor:
    """A Llama decoder layer's output at query positions ``qidx`` (B, Q) only: the same arithmetic as the layer
    (RMSNorm, RoPE, grouped-query SDPA, MLP, residuals), with queries, o_proj and the MLP on Q rows instead of all."""
    from transformers.models.llama.modeling_llama import repeat_kv, rotate_half

    att = layer.self_attn
    b, t, _ = h.shape
    hd = att.head_dim
    x = layer.input_layernorm(h)
    gather = lambda y: torch.gather(y, 1, qidx[..., None].expand(-1, -1, y.shape[-1]))  # noqa: E731
    cos, sin = rotary(h, pos)
    q = att.q_proj(gather(x)).view(b, qidx.shape[1], -1, hd).transpose(1, 2)
    kk = att.k_proj(x).view(b, t, -1, hd).transpose(1, 2)
    v = att.v_proj(x).view(b, t, -1, hd).transpose(1, 2)
    cq, sq = gather(cos)[:, None], gather(sin)[:, None]
    q = q * cq + rotate_half(q) * sq
    kk = kk * cos[:, None] + rotate_half(kk) * sin[:, None]
    kk, v = repeat_kv(kk, att.num_key_value_groups), repeat_kv(v, att.num_key_value_groups)
    m = torch.gather(mask, 1, qidx[..., None].expand(-1, -1, t))[:, None]
    o = nn.functional.scaled_dot_product_attention(q, kk, v, attn_mask=m, scale=att.scaling)
    hq = gather(h) + att.o_proj(o.transpose(1, 2).reshape(b, qidx.shape[1], -1))
    return hq + layer.mlp(layer.post_attention_layernorm(hq))


def vocabulary(*packs: Packed) -> torch.Tensor:
    """Sorted token ids occurring in the sequences (the slice's vocabulary; every target is in it)."""
    return torch.unique(torch.cat([p.ids for p in packs]))


def hidden_stats(train: Packed) -> tuple[torch.Tensor, torch.Tensor]:
    h = train.hidden.float()
    return h.mean(0), h.std(0).clamp_min(1e-3)


def train_model(model: CloudModel, train: Packed, users: torch.Tensor, embed, seed: int, vocab: torch.Tensor,
                log=None) -> dict:
    """Adam over LoRA + prefix (+ table); ``embed(idx, users, gen)`` gives the (B, d) upload embeddings of a batch
    (a fresh sample per use for the anonymous arms). Returns the loss curve."""
    cfg = model.cfg
    lora = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("top.")]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("top.")]
    opt = torch.optim.Adam([{"params": lora, "lr": cfg.lr}, {"params": rest, "lr": cfg.prefix_lr}])
    gen = torch.Generator().manual_seed(seed)
    n = len(train)
    steps = max(1, int(round(cfg.epochs * n / cfg.batch)))
    order = torch.cat([torch.randperm(n, generator=gen) for _ in range(int(cfg.epochs) + 2)])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, steps // 10)))
    curve = []
    model.train()
    for s in range(steps):
        idx = order[s * cfg.batch:(s + 1) * cfg.batch]
        z = embed(idx, users[idx], gen)
        out = model.token_nll([train.seq(int(i)) for i in idx], z, vocab)
        loss = torch.cat([nll for nll, _ in out]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        curve.append(float(loss.detach()))
        if log and (s % 10 == 0 or s == steps - 1):
            log(f"step {s + 1}/{steps} loss {float(loss):.3f}")
    model.eval()
    return {"steps": steps, "loss_first10": sum(curve[:10]) / len(curve[:10]),
            "loss_last10": sum(curve[-10:]) / len(curve[-10:])}


@torch.no_grad()
def evaluate(model: CloudModel, evals: Packed, users: torch.Tensor, embed, seed: int, vocab: torch.Tensor,
             ref: torch.Tensor | None = None) -> dict:
    """Reply selection (lowest mean NLL over ``vocab`` among the candidates, real reply = candidate 1) and held-out
    LM loss of the real replies over the full vocabulary; ``embed`` samples each request's embedding.

    With ``ref`` (one embedding: the mean upload, which the cloud knows without identities) the candidates are also
    ranked by the *contrast* NLL(c | z) - NLL(c | ref): how much more likely the request's embedding makes a
    candidate than the average user does. That cancels what every user shares (a short, generic reply is likely for
    anyone) and keeps what the embedding adds, the way an author classifier scores P(user | text)."""
    gen = torch.Generator().manual_seed(seed + 7919)
    hits, chits, tok_nll, tok_n = [], [], 0.0, 0
    bs = model.cfg.eval_batch
    for a in range(0, len(evals), bs):
        idx = torch.arange(a, min(a + bs, len(evals)))
        z = embed(idx, users[idx], gen)
        seqs = [evals.seq(int(i)) for i in idx]
        out, full = model.token_nll(seqs, z, vocab, full_seg=1)
        base = model.token_nll(seqs, ref.expand(len(idx), -1), vocab) if ref is not None else [None] * len(out)
        for (nll, seg), real, bnll in zip(out, full, base):
            cands = seg.unique()
            means = torch.stack([nll[seg == c].mean() for c in cands])
            hits.append(int(cands[means.argmin()] == 1))
            if bnll is not None:
                d = means - torch.stack([bnll[0][seg == c].mean() for c in cands])
                chits.append(int(bool((d[cands == 1] < d[cands != 1]).all())))  # strict: ties are misses
            tok_nll += float(real.sum())
            tok_n += len(real)
    loss = tok_nll / tok_n
    out = {"acc": sum(hits) / len(evals), "lm_loss": loss, "ppl": float(torch.tensor(loss).exp()), "hits": hits}
    if chits:
        out |= {"acc_contrast": sum(chits) / len(evals), "hits_contrast": chits}
    return out


MODEL_FORMAT = "edgecloud-anon-cloud-1"


def save_model(model: CloudModel, path, model_fingerprint: str, basis_fingerprint: str) -> None:
    """The trained parameters (LoRA, prefix projection and bias, scale) as safetensors; the frozen LM is not
    copied, its fingerprint is recorded and checked on load."""
    import json
    from dataclasses import asdict

    from safetensors.torch import save_file

    from edgecloud import atomic

    keep = {n: t.detach().contiguous() for n, t in model.state_dict().items()
            if n == "scale" or not n.startswith("top.") or "lora_" in n}
    keep.pop("table.weight", None)  # a per-user table is never served: it would identify users
    with atomic.atomic_path(path) as tmp:
        save_file(keep, str(tmp), metadata={"format": MODEL_FORMAT, "model_fingerprint": model_fingerprint,
                                            "basis_fingerprint": basis_fingerprint, "emb_dim": str(model.emb_dim),
                                            "config": json.dumps(asdict(model.cfg))})


def load_model_file(path, lm, basis_fingerprint: str) -> CloudModel:
    import json

    from edgecloud.personal.anon.device import _load

    t, meta = _load(path, MODEL_FORMAT, ("bias", "scale", "proj.weight"))
    if meta.get("model_fingerprint") != lm.fingerprint:
        raise UserError(f"{path}: trained on model {meta.get('model_fingerprint')}, this cloud runs {lm.fingerprint}")
    if meta.get("basis_fingerprint") != basis_fingerprint:
        raise UserError(f"{path}: trained for basis {meta.get('basis_fingerprint')}, the served basis is "
                        f"{basis_fingerprint}; train it again on uploads made with this basis")
    cfg = CloudConfig(**json.loads(meta["config"]))
    hd = t["scale"].shape[0]
    m = CloudModel(lm, cfg, int(meta["emb_dim"]), torch.zeros(hd), torch.ones(hd))
    missing = [n for n in m.state_dict() if n not in t and (not n.startswith("top.") or "lora_" in n)]
    if missing:
        raise UserError(f"{path}: missing tensor(s) {', '.join(missing[:3])}; the file is not a full cloud model")
    m.load_state_dict(t, strict=False)
    return m.eval()


def scorer(model: CloudModel, lm, data_cfg):
    """``score(context, candidates, z)`` -> mean NLL per candidate (full vocabulary): the served personalization."""
    from edgecloud.personal.anon.features import lower_hidden, prompt_ids, reply_ids

    n_lower = lm.model.config.num_hidden_layers - model.cfg.n_top

    @torch.no_grad()
    def score(context: str, candidates: list[str], z: torch.Tensor) -> list[float]:
        tok = lm.tokenizer
        p = prompt_ids(tok, context, data_cfg.ctx_tokens)
        ids, seg = list(p), [0] * len(p)
        for j, c in enumerate(candidates):
            r = reply_ids(tok, c, data_cfg.reply_tokens)
            ids += r
            seg += [j + 1] * len(r)
        (h,) = lower_hidden(lm, [ids], [seg], n_lower)
        seg_t = torch.tensor(seg)
        ((nll, segid),) = model.token_nll([(h, torch.tensor(ids), seg_t)], z[None])
        return [float(nll[segid == j + 1].mean()) for j in range(len(candidates))]

    return score
