"""Questioner-contrastive learning inside question clusters, with a prototype memory bank (QAR's specific loss).

For a training exchange in cluster c asked by pair p, the specific tower's pooled reply state goes through the two
projection heads of cluster c (two views). The memory bank keeps, per (cluster, pair), the last ``slots`` projected
states of each view (detached); a prototype is their mean. View 1 is classified against the view-2 prototypes of
its cluster (and view 2 against view 1) by cosine / temperature with cross-entropy, the true pair as the label.
Only prototypes of the same cluster compete — answers to similar questions must differ by who asked — and an
empty prototype (a pair never seen in that cluster) is not a candidate. An exchange whose own prototype is still
empty, or whose cluster has fewer than two candidates, adds nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class MemoryBank:
    def __init__(self, n_clusters: int, n_pairs: int, dim: int, slots: int = 8):
        self.slots = slots
        self.bank = torch.zeros(2, n_clusters, n_pairs, slots, dim)
        self.count = torch.zeros(n_clusters, n_pairs, dtype=torch.long)  # writes so far (ring pointer = count % slots)

    def prototypes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(2, clusters, pairs, dim) mean of the filled slots, and (clusters, pairs) bool: has at least one."""
        filled = self.count.clamp(max=self.slots)
        mean = self.bank.sum(3) / filled.clamp(min=1).unsqueeze(-1).to(self.bank.dtype)
        return mean, filled > 0

    @torch.no_grad()
    def update(self, z1: torch.Tensor, z2: torch.Tensor, cluster: torch.Tensor, pair: torch.Tensor) -> None:
        for i in range(len(cluster)):
            c, p = int(cluster[i]), int(pair[i])
            slot = int(self.count[c, p]) % self.slots
            self.bank[0, c, p, slot] = z1[i].detach()
            self.bank[1, c, p, slot] = z2[i].detach()
            self.count[c, p] += 1

    def state(self) -> dict[str, torch.Tensor]:
        return {"bank": self.bank, "count": self.count}

    def load(self, st: dict[str, torch.Tensor]) -> None:
        self.bank, self.count = st["bank"].clone(), st["count"].clone()


def project(pooled: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, cluster: torch.Tensor):
    """Each row through its own cluster's two heads: (B, h) x (C, h, d)[cluster] -> two (B, d)."""
    return torch.einsum("bh,bhd->bd", pooled, w1[cluster]), torch.einsum("bh,bhd->bd", pooled, w2[cluster])


def contrastive_loss(z1: torch.Tensor, z2: torch.Tensor, cluster: torch.Tensor, pair: torch.Tensor,
                     protos: torch.Tensor, valid: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Mean over usable rows of (CE(view1 vs view-2 prototypes) + CE(view2 vs view-1 prototypes)) / 2, candidates
    restricted to the row's cluster and to non-empty prototypes. Vectorized; 0 when no row is usable."""
    cand = valid[cluster]  # (B, P)
    use = cand[torch.arange(len(pair)), pair] & (cand.sum(1) >= 2)
    if not bool(use.any()):
        return z1.sum() * 0.0
    p1 = F.normalize(protos[0][cluster], dim=-1)  # (B, P, d)
    p2 = F.normalize(protos[1][cluster], dim=-1)
    l1 = torch.einsum("bd,bpd->bp", F.normalize(z1, dim=-1), p2) / temperature
    l2 = torch.einsum("bd,bpd->bp", F.normalize(z2, dim=-1), p1) / temperature
    l1 = l1.masked_fill(~cand, float("-inf"))
    l2 = l2.masked_fill(~cand, float("-inf"))
    ce = (F.cross_entropy(l1[use], pair[use], reduction="none") + F.cross_entropy(l2[use], pair[use], reduction="none"))
    return ce.mean() / 2
