"""In-process DeepSpeed on one CPU rank (gloo): for tests that build a real engine without a launcher."""

from __future__ import annotations

import pytest
from launch_utils import free_port

_PORT = 0


@pytest.fixture
def dist_single(monkeypatch):
    """Launcher variables of a one-rank job; the process group, once created, lives for the session. The whole
    environment is restored afterwards: ``dist.export`` and DeepSpeed's init write launcher variables
    (``LOCAL_SIZE``, ...) that would otherwise leak into every process the later tests launch."""
    import os

    saved = dict(os.environ)
    global _PORT
    _PORT = _PORT or free_port()
    for k, v in {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_PORT),
    }.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    yield
    os.environ.clear()
    os.environ.update(saved)
