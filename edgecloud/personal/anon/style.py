"""The shared style space: MiniLM sentence embeddings of a user's own past messages, all of them.

The LM-feature space (:func:`.features.reply_features`) summarizes a user by the ``n_train`` replies the cloud also
trains on (24 per user): too few to place a user. A device holds its whole history, though, and fitting its
distribution needs no LM training: it embeds up to ``history`` of its training-period replies with the shared
``edgecloud.llm.retrieval.Dense`` encoder (all-MiniLM-L6-v2, 384-d, unit norm) and averages them in the public
basis. Every user lives in the same space, so the cloud learns *one* projection from style to prefix that
generalizes across users, instead of memorizing one free vector per identifier.

Embeddings are computed once per data configuration and history size and cached (safetensors) under the cache.
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import torch

ENCODER = "all-MiniLM-L6-v2"
CACHE_VERSION = "anon-style-1"


def history(cfg, chosen: list[str], by: dict, n: int) -> tuple[list[str], np.ndarray]:
    """(texts, user index) of up to ``n`` training-period replies per selected user, evenly spaced in time (never
    the held-out period)."""
    from edgecloud.personal.anon.data import evenly, split_user

    texts, users = [], []
    for u, s in enumerate(chosen):
        tr, _ = split_user(by[s], cfg, f"sender {u}")
        picked = evenly(tr, n)
        texts += [e.reply for e in picked]
        users += [u] * len(picked)
    return texts, np.array(users, dtype=np.int64)


def encoder():
    """The shared MiniLM encoder (loaded once per process)."""
    global _ENC
    if _ENC is None:
        from edgecloud.llm.retrieval import Dense

        _ENC = Dense([])
    return _ENC


_ENC = None


def embed(texts: list[str]) -> torch.Tensor:
    """(n, 384) float32 unit-norm sentence embeddings."""
    if not texts:
        return torch.zeros(0, 384)
    return torch.from_numpy(encoder().encode(texts, batch_size=64)).float()


def history_features(cfg, n: int, cache: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, 384), user index (N,)) of every selected user's history; cached by data config and ``n``."""
    from safetensors.torch import load_file, save_file

    from edgecloud import atomic
    from edgecloud.paths import cache_root
    from edgecloud.personal.anon.data import select_users
    from edgecloud.results import code_key

    key = code_key(asdict(cfg), n, ENCODER, version=CACHE_VERSION)
    path = cache_root() / "anon" / f"style-{key}.safetensors"
    if cache and path.exists():
        t = load_file(str(path))
        return t["feats"], t["users"]
    chosen, by = select_users(cfg)
    texts, users = history(cfg, chosen, by, n)
    feats, users_t = embed(texts), torch.from_numpy(users)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic.atomic_path(path) as tmp:
            save_file({"feats": feats.contiguous(), "users": users_t}, str(tmp))
    return feats, users_t


def candidate_features(ds, cache: bool = True) -> torch.Tensor:
    """(eval examples, candidates, 384) MiniLM embeddings of every held-out example's candidates; cached."""
    from safetensors.torch import load_file, save_file

    from edgecloud import atomic
    from edgecloud.paths import cache_root
    from edgecloud.results import code_key

    key = code_key(asdict(ds.cfg), "candidates", ENCODER, version=CACHE_VERSION)
    path = cache_root() / "anon" / f"style-{key}.safetensors"
    if cache and path.exists():
        return load_file(str(path))["feats"]
    feats = embed([c for cs in ds.candidates for c in cs]).view(len(ds.candidates), -1, 384)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic.atomic_path(path) as tmp:
            save_file({"feats": feats.contiguous()}, str(tmp))
    return feats
