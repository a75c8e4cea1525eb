"""Batched sparse coders in torch: Matching Pursuit (CSR's coder) and Orthogonal MP (Lexico's), plus k-means.

Shapes: signals ``x`` are (K, M, d) and dictionaries ``D`` are (K, N, d) with unit-norm rows (atoms): K independent
problems (channel chunks, layer groups) each coding M vectors. Every pursuit step is one batched matmul over all
vectors; vectors are processed in chunks of ``chunk`` so the (K, M, N) correlation matrix stays bounded at
N = 16,384 atoms (no Python loop over single vectors).

``quant`` (optional) rounds each weight to its stored precision *inside* the pursuit, so the residual (and every
later pick) sees the weight that will actually be stored: the rounding error of one step is corrected by the next.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Quant = Callable[[torch.Tensor], torch.Tensor] | None


def _atoms(D: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows of ``D`` (K, N, d) picked by ``idx`` (K, M, ...) -> (K, M, ..., d)."""
    K, M = idx.shape[:2]
    flat = idx.reshape(K, -1, 1).long()
    return torch.take_along_dim(D, flat, dim=1).reshape(*idx.shape, D.shape[-1])


def _chunked(fn):
    """Run a coder over slices of M (no grad needed there) so the (K, M, N) correlations fit in memory."""

    def run(x: torch.Tensor, D: torch.Tensor, s: int, quant: Quant = None, chunk: int = 2048, **kw):
        if x.requires_grad or D.requires_grad or x.shape[1] <= chunk:
            return fn(x, D, s, quant, **kw)
        parts = [fn(x[:, i:i + chunk], D, s, quant, **kw) for i in range(0, x.shape[1], chunk)]
        return torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1)

    run.__doc__ = fn.__doc__
    run.__name__ = fn.__name__.lstrip("_")
    return run


@_chunked
def _matching_pursuit(x: torch.Tensor, D: torch.Tensor, s: int, quant: Quant = None) -> tuple[torch.Tensor,
                                                                                                torch.Tensor]:
    """Greedy MP: s times pick the atom most correlated with the residual and subtract its projection.

    Differentiable in ``D`` and ``x`` through the weights (the argmax is not), which is what NeuralDict trains through.
    Returns (idx (K, M, s) long, coef (K, M, s)).
    """
    r = x
    Dt = D.transpose(-1, -2)
    idx, coef = [], []
    for _ in range(s):
        corr = r @ Dt  # (K, M, N)
        i = corr.abs().argmax(-1, keepdim=True)
        c = corr.gather(-1, i)
        if quant is not None:
            c = quant(c)
        r = r - c * _atoms(D, i).squeeze(-2)
        idx.append(i)
        coef.append(c)
    return torch.cat(idx, -1), torch.cat(coef, -1)


@_chunked
def _orthogonal_matching_pursuit(x: torch.Tensor, D: torch.Tensor, s: int, quant: Quant = None,
                                 ridge: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched OMP: MP's selection, but weights re-fit by least squares on the whole support at every step
    (rounded to the stored precision after the final fit)."""
    r = x
    idx = torch.empty(*x.shape[:2], 0, dtype=torch.long, device=x.device)
    coef = x.new_zeros(*x.shape[:2], 0)
    Dt = D.transpose(-1, -2)
    for t in range(s):
        corr = r @ Dt
        if t:  # never re-pick an atom already in the support (its residual correlation is ~0 anyway)
            corr = corr.scatter(-1, idx, 0.0)
        idx = torch.cat([idx, corr.abs().argmax(-1, keepdim=True)], -1)
        A = _atoms(D, idx)  # (K, M, t+1, d)
        gram = A @ A.transpose(-1, -2) + ridge * torch.eye(t + 1, dtype=x.dtype, device=x.device)
        coef = torch.linalg.solve(gram, (A @ x.unsqueeze(-1))).squeeze(-1)
        r = x - (coef.unsqueeze(-1) * A).sum(-2)
    return idx, (coef if quant is None else quant(coef))


matching_pursuit = _matching_pursuit
orthogonal_matching_pursuit = _orthogonal_matching_pursuit


def reconstruct(D: torch.Tensor, idx: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """x̂ = Σ coef · D[idx]: (K, M, s) codes -> (K, M, d)."""
    return (coef.unsqueeze(-1).to(D.dtype) * _atoms(D, idx)).sum(-2)


CODERS = {"mp": matching_pursuit, "omp": orthogonal_matching_pursuit}


def spherical_kmeans(x: torch.Tensor, n_atoms: int, iters: int = 20, seed: int = 0,
                     chunk: int = 8192) -> torch.Tensor:
    """k-means on directions (cosine, sign-invariant since MP uses |correlation|): (K, M, d) -> (K, N, d) unit rows.

    Why spherical: MP scores atoms by |<r, atom>| with unit atoms, so directions, not magnitudes, are what to cluster.
    Empty clusters are re-seeded from random data points. Assignment runs over ``chunk`` vectors at a time.
    """
    K, M, d = x.shape
    g = torch.Generator(device="cpu").manual_seed(seed)
    u = torch.nn.functional.normalize(x, dim=-1)
    pick = torch.stack([torch.randperm(M, generator=g)[:n_atoms] for _ in range(K)])
    if M < n_atoms:
        pick = torch.randint(0, M, (K, n_atoms), generator=g)
    D = torch.take_along_dim(u, pick.unsqueeze(-1), dim=1)
    for _ in range(iters):
        sums = torch.zeros_like(D)
        counts = torch.zeros(K, n_atoms, dtype=x.dtype)
        for i in range(0, M, chunk):
            ui = u[:, i:i + chunk]
            corr = ui @ D.transpose(-1, -2)
            a = corr.abs().argmax(-1)  # (K, m)
            sign = corr.gather(-1, a.unsqueeze(-1)).sign()
            sums.scatter_add_(1, a.unsqueeze(-1).expand(-1, -1, d), ui * sign)
            counts.scatter_add_(1, a, torch.ones_like(a, dtype=x.dtype))
        reseed = torch.take_along_dim(u, torch.randint(0, M, (K, n_atoms, 1), generator=g), dim=1)
        D = torch.where(counts.unsqueeze(-1) > 0, torch.nn.functional.normalize(sums, dim=-1), reseed)
    return D


def _fp8(c: torch.Tensor) -> torch.Tensor:
    return c.clamp(-448.0, 448.0).to(torch.float8_e4m3fn).to(c.dtype)


def _fp16(c: torch.Tensor) -> torch.Tensor:
    return c.half().to(c.dtype)


# stored weight precision -> (rounding inside the pursuit, storage dtype)
QUANTS = {"fp16": _fp16, "fp8": _fp8}
STORE = {"fp16": torch.float16, "fp8": torch.float8_e4m3fn}
