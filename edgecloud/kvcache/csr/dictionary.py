"""NeuralDict: dictionaries learned by gradient descent through the sparse (MP) reconstruction.

Atoms start from spherical k-means, stay unit-norm (re-projected after every step), and a coherence penalty
‖I − D Dᵀ‖² spreads them so MP's greedy picks do not waste atoms on near-duplicates. One dictionary per
(layer group, channel chunk), separately for keys and values. Adjacent layers whose vectors fall on the same
directions share a dictionary: groups are cut where the Jensen–Shannon divergence between neighbouring layers'
direction histograms is largest (the paper groups layers by JSD). Training stops when the held-out MP error stops
falling (early stopping; the curve is kept).

Dictionaries are model-side artefacts: the safetensors file records the model fingerprint, the layer shape, the
config, the code version that computed it and the command that trained it; :meth:`CSRDictionaries.load` refuses a
file for another model or shape, a corrupt file, and a stale one (another code version).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import torch
from safetensors.torch import load_file, save_file

from edgecloud.atomic import atomic_path
from edgecloud.errors import UserError
from edgecloud.kvcache.csr.coding import QUANTS, matching_pursuit, reconstruct, spherical_kmeans


@dataclass(frozen=True)
class DictConfig:
    n_atoms: int = 4096  # dictionary size N
    s: int = 4  # atoms per chunk used in training (the coder's sparsity)
    s_n: int = 1  # channel chunks per vector
    group: int = 1  # target layers per shared dictionary (ceil(L / group) groups, boundaries by JSD)
    steps: int = 200  # most NeuralDict Adam steps (0 = k-means dictionary only); early stopping may end sooner
    lr: float = 2e-3
    batch: int = 256  # vectors per problem per step
    coherence: float = 0.05  # weight of ‖I − DDᵀ‖²/N²
    kmeans_iters: int = 15
    kmeans_sample: int = 0  # vectors per problem k-means sees (0 = all); bounds its cost at 16k atoms
    coef: str = "fp16"  # stored weight precision the pursuit rounds to: fp16 or fp8 (e4m3)
    eval_every: int = 10  # steps between held-out evaluations
    patience: int = 3  # evaluations without a min_delta relative improvement before stopping
    min_delta: float = 0.002
    seed: int = 0

    def check(self, head_dim: int) -> None:
        if not 1 <= self.n_atoms <= 32767:
            raise UserError(f"n_atoms={self.n_atoms}: must be in 1..32767 (indices fit int16); lower --atoms")
        if head_dim % self.s_n:
            raise UserError(f"s_n={self.s_n} must divide the head dimension {head_dim}; use 1, 2 or 4")
        if self.s < 1 or self.group < 1:
            raise UserError("s and group must be >= 1")
        if self.coef not in QUANTS:
            raise UserError(f"coef={self.coef!r}: use one of {sorted(QUANTS)}")


def chunk(x: torch.Tensor, s_n: int) -> torch.Tensor:
    """(M, d) -> (s_n, M, d/s_n): each contiguous channel chunk is its own coding problem."""
    M, d = x.shape
    return x.reshape(M, s_n, d // s_n).transpose(0, 1)


def rel_error(x: torch.Tensor, D: torch.Tensor, s: int, coef: str = "fp16") -> float:
    """Relative squared MP error Σ‖x − x̂‖² / Σ‖x‖² of (K, M, d) vectors over (K, N, d) atoms (weights rounded)."""
    with torch.no_grad():
        idx, c = matching_pursuit(x, D, s, QUANTS[coef])
        return float((reconstruct(D, idx, c) - x).pow(2).sum() / x.pow(2).sum())


def coherence(D: torch.Tensor) -> torch.Tensor:
    """mean((I − DDᵀ)²) over the N×N entries, via the d×d Gram (unit rows: ‖DDᵀ‖² = ‖DᵀD‖², tr DDᵀ = N)."""
    N = D.shape[-2]
    g = D.transpose(-1, -2) @ D
    return (g.pow(2).sum((-1, -2)) - N).mean() / N**2


def train_dictionary(x: torch.Tensor, cfg: DictConfig, x_val: torch.Tensor | None = None,
                     log=None) -> tuple[torch.Tensor, list[dict]]:
    """Learn (K, N, dc) atoms for K stacked problems x (K, M, dc); ``x_val`` (K, M', dc) is the held-out set for
    early stopping. Returns the atoms with the best held-out error and the curve [{step, train, heldout}].

    The loss is the relative MP reconstruction error (scale-free, so keys and values share one learning rate) plus
    the coherence penalty; weights are rounded to ``cfg.coef`` in the pursuit (straight-through for the gradient);
    the k-means atoms are the starting point, so steps=0 gives the k-means baseline.
    """
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    K, M, _ = x.shape
    km = x if not cfg.kmeans_sample or cfg.kmeans_sample >= M else x[:, torch.randperm(M, generator=g)[
        :cfg.kmeans_sample]]
    D = spherical_kmeans(km, cfg.n_atoms, iters=cfg.kmeans_iters, seed=cfg.seed)
    q = QUANTS[cfg.coef]
    val = x_val if x_val is not None else x[:, : min(M, 2048)]
    best_err = rel_error(val, D, cfg.s, cfg.coef)
    curve = [{"step": 0, "train": None, "heldout": best_err}]
    if log:
        log(f"  k-means N={cfg.n_atoms}: held-out rel. error {best_err:.4f}")
    if cfg.steps == 0:
        return D, curve
    best = D.clone()
    P = torch.nn.Parameter(D.clone())
    opt = torch.optim.Adam([P], lr=cfg.lr)

    def ste(c):  # the stored (rounded) weight forward, the identity backward
        return c + (q(c) - c).detach()

    bad, run = 0, []
    for step in range(1, cfg.steps + 1):
        b = x[:, torch.randint(0, M, (min(cfg.batch, M),), generator=g)]
        Dn = torch.nn.functional.normalize(P, dim=-1)
        idx, c = matching_pursuit(b, Dn, cfg.s, ste)
        err = (reconstruct(Dn, idx, c) - b).pow(2).sum(-1).mean() / b.pow(2).sum(-1).mean()
        loss = err + cfg.coherence * coherence(Dn)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            P.copy_(torch.nn.functional.normalize(P, dim=-1))
        run.append(float(err.detach()))
        if step % cfg.eval_every == 0 or step == cfg.steps:
            e = rel_error(val, P.detach(), cfg.s, cfg.coef)
            curve.append({"step": step, "train": sum(run) / len(run), "heldout": e})
            run = []
            if log:
                log(f"  step {step}: train {curve[-1]['train']:.4f} held-out {e:.4f}")
            if e < best_err * (1 - cfg.min_delta):
                best, best_err, bad = P.detach().clone(), e, 0
            else:
                bad += 1
                if bad >= cfg.patience:
                    break
    return best, curve


# ---------------------------------------------------------------- layer groups by JSD


def _jsd(p: torch.Tensor, q: torch.Tensor) -> float:
    m = (p + q) / 2

    def kl(a, b):
        return float((a * (a.clamp_min(1e-12) / b.clamp_min(1e-12)).log()).sum())

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def layer_groups(x: torch.Tensor, group: int, codes: int = 64, sample: int = 2048,
                 seed: int = 0) -> tuple[list[int], list[float]]:
    """Group id per layer for x (L, M, d): ceil(L/group) contiguous groups, cut between the adjacent layers whose
    direction histograms (over one k-means codebook fitted on all layers) differ most by Jensen–Shannon
    divergence, with no group longer than 2·group − 1 layers. Returns (ids, adjacent JSDs)."""
    L, M, d = x.shape
    if group <= 1 or L == 1:
        return list(range(L)), []
    g = torch.Generator().manual_seed(seed)
    sub = x[:, torch.randperm(M, generator=g)[: min(M, sample)]]
    C = spherical_kmeans(sub.reshape(1, -1, d), codes, iters=5, seed=seed)[0]
    a = (torch.nn.functional.normalize(sub, dim=-1) @ C.T).abs().argmax(-1)  # (L, m)
    hist = torch.zeros(L, codes).scatter_add_(1, a, torch.ones_like(a, dtype=torch.float32))
    hist = hist / hist.sum(1, keepdim=True)
    jsd = [_jsd(hist[i], hist[i + 1]) for i in range(L - 1)]
    cuts = _best_cuts(jsd, math.ceil(L / group), 2 * group - 1)
    ids, gid = [], 0
    for layer in range(L):
        ids.append(gid)
        if layer in cuts:
            gid += 1
    return ids, jsd


def _best_cuts(jsd: list[float], n_groups: int, longest: int) -> list[int]:
    """Cut positions (a cut after layer i) splitting len(jsd)+1 layers into exactly ``n_groups`` contiguous groups
    of at most ``longest`` layers, maximising the summed divergence across the cuts (dynamic programme)."""
    L = len(jsd) + 1
    # best[k][j]: best score with the first j layers split into k groups; arg for backtracking
    best = [[-math.inf] * (L + 1) for _ in range(n_groups + 1)]
    arg = [[0] * (L + 1) for _ in range(n_groups + 1)]
    best[0][0] = 0.0
    for k in range(1, n_groups + 1):
        for j in range(1, L + 1):
            for i in range(max(0, j - longest), j):  # last group = layers i..j-1
                if best[k - 1][i] == -math.inf:
                    continue
                sc = best[k - 1][i] + (jsd[i - 1] if i > 0 else 0.0)
                if sc > best[k][j]:
                    best[k][j], arg[k][j] = sc, i
    cuts, j = [], L
    for k in range(n_groups, 0, -1):
        i = arg[k][j]
        if i > 0:
            cuts.append(i - 1)
        j = i
    return sorted(cuts)


def _pool(x: torch.Tensor, layers: list[int], m: int, g: torch.Generator) -> torch.Tensor:
    """m vectors from the pooled layers (all of them shuffled, repeated when the pool is smaller)."""
    pool = x[layers].reshape(-1, x.shape[-1])
    pick = torch.randperm(len(pool), generator=g)
    if len(pool) < m:
        pick = pick.repeat(-(-m // len(pool)))
    return pool[pick[:m]]


@dataclass
class CSRDictionaries:
    """Per-kind atoms of shape (n_groups, s_n, N, dc); layer l uses group ``groups[kind][l]``."""

    keys: torch.Tensor
    values: torch.Tensor
    cfg_keys: DictConfig
    cfg_values: DictConfig
    fingerprint: str
    pre_rope: bool = True
    groups: dict[str, list[int]] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)  # version, command, n_layers, head_dim, curves, jsd

    def group_of(self, kind: str, layer: int) -> int:
        g = self.groups.get(kind)
        if g:
            return g[layer]
        cfg = self.cfg_keys if kind == "keys" else self.cfg_values
        return layer // cfg.group

    def for_layer(self, kind: str, layer: int) -> torch.Tensor:
        return getattr(self, kind)[self.group_of(kind, layer)]

    def save(self, path) -> None:
        meta = {"cfg_keys": json.dumps(asdict(self.cfg_keys)), "cfg_values": json.dumps(asdict(self.cfg_values)),
                "fingerprint": self.fingerprint, "pre_rope": json.dumps(self.pre_rope),
                "groups": json.dumps(self.groups), **{k: json.dumps(v) for k, v in self.meta.items()}}
        with atomic_path(path) as tmp:
            save_file({"keys": self.keys.contiguous(), "values": self.values.contiguous()}, str(tmp), metadata=meta)

    @classmethod
    def load(cls, path, fingerprint: str | None = None, n_layers: int | None = None, head_dim: int | None = None,
             version: str | None = None) -> CSRDictionaries:
        """Read a dictionary file and refuse it, with one clear line, when it is corrupt, learned for another model
        or layer shape, or computed by another code version (stale)."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            t = load_file(str(path))
            base = ("cfg_keys", "cfg_values", "fingerprint", "pre_rope")
            if any(k not in meta for k in base) or set(t) != {"keys", "values"}:
                raise ValueError("not a CSR dictionary file (metadata or tensors missing)")
            extra = {k: json.loads(v) for k, v in meta.items() if k not in (*base, "groups")}
            d = cls(t["keys"], t["values"], DictConfig(**json.loads(meta["cfg_keys"])),
                    DictConfig(**json.loads(meta["cfg_values"])), meta["fingerprint"], json.loads(meta["pre_rope"]),
                    json.loads(meta.get("groups", "{}")), extra)
        except (SafetensorError, OSError, ValueError, TypeError, KeyError) as e:
            raise UserError(f"dictionary file {path} is corrupt or not a CSR dictionary ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:120]}); delete it and re-run calibration") from None
        if fingerprint is not None and d.fingerprint != fingerprint:
            raise UserError(f"dictionaries at {path} were learned for model {d.fingerprint}, not {fingerprint};"
                            " re-run calibration (delete the file)")
        for kind in ("keys", "values"):
            T = getattr(d, kind)
            n_groups, s_n, _, dc = T.shape
            ids = d.groups.get(kind) or []
            if head_dim is not None and s_n * dc != head_dim:
                raise UserError(f"dictionaries at {path} code {kind} of dimension {s_n * dc}, the model's head "
                                f"dimension is {head_dim}: they belong to another model or layer shape")
            if n_layers is not None and (len(ids) != n_layers if ids else
                                         n_groups != -(-n_layers // getattr(d, f"cfg_{kind}").group)):
                raise UserError(f"dictionaries at {path} cover {len(ids) or n_groups} layers/groups of {kind}, the "
                                f"model has {n_layers} layers: they belong to another model or layer shape")
        if version is not None and d.meta.get("version") != version:
            raise UserError(f"dictionaries at {path} were computed by another version of the dictionary code "
                            f"({d.meta.get('version')} != {version}): stale, not used; delete it and re-run")
        return d


def learn_dictionaries(kv: dict[str, torch.Tensor], cfg_keys: DictConfig, cfg_values: DictConfig,
                       fingerprint: str, pre_rope: bool = True, kv_val: dict[str, torch.Tensor] | None = None,
                       log=None) -> tuple[CSRDictionaries, dict]:
    """kv["keys"/"values"]: (L, M, d) calibration vectors per layer (heads folded into M); ``kv_val`` the same
    shape for held-out vectors. Trains every group and chunk of one kind in one batched problem.
    Returns the dictionaries and {kind: {"curve", "groups", "jsd"}}."""
    out, info, groups = {}, {}, {}
    for kind, cfg in (("keys", cfg_keys), ("values", cfg_values)):
        x = kv[kind]
        L, M, d = x.shape
        cfg.check(d)
        ids, jsd = layer_groups(x, cfg.group, seed=cfg.seed)
        n_groups = max(ids) + 1
        g = torch.Generator().manual_seed(cfg.seed)
        X, V = [], []
        for gi in range(n_groups):
            layers = [li for li in range(L) if ids[li] == gi]
            X.append(chunk(_pool(x, layers, M * cfg.group, g), cfg.s_n))
            if kv_val is not None:
                v = kv_val[kind]
                V.append(chunk(_pool(v, layers, min(v.shape[1] * len(layers), 4096), g), cfg.s_n))
        if log:
            log(f"{kind}: {n_groups} groups {ids}, N={cfg.n_atoms}, s={cfg.s} x s_n={cfg.s_n}")
        n_val = min(v.shape[1] for v in V) if V else 0
        D, curve = train_dictionary(torch.cat(X), cfg, torch.cat([v[:, :n_val] for v in V]) if V else None, log)
        out[kind] = D.reshape(n_groups, cfg.s_n, cfg.n_atoms, d // cfg.s_n)
        groups[kind] = ids
        info[kind] = {"curve": curve, "groups": ids, "jsd": jsd}
    return CSRDictionaries(out["keys"], out["values"], cfg_keys, cfg_values, fingerprint, pre_rope, groups), info
