"""Clusters of similar questions per responder: MiniLM sentence embeddings (``edgecloud.llm.retrieval.Dense``) and
k-means, k chosen in [k_min, k_max] by silhouette on the responder's training questions.

QAR contrasts questioners only inside a cluster: answers to *similar* questions should still differ by who asked,
while answers to different questions differ for reasons that have nothing to do with the questioner.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from edgecloud.personal.qar.exchanges import Dataset


def embed(texts: list[str]) -> np.ndarray:
    from edgecloud.llm.retrieval import Dense

    return Dense(list(texts)).emb


def choose_k(x: np.ndarray, k_min: int, k_max: int, seed: int) -> tuple[int, np.ndarray]:
    """(k, fitted centroids) with the best silhouette; k is capped so every cluster can hold two questions."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    hi = max(1, min(k_max, len(x) // 2))
    lo = min(k_min, hi)
    best = None
    for k in range(lo, hi + 1):
        km = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(x)
        s = silhouette_score(x, km.labels_) if 1 < k < len(x) else -1.0
        if best is None or s > best[0]:
            best = (s, k, km.cluster_centers_)
    return best[1], best[2]


def assign(ds: Dataset, k_min: int = 5, k_max: int = 10, seed: int = 0, clustered: bool = True) -> dict:
    """Set ``cluster`` on every exchange (global id: responders' clusters numbered one after another); held-out
    exchanges go to the nearest centroid. ``clustered=False`` puts each responder's exchanges in one cluster (the
    no-clustering ablation). Returns {responder: k}."""
    ks, offset = {}, 0
    emb_tr = embed([e.question for e in ds.train]) if clustered else None
    emb_ho = embed([e.question for e in ds.heldout]) if clustered else None
    new_tr, new_ho = list(ds.train), list(ds.heldout)
    for r in ds.responders:
        tr = [i for i, e in enumerate(ds.train) if e.responder == r]
        ho = [i for i, e in enumerate(ds.heldout) if e.responder == r]
        if clustered:
            k, cent = choose_k(emb_tr[tr], k_min, k_max, seed)
            lab_tr = np.argmax(emb_tr[tr] @ cent.T, 1) if k > 1 else np.zeros(len(tr), int)
            lab_ho = np.argmax(emb_ho[ho] @ cent.T, 1) if k > 1 else np.zeros(len(ho), int)
        else:
            k, lab_tr, lab_ho = 1, np.zeros(len(tr), int), np.zeros(len(ho), int)
        for i, c in zip(tr, lab_tr, strict=True):
            new_tr[i] = replace(ds.train[i], cluster=offset + int(c))
        for i, c in zip(ho, lab_ho, strict=True):
            new_ho[i] = replace(ds.heldout[i], cluster=offset + int(c))
        ks[r] = k
        offset += k
    ds.train, ds.heldout = new_tr, new_ho
    return ks
