"""Q-networks for VM placement: SPANE (PM-permutation equivariant), SPANE-NUMA (also NUMA-swap equivariant) and
the flat MLP baseline. All take ``pm`` (B, N, 4) = [node0 cpu, node0 mem, node1 cpu, node1 mem] / capacity,
``vm`` (B, 3) = [cpu/40, mem/90, is_double] and ``mask`` (B, 2N) bool, and return Q (B, 2N) with -inf on invalid
actions. Action a = 2 * pm + node.

Why equivariance holds exactly: every per-PM (per-node) computation is one shared MLP applied row-wise, the
cluster summary is a symmetric pooling (mean / max / std over PMs), and the dueling baseline is a mean over the
valid actions; permuting the inputs therefore permutes the outputs and nothing else.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from edgecloud.vmsched.agents.config import DQNConfig

NEG_INF = float("-inf")


def mlp(n_in: int, width: int, layers: int, n_out: int) -> nn.Sequential:
    """``layers`` hidden ReLU layers of ``width`` then a linear output (SPANE's ``get_layers``)."""
    mods: list[nn.Module] = []
    d = n_in
    for _ in range(max(layers, 0)):
        mods += [nn.Linear(d, width), nn.ReLU()]
        d = width
    mods.append(nn.Linear(d, n_out))
    return nn.Sequential(*mods)


def init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):  # as the published agent: Kaiming-uniform weights, zero bias
        nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")
        nn.init.zeros_(m.bias)


def pool(h: torch.Tensor, pools: tuple[str, ...], dim: int) -> torch.Tensor:
    """Symmetric pooling over ``dim`` (the PM axis); std is the population std so that N=1 is defined."""
    out = []
    for p in pools:
        if p == "mean":
            out.append(h.mean(dim))
        elif p == "max":
            out.append(h.amax(dim))
        else:
            out.append(h.std(dim, unbiased=False) if h.shape[dim] > 1 else torch.zeros_like(h.mean(dim)))
    return torch.cat(out, dim=-1)


def dueling(value: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, vm: torch.Tensor,
            tie_double: bool) -> torch.Tensor:
    """Q = V + A - mean of A over the valid actions, masked to -inf. With ``tie_double`` a double-NUMA VM's two
    actions on one PM (the same placement) share the mean of their two advantages."""
    B = adv.shape[0]
    if tie_double:
        pair = adv.view(B, -1, 2)
        tied = pair.mean(-1, keepdim=True).expand_as(pair).reshape(B, -1)
        adv = torch.where(vm[:, 2:3] > 0.5, tied, adv)
    m = mask.to(adv.dtype)
    base = (adv * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp_min(1.0)
    q = value + adv - base
    return q.masked_fill(~mask, NEG_INF)


class SpaneQNet(nn.Module):
    """SPANE: shared per-PM encoder, pooled cluster embedding, value head on [cluster, vm], shared per-PM
    advantage head on [PM embedding, cluster, vm] with 2 outputs (one per NUMA node). Works for any N."""

    fixed_n: int | None = None
    adv_embeddings = 1  # embeddings the advantage head reads besides [cluster, vm]: the PM's
    adv_outputs = 2  # one value per NUMA node

    def __init__(self, cfg: DQNConfig) -> None:
        super().__init__()
        self.pools, self.tie_double = tuple(cfg.pools), cfg.tie_double
        w, c = cfg.enc_width, cfg.enc_width * len(cfg.pools)
        self.enc = mlp(4, w, cfg.enc_layers, w)
        self.value = mlp(c + 3, cfg.value_width, cfg.value_layers, 1)
        self.adv = mlp(self.adv_embeddings * w + c + 3, cfg.adv_width, cfg.adv_layers, self.adv_outputs)
        self.apply(init_weights)

    def forward(self, pm: torch.Tensor, vm: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, N, _ = pm.shape
        h = self.enc(pm)  # (B, N, w)
        c = pool(h, self.pools, 1)  # (B, c)
        value = self.value(torch.cat([c, vm], -1))  # (B, 1)
        ctx = torch.cat([c, vm], -1).unsqueeze(1).expand(B, N, -1)
        adv = self.adv(torch.cat([h, ctx], -1)).reshape(B, 2 * N)
        return dueling(value, adv, mask, vm, self.tie_double)


class SpaneNumaQNet(SpaneQNet):
    """SPANE with the second symmetry built in: swapping the two NUMA nodes of any PM swaps that PM's two
    Q values. Each node is encoded from (itself, its sibling) by one shared MLP; a PM embedding is the mean of
    its two node embeddings (swap-invariant); the advantage of a node reads [node, PM, cluster, vm] and emits one
    value. The group is S_2 wr S_N (N! * 2^N elements) instead of S_N."""

    adv_embeddings = 2  # the node's and its PM's
    adv_outputs = 1  # one value per node

    def forward(self, pm: torch.Tensor, vm: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, N, _ = pm.shape
        node = pm.view(B, N, 2, 2)
        pair = torch.cat([node, node.flip(2)], -1)  # (B, N, 2, 4): [self cpu, self mem, sibling cpu, mem]
        e = self.enc(pair)  # (B, N, 2, w)
        h = e.mean(2)  # (B, N, w), invariant to the swap
        c = pool(h, self.pools, 1)
        value = self.value(torch.cat([c, vm], -1))
        ctx = torch.cat([c, vm], -1)[:, None, None, :].expand(B, N, 2, -1)
        adv = self.adv(torch.cat([e, h.unsqueeze(2).expand(B, N, 2, -1), ctx], -1)).reshape(B, 2 * N)
        return dueling(value, adv, mask, vm, self.tie_double)


class MLPQNet(nn.Module):
    """MLPDQN: a flat MLP over all PMs' features and the VM (not symmetric; fixed N), dueling heads."""

    def __init__(self, cfg: DQNConfig) -> None:
        super().__init__()
        self.fixed_n, self.tie_double = cfg.n_pms, cfg.tie_double
        n_in = 4 * cfg.n_pms + 3
        self.trunk = mlp(n_in, cfg.mlp_width, cfg.mlp_layers - 1, cfg.mlp_width) if cfg.mlp_layers > 0 else None
        d = cfg.mlp_width if self.trunk is not None else n_in
        self.value = nn.Linear(d, 1)
        self.adv = nn.Linear(d, 2 * cfg.n_pms)
        self.apply(init_weights)

    def forward(self, pm: torch.Tensor, vm: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, N, _ = pm.shape
        if N != self.fixed_n:
            raise ValueError(f"this MLP Q-network was built for N={self.fixed_n} PMs, got N={N}")
        x = torch.cat([pm.reshape(B, 4 * N), vm], -1)
        if self.trunk is not None:
            x = torch.relu(self.trunk(x))
        return dueling(self.value(x), self.adv(x), mask, vm, self.tie_double)


class EnsembleQNet(nn.Module):
    """The mean Q over several networks of one config (e.g. a run's best validated checkpoints). Averaging keeps
    every symmetry the members have, and it evens out the checkpoint-to-checkpoint swings of DQN's greedy policy.
    Invalid actions stay -inf (every member masks the same actions)."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.fixed_n = getattr(members[0], "fixed_n", None)

    def forward(self, pm: torch.Tensor, vm: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(pm, vm, mask) for m in self.members]).mean(0)


def build_qnet(cfg: DQNConfig, members: int = 1) -> nn.Module:
    if members > 1:
        return EnsembleQNet([build_qnet(cfg) for _ in range(members)])
    if cfg.agent == "spane":
        return SpaneQNet(cfg)
    if cfg.agent == "spane-numa":
        return SpaneNumaQNet(cfg)
    return MLPQNet(cfg)  # mlpdqn, mlpaug
