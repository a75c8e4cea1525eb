"""A side's document store: its passages, their MiniLM embeddings (safetensors) and a BM25 index.

Retrieval takes the union of the BM25 and dense top-k as candidates and ranks them by MiniLM cosine: the cosine is
what sets the REPLUG weights, because it is comparable across the two sides (same embedding model), while BM25's
idf depends on each side's own store. A store whose files do not match (wrong fingerprint, bad shapes, unreadable)
is a UserError naming the file and the fix (delete it; it is rebuilt).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edgecloud.atomic import write_text
from edgecloud.errors import UserError
from edgecloud.llm.retrieval import BM25, Dense
from edgecloud.rag.corpus import Passage

_DENSE: dict = {}


def dense_model():
    """One MiniLM per process (loading it costs seconds)."""
    if "m" not in _DENSE:
        _DENSE["m"] = Dense([])
    return _DENSE["m"]


def fingerprint(ps) -> str:
    h = hashlib.sha256()
    for p in ps:
        h.update(p.id.encode() + b"\0" + p.text.encode() + b"\0")
    return h.hexdigest()[:16]


@dataclass
class Store:
    name: str
    passages: tuple[Passage, ...]
    emb: np.ndarray  # (n, 384) unit rows

    def __post_init__(self):
        self.bm25 = BM25([p.text for p in self.passages])

    def retrieve(self, query: str, k: int) -> tuple[list[Passage], np.ndarray]:
        if not self.passages or k <= 0:
            return [], np.zeros(0)
        q = dense_model().encode([query])[0]
        cos = self.emb @ q
        cand = set(self.bm25.top(query, k)) | {int(i) for i in np.argsort(-cos, kind="stable")[:k]}
        best = sorted(cand, key=lambda i: (-cos[i], i))[:k]
        return [self.passages[i] for i in best], cos[best].astype(np.float64)


def store_dir() -> Path:
    return Path(os.environ.get("EDGECLOUD_CACHE", Path.home() / ".cache" / "edgecloud")) / "rag"


def load_or_build(name: str, passages: tuple[Passage, ...], root: Path | None = None) -> Store:
    """Load ``<root>/<name>-<fingerprint>.{json,safetensors}``, building (and atomically saving) it when absent."""
    from safetensors.torch import load_file, save_file

    root = root or store_dir()
    fp = fingerprint(passages)
    js, st = root / f"{name}-{fp}.json", root / f"{name}-{fp}.safetensors"
    if js.exists() and st.exists():
        try:
            meta = json.loads(js.read_text())
            emb = load_file(str(st))["emb"].numpy()
            ok = meta.get("fingerprint") == fp and emb.shape == (len(passages), 384)
            ok = ok and fingerprint(Passage(*p) for p in meta["passages"]) == fp
        except Exception as e:  # noqa: BLE001 - any unreadable store is the same user-facing problem
            raise UserError(f"document store {st} is corrupt ({type(e).__name__}: {e}); delete {js.name} and "
                            f"{st.name} to rebuild it") from None
        if not ok:
            raise UserError(f"document store {st} does not match its passages (fingerprint or shape); delete "
                            f"{js.name} and {st.name} to rebuild it")
        return Store(name, passages, emb)
    emb = dense_model().encode([p.text for p in passages]) if passages else np.zeros((0, 384), np.float32)
    root.mkdir(parents=True, exist_ok=True)
    tmp = st.with_suffix(".tmp")
    save_file({"emb": torch.from_numpy(np.ascontiguousarray(emb, dtype=np.float32))}, str(tmp))
    os.replace(tmp, st)
    write_text(js, json.dumps({"fingerprint": fp, "passages": [[p.id, p.title, p.text] for p in passages]}))
    return Store(name, passages, emb.astype(np.float32))
