"""NeuralDict: dictionaries learned by gradient descent through the sparse (MP) reconstruction.

Atoms start from spherical k-means, stay unit-norm (re-projected after every step), and a coherence penalty
‖I − D Dᵀ‖² spreads them so MP's greedy picks do not waste atoms on near-duplicates. One dictionary per
(layer group, channel chunk), separately for keys and values.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import torch
from safetensors.torch import load_file, save_file

from edgecloud.atomic import atomic_path
from edgecloud.errors import UserError
from edgecloud.kvcache.csr.coding import matching_pursuit, reconstruct, spherical_kmeans


@dataclass(frozen=True)
class DictConfig:
    n_atoms: int = 1024  # dictionary size N (indices are int16, so N <= 32767)
    s: int = 4  # atoms per chunk used in training (the coder's sparsity)
    s_n: int = 1  # channel chunks per vector
    group: int = 1  # adjacent layers sharing one dictionary
    steps: int = 200  # NeuralDict Adam steps (0 = k-means dictionary only)
    lr: float = 2e-3
    batch: int = 2048
    coherence: float = 0.05  # weight of ‖I − DDᵀ‖²/N²
    kmeans_iters: int = 15
    seed: int = 0

    def check(self, head_dim: int) -> None:
        if not 1 <= self.n_atoms <= 32767:
            raise UserError(f"n_atoms={self.n_atoms}: must be in 1..32767 (indices are int16); lower --atoms")
        if head_dim % self.s_n:
            raise UserError(f"s_n={self.s_n} must divide the head dimension {head_dim}; use 1, 2 or 4")
        if self.s < 1 or self.group < 1:
            raise UserError("s and group must be >= 1")


def chunk(x: torch.Tensor, s_n: int) -> torch.Tensor:
    """(M, d) -> (s_n, M, d/s_n): each contiguous channel chunk is its own coding problem."""
    M, d = x.shape
    return x.reshape(M, s_n, d // s_n).transpose(0, 1)


def train_dictionary(x: torch.Tensor, cfg: DictConfig) -> tuple[torch.Tensor, list[float]]:
    """Learn (K, N, dc) atoms for K stacked problems x (K, M, dc). Returns atoms and the loss curve.

    The loss is the relative MP reconstruction error (scale-free, so keys and values share one learning rate)
    plus the coherence penalty; the k-means atoms are the starting point, so steps=0 gives the k-means baseline.
    """
    torch.manual_seed(cfg.seed)
    D = spherical_kmeans(x, cfg.n_atoms, iters=cfg.kmeans_iters, seed=cfg.seed)
    if cfg.steps == 0:
        return D, []
    D = torch.nn.Parameter(D.clone())
    opt = torch.optim.Adam([D], lr=cfg.lr)
    g = torch.Generator().manual_seed(cfg.seed)
    K, M, _ = x.shape
    eye = torch.eye(cfg.n_atoms)
    losses = []
    for _ in range(cfg.steps):
        b = x[:, torch.randint(0, M, (min(cfg.batch, M),), generator=g)]
        Dn = torch.nn.functional.normalize(D, dim=-1)
        idx, coef = matching_pursuit(b, Dn, cfg.s)
        err = (reconstruct(Dn, idx, coef) - b).pow(2).sum(-1).mean() / b.pow(2).sum(-1).mean()
        coh = (eye - Dn @ Dn.transpose(-1, -2)).pow(2).mean()
        loss = err + cfg.coherence * coh
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            D.copy_(torch.nn.functional.normalize(D, dim=-1))
        losses.append(float(err.detach()))
    return D.detach(), losses


@dataclass
class CSRDictionaries:
    """Per-kind atoms of shape (n_groups, s_n, N, dc); layer l uses group l // cfg.group."""

    keys: torch.Tensor
    values: torch.Tensor
    cfg_keys: DictConfig
    cfg_values: DictConfig
    fingerprint: str
    pre_rope: bool = True

    def for_layer(self, kind: str, layer: int) -> torch.Tensor:
        cfg = self.cfg_keys if kind == "keys" else self.cfg_values
        return getattr(self, kind)[layer // cfg.group]

    def save(self, path) -> None:
        meta = {"cfg_keys": json.dumps(asdict(self.cfg_keys)), "cfg_values": json.dumps(asdict(self.cfg_values)),
                "fingerprint": self.fingerprint, "pre_rope": json.dumps(self.pre_rope)}
        with atomic_path(path) as tmp:
            save_file({"keys": self.keys.contiguous(), "values": self.values.contiguous()}, str(tmp), metadata=meta)

    @classmethod
    def load(cls, path, fingerprint: str | None = None) -> CSRDictionaries:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        if fingerprint is not None and meta["fingerprint"] != fingerprint:
            raise UserError(f"dictionaries at {path} were learned for model {meta['fingerprint']}, not {fingerprint};"
                            " re-run calibration (delete the file)")
        t = load_file(str(path))
        return cls(t["keys"], t["values"], DictConfig(**json.loads(meta["cfg_keys"])),
                   DictConfig(**json.loads(meta["cfg_values"])), meta["fingerprint"], json.loads(meta["pre_rope"]))


def learn_dictionaries(kv: dict[str, torch.Tensor], cfg_keys: DictConfig, cfg_values: DictConfig,
                       fingerprint: str, pre_rope: bool = True) -> tuple[CSRDictionaries, dict]:
    """kv["keys"/"values"]: (L, M, d) calibration vectors per layer (heads folded into M). Trains every group and
    chunk of one kind in one batched problem."""
    out, curves = {}, {}
    for kind, cfg in (("keys", cfg_keys), ("values", cfg_values)):
        x = kv[kind]
        L, M, d = x.shape
        cfg.check(d)
        n_groups = -(-L // cfg.group)
        xs = []
        for gi in range(n_groups):  # a group's layers pool their vectors (equal counts: pad by repeating layers)
            layers = [min(gi * cfg.group + j, L - 1) for j in range(cfg.group)]
            xs.append(chunk(x[layers].reshape(-1, d), cfg.s_n))
        X = torch.cat(xs)  # (n_groups * s_n, M', dc)
        D, curve = train_dictionary(X, cfg)
        out[kind] = D.reshape(n_groups, cfg.s_n, cfg.n_atoms, d // cfg.s_n)
        curves[kind] = curve
    return CSRDictionaries(out["keys"], out["values"], cfg_keys, cfg_values, fingerprint, pre_rope), curves
