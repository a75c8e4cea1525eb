"""The device side: a user-specific distribution over embeddings, fitted on the device, sampled per upload.

Both regimes of the paper's non-identifiability result are options:

* ``gaussian`` (close distributions): a shared low-rank basis (centre, ``r`` principal directions and their scales,
  computed by the cloud from its pool of *anonymous* texts) turns a message into ``r`` coordinates. The device
  averages its own messages' coordinates into a mean, pulls it inside the public ``radius`` and samples
  ``mean + sigma * N(0, I)``: the covariance is ``sigma^2 I`` in the basis, ``sigma`` the privacy knob. Means
  within a radius and a larger ``sigma`` make the users' distributions overlap, which bounds what any attacker can
  attribute.
* ``mixture`` (linearly dependent): ``K`` shared anchors (k-means centres of the same anonymous pool, ``K`` below
  the number of users). A user's distribution is a mixture of the ``K`` anchor Gaussians ``N(a_k, sigma^2 I)``
  with the user's own weights (the share of its messages nearest each anchor, smoothed by ``alpha``), so all user
  distributions lie in a ``K``-dimensional span: linearly dependent, hence not identifiable from uploads.

Files are safetensors with the model and basis fingerprints in the metadata; loading checks both, so a distribution
fitted for another model or basis is refused with one line instead of silently producing garbage embeddings.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edgecloud.errors import UserError

FORMAT = "edgecloud-anon-dist-1"
BASIS_FORMAT = "edgecloud-anon-basis-1"


@dataclass
class Basis:
    """The shared, public coordinate system: ``coords(f) = ((f - centre) @ dirs.T) / scale``; plus anchors."""

    centre: torch.Tensor  # (hidden,)
    dirs: torch.Tensor  # (r, hidden), orthonormal rows
    scale: torch.Tensor  # (r,) std of the pool along each direction
    anchors: torch.Tensor  # (K, r) k-means centres of the pool's coordinates
    model_fingerprint: str

    @property
    def dim(self) -> int:
        return self.dirs.shape[0]

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.model_fingerprint.encode())
        for t in (self.centre, self.dirs, self.scale, self.anchors):
            h.update(t.float().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def coords(self, feats: torch.Tensor) -> torch.Tensor:
        return ((feats.float() - self.centre) @ self.dirs.T) / self.scale

    def save(self, path: str | Path) -> None:
        _save(path, {"centre": self.centre, "dirs": self.dirs, "scale": self.scale, "anchors": self.anchors},
              {"format": BASIS_FORMAT, "model_fingerprint": self.model_fingerprint})

    @classmethod
    def load(cls, path: str | Path, model_fingerprint: str | None = None) -> Basis:
        t, meta = _load(path, BASIS_FORMAT, ("centre", "dirs", "scale", "anchors"))
        b = cls(t["centre"], t["dirs"], t["scale"], t["anchors"], meta.get("model_fingerprint", ""))
        if model_fingerprint is not None and b.model_fingerprint != model_fingerprint:
            raise UserError(f"{path}: basis made for model {b.model_fingerprint}, this cloud runs {model_fingerprint}; "
                            "fetch the basis of this model")
        return b


def fit_basis(pool: torch.Tensor, dim: int, anchors: int, model_fingerprint: str, seed: int = 0) -> Basis:
    """PCA of the anonymous pool of message features (no user labels needed) and k-means anchors in it."""
    from sklearn.cluster import KMeans

    if pool.shape[0] <= max(dim, anchors):
        raise UserError(f"basis: {pool.shape[0]} pooled messages, need more than dim={dim} and anchors={anchors}")
    x = pool.double()
    centre = x.mean(0)
    _, s, vt = torch.linalg.svd(x - centre, full_matrices=False)
    dirs = vt[:dim]
    scale = s[:dim] / np.sqrt(len(x) - 1)
    coords = ((x - centre) @ dirs.T) / scale
    km = KMeans(anchors, n_init=4, random_state=seed).fit(coords.numpy())
    return Basis(centre.float(), dirs.float(), scale.float(), torch.tensor(km.cluster_centers_, dtype=torch.float32),
                 model_fingerprint)


@dataclass
class Distribution:
    """One user's distribution; ``kind`` is "gaussian" (mean, sigma) or "mixture" (weights over anchors, sigma)."""

    kind: str
    mean: torch.Tensor  # gaussian: (r,) ; mixture: (K,) weights
    sigma: float
    basis_fingerprint: str
    model_fingerprint: str

    def sample(self, n: int, basis: Basis, gen: torch.Generator) -> torch.Tensor:
        """``n`` fresh embeddings (n, r), one per upload."""
        noise = torch.randn(n, basis.dim, generator=gen) * self.sigma
        if self.kind == "gaussian":
            return self.mean + noise
        k = torch.multinomial(self.mean, n, replacement=True, generator=gen)
        return basis.anchors[k] + noise

    def save(self, path: str | Path) -> None:
        _save(path, {"mean": self.mean, "sigma": torch.tensor([self.sigma])},
              {"format": FORMAT, "kind": self.kind, "basis_fingerprint": self.basis_fingerprint,
               "model_fingerprint": self.model_fingerprint})

    @classmethod
    def load(cls, path: str | Path, basis: Basis) -> Distribution:
        """Load and check it belongs to ``basis`` (and so to its model)."""
        t, meta = _load(path, FORMAT, ("mean", "sigma"))
        if meta.get("model_fingerprint") != basis.model_fingerprint:
            raise UserError(f"{path}: distribution fitted for model {meta.get('model_fingerprint')}, the basis is for "
                            f"{basis.model_fingerprint}; fit it again with `edgecloud personal anon-fit`")
        if meta.get("basis_fingerprint") != basis.fingerprint():
            raise UserError(f"{path}: distribution fitted in basis {meta.get('basis_fingerprint')}, the cloud's basis "
                            f"is {basis.fingerprint()}; fit it again with `edgecloud personal anon-fit`")
        kind = meta.get("kind")
        want = basis.dim if kind == "gaussian" else len(basis.anchors)
        if kind not in ("gaussian", "mixture") or t["mean"].shape != (want,):
            raise UserError(f"{path}: kind {kind!r} with mean of shape {tuple(t['mean'].shape)} does not fit the "
                            f"basis (gaussian: ({basis.dim},), mixture: ({len(basis.anchors)},))")
        return cls(kind, t["mean"].float(), float(t["sigma"][0]), meta["basis_fingerprint"], meta["model_fingerprint"])


def fit(feats: torch.Tensor, basis: Basis, kind: str = "gaussian", sigma: float = 1.0, radius: float = 1.0,
        alpha: float = 1.0, min_messages: int = 8) -> Distribution:
    """Fit one user's distribution from the features of its own messages (runs on the device)."""
    if kind not in ("gaussian", "mixture"):
        raise UserError(f"kind={kind!r}: choose gaussian (close distributions) or mixture (linearly dependent)")
    if sigma < 0 or radius <= 0 or alpha < 0:
        raise UserError(f"sigma={sigma}, radius={radius}, alpha={alpha}: need sigma >= 0, radius > 0, alpha >= 0")
    if feats.ndim != 2 or feats.shape[0] < min_messages:
        n = feats.shape[0] if feats.ndim == 2 else 0
        raise UserError(f"this user has {n} messages; fitting a distribution needs at least {min_messages}")
    c = basis.coords(feats)
    if kind == "gaussian":
        mean = c.mean(0)
        norm = float(mean.norm())
        if norm > radius:
            mean = mean * (radius / norm)
    else:
        near = torch.cdist(c, basis.anchors).argmin(1)
        counts = torch.bincount(near, minlength=len(basis.anchors)).float()
        mean = (counts + alpha) / (counts.sum() + alpha * len(basis.anchors))
    return Distribution(kind, mean, float(sigma), basis.fingerprint(), basis.model_fingerprint)


def sample_many(dists: list[Distribution], users: torch.Tensor, basis: Basis, gen: torch.Generator) -> torch.Tensor:
    """One fresh embedding per entry of ``users`` (vectorized over users; same law as ``Distribution.sample``)."""
    kind = dists[0].kind
    means = torch.stack([d.mean for d in dists])
    sig = torch.tensor([d.sigma for d in dists])[users, None]
    noise = torch.randn(len(users), basis.dim, generator=gen) * sig
    if kind == "gaussian":
        return means[users] + noise
    k = torch.multinomial(means[users], 1, generator=gen).squeeze(1)
    return basis.anchors[k] + noise


def _save(path, tensors: dict, meta: dict) -> None:
    from safetensors.torch import save_file

    from edgecloud import atomic

    with atomic.atomic_path(path) as tmp:
        save_file({k: v.float().contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)


def _load(path, fmt: str, keys: tuple[str, ...]) -> tuple[dict, dict]:
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: no such file")
    try:
        with safe_open(str(p), "pt") as f:
            meta = f.metadata() or {}
            t = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a damaged header or payload
        raise UserError(f"{p}: not a readable safetensors file ({type(e).__name__}: {str(e)[:100]}); "
                        "it is corrupt or truncated, write it again") from None
    if meta.get("format") != fmt:
        raise UserError(f"{p}: format {meta.get('format')!r}, expected {fmt!r}")
    missing = [k for k in keys if k not in t]
    if missing:
        raise UserError(f"{p}: missing tensor(s) {', '.join(missing)}")
    return t, meta
