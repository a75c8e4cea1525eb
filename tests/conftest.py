"""Shared fixtures. Tests that need ../shared data skip on a user's machine without it, but fail under CI.

Tests never write to the user's cache: ``EDGECLOUD_CACHE`` points at a session temp dir, set here at import time,
before any test module (or a subprocess a test starts, which inherits the environment) reads it. So the suite
stays fast, :func:`_reuse_converted_models` links the user's already-converted registry models into it (read-only,
file by file; a conversion is named by its source file's fingerprint, so only an exact match is linked);
without one, the first test that loads a model converts it once per session into the temp cache.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from edgecloud.paths import cache_root

# read before the override: the source of reusable conversions, never written; kept in the environment because
# pytest-xdist workers inherit the controller's EDGECLOUD_CACHE (its own empty temp cache) and would convert again
USER_CACHE = Path(os.environ.setdefault("EDGECLOUD_TESTS_USER_CACHE", str(cache_root())))
TEST_CACHE = Path(tempfile.mkdtemp(prefix="edgecloud-test-cache-"))
os.environ["EDGECLOUD_CACHE"] = str(TEST_CACHE)
atexit.register(shutil.rmtree, TEST_CACHE, True)

from edgecloud.vmsched.trace import default_split_dir, default_trace_path, load_starts, load_trace  # noqa: E402


def require_shared(path) -> None:
    if not path.exists():
        msg = f"shared data not found at {path} (set EDGECLOUD_DATA)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg + "; under CI the data must be present")
        pytest.skip(msg)


@pytest.fixture(scope="session", autouse=True)
def _reuse_converted_models():
    """Link each converted registry model (``models/<name>-<fingerprint>``) and assembled GGUF of the user's cache
    into the test cache, one symlink per file (a test that deletes a "damaged" conversion removes links only)."""
    models = USER_CACHE / "models"
    for d in models.iterdir() if models.is_dir() else ():
        dst = TEST_CACHE / "models" / d.name
        if d.is_dir() and (d / "config.json").exists() and not dst.exists():
            dst.mkdir(parents=True)
            for f in d.iterdir():
                (dst / f.name).symlink_to(f)
    gguf = USER_CACHE / "gguf"
    if gguf.is_dir():
        (TEST_CACHE / "gguf").mkdir(exist_ok=True)
        for f in gguf.glob("*.gguf"):
            if not (TEST_CACHE / "gguf" / f.name).exists():
                (TEST_CACHE / "gguf" / f.name).symlink_to(f)
    yield TEST_CACHE


@pytest.fixture(scope="session")
def trace():
    require_shared(default_trace_path())
    return load_trace()


@pytest.fixture(scope="session")
def test_starts(trace) -> np.ndarray:
    require_shared(default_split_dir())
    return load_starts("test", len(trace))


@pytest.fixture(scope="session")
def valid_starts(trace) -> np.ndarray:
    require_shared(default_split_dir())
    return load_starts("valid", len(trace))
