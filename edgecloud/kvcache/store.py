"""Two-tier chunk KV store: an LRU memory tier with a byte budget over a disk tier of safetensors files.

One file per chunk, named by the entry key = sha256(model fingerprint, chunk kind, chunk content). A file carries the
model fingerprint, its key and a sha256 of its tensor bytes in the safetensors metadata; a read that fails any check
(truncated file, flipped byte, other model, other key) deletes the file and reports a miss, so the caller recomputes
and never uses a wrong cache. Writes are atomic (temp file + rename); a failed write (disk full) is logged and skipped.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from pathlib import Path

import torch

from edgecloud.atomic import atomic_path

log = logging.getLogger(__name__)
FORMAT = "edgecloud-kv-1"


def chunk_key(model_fp: str, ids=None, embeds: torch.Tensor | None = None) -> str:
    """Content key of a chunk for one model: token ids or input embeddings (exact bytes)."""
    h = hashlib.sha256(model_fp.encode())
    if embeds is not None:
        e = embeds.detach().float().contiguous().cpu()
        h.update(b"embeds" + str(tuple(e.shape)).encode() + e.numpy().tobytes())
    else:
        h.update(b"ids" + torch.as_tensor(list(ids), dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()


def _digest(k: torch.Tensor, v: torch.Tensor) -> str:
    h = hashlib.sha256()
    h.update(k.contiguous().numpy().tobytes())
    h.update(v.contiguous().numpy().tobytes())
    return h.hexdigest()


class KVStore:
    """``get(key) -> (K, V) | None`` and ``put(key, K, V)``; thread-safe (loads run in a pool)."""

    def __init__(self, root: str | Path | None, model_fp: str, mem_bytes: int = 256 << 20):
        self.root = Path(root) / model_fp if root is not None else None
        self.model_fp = model_fp
        self.mem_bytes = mem_bytes
        self._mem: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._used = 0
        self._lock = threading.Lock()
        self.stats = {"mem_hits": 0, "disk_hits": 0, "misses": 0, "corrupt": 0, "write_errors": 0, "evictions": 0}

    def path(self, key: str) -> Path | None:
        return self.root / f"{key}.safetensors" if self.root is not None else None

    def _bump(self, name: str) -> None:
        with self._lock:
            self.stats[name] += 1

    def _remember(self, key: str, k: torch.Tensor, v: torch.Tensor) -> None:
        size = k.nbytes + v.nbytes
        if size > self.mem_bytes:
            return
        with self._lock:
            if key in self._mem:
                self._mem.move_to_end(key)
                return
            self._mem[key] = (k, v)
            self._used += size
            while self._used > self.mem_bytes:
                _, (ok, ov) = self._mem.popitem(last=False)
                self._used -= ok.nbytes + ov.nbytes
                self.stats["evictions"] += 1

    def get(self, key: str, memory: bool = True) -> tuple[torch.Tensor, torch.Tensor] | None:
        if memory:
            with self._lock:
                hit = self._mem.get(key)
                if hit is not None:
                    self._mem.move_to_end(key)
                    self.stats["mem_hits"] += 1
                    return hit
        p = self.path(key)
        if p is None or not p.exists():
            self._bump("misses")
            return None
        kv = self._read(p, key)
        if kv is None:
            self._bump("corrupt")
            p.unlink(missing_ok=True)
            return None
        self._bump("disk_hits")
        self._remember(key, *kv)
        return kv

    def _read(self, p: Path, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        from safetensors import safe_open

        try:
            with safe_open(str(p), framework="pt") as f:
                meta = f.metadata() or {}
                k, v = f.get_tensor("k"), f.get_tensor("v")
        except Exception as e:  # truncated / garbage file: any parse error is a corrupt entry
            log.warning("kv store: unreadable %s (%s); recomputing", p.name, e)
            return None
        if (meta.get("format") != FORMAT or meta.get("model") != self.model_fp or meta.get("key") != key
                or meta.get("sha256") != _digest(k, v) or k.shape != v.shape[:-1] + k.shape[-1:]):
            log.warning("kv store: stale or corrupt %s; recomputing", p.name)
            return None
        return k, v

    def put(self, key: str, k: torch.Tensor, v: torch.Tensor, disk: bool = True) -> bool:
        """Keep in memory and write to disk; returns False (and logs) when the disk write failed."""
        k, v = k.detach().contiguous().cpu(), v.detach().contiguous().cpu()
        self._remember(key, k, v)
        p = self.path(key)
        if p is None or not disk:
            return True
        from safetensors.torch import save_file

        meta = {"format": FORMAT, "model": self.model_fp, "key": key, "sha256": _digest(k, v)}
        try:
            with atomic_path(p) as tmp:
                save_file({"k": k, "v": v}, str(tmp), metadata=meta)
        except OSError as e:  # disk full, read-only, ...: serve from memory / recompute later
            log.warning("kv store: could not write %s (%s); entry kept in memory only", p.name, e)
            self._bump("write_errors")
            return False
        return True

    @property
    def mem_used(self) -> int:
        """Bytes held in the memory tier (never above ``mem_bytes``)."""
        return self._used

    def clear_memory(self) -> None:
        with self._lock:
            self._mem.clear()
            self._used = 0

    def __contains__(self, key: str) -> bool:
        p = self.path(key)
        return key in self._mem or (p is not None and p.exists())
