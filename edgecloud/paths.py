"""Where edgecloud finds shared data and keeps its caches.

The data root defaults to ``../shared/data`` beside the repository checkout; ``EDGECLOUD_DATA`` overrides it.
Data is always read in place and never copied into the project (the Huawei trace is CC BY-NC 4.0).
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def data_root() -> Path:
    env = os.environ.get("EDGECLOUD_DATA")
    if env:
        return Path(env).expanduser()
    return REPO_ROOT.parent / "shared" / "data"


def cache_root() -> Path:
    env = os.environ.get("EDGECLOUD_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgecloud"
