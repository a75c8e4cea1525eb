"""Shared fixtures. Tests that need ../shared data skip on a user's machine without it, but fail under CI."""

from __future__ import annotations

import os

import numpy as np
import pytest

from edgecloud.vmsched.trace import default_split_dir, default_trace_path, load_starts, load_trace


def require_shared(path) -> None:
    if not path.exists():
        msg = f"shared data not found at {path} (set EDGECLOUD_DATA)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg + "; under CI the data must be present")
        pytest.skip(msg)


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
