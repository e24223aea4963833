"""Shared fixtures: small real Fashion-MNIST shards."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def fmnist_small(tmp_path_factory) -> dict[str, Path]:
    """Real Fashion-MNIST (Debian package) as shards: 2048 train samples in 8 shards, 512 test."""
    from mimscale.data.shards import write_fashion_mnist

    out = tmp_path_factory.mktemp("fmnist")
    dirs = write_fashion_mnist(out, splits=("train",), shard_size=256, limit=2048)
    dirs.update(write_fashion_mnist(out, splits=("test",), shard_size=256, limit=512))
    return dirs


@pytest.fixture(scope="session")
def tiny_clip(fmnist_small, tmp_path_factory) -> Path:
    """Path of a tiny real CLIP (open_clip, ``TINY_CLIP_CFG``: 32 px, patch 4 -> 8x8 grid, ``D_out`` 64), trained
    for 4096 images on ``fmnist_small`` (train: 3-4x chance zero-shot; ~15 s idle). Load it with
    ``mimscale.teachers.clip.CLIPTeacher(path)``; its zero-shot result is beside it (``clip.json``)."""
    from mimscale.teachers.train_clip import TrainCLIPConfig, train_clip

    out = tmp_path_factory.mktemp("tiny_clip") / "clip.pt"
    cfg = TrainCLIPConfig(samples=4096, batch_size=32, lr=3e-3, num_workers=0, test_samples=512)
    train_clip(out, str(fmnist_small["train"]), str(fmnist_small["test"]), cfg, progress=False)
    return out


# ----------------------------------------------------------------------------- tiers
# unit: in-process, seconds.  multirank: launches several real ranks (torchrun / deepspeed / accelerate).
# system: real outside parts (the SLURM daemons, headless Chromium, the README demo).  `slow` stays as
# the marker of everything that launches processes or trains on real data.
#   pytest -m unit          pytest -m "not system"          pytest -m multirank
_MULTIRANK = ("ranks=2", "ranks=3", "ranks=ranks", "nproc_per_node", "--num_processes")


def pytest_collection_modifyitems(config, items):
    import inspect

    for item in items:
        path = str(item.path)
        fn = getattr(item, "function", None)
        try:
            src = inspect.getsource(fn) if fn is not None else ""
        except (OSError, TypeError):
            src = ""
        system = "/tests/slurm/" in path or path.endswith("test_demo.py") or "chromium" in src.lower()
        if system:
            item.add_marker(pytest.mark.system)
        if any(m in src for m in _MULTIRANK) or (
            path.endswith("test_launch_zero.py") and "runs" in getattr(item, "fixturenames", ())
        ):
            item.add_marker(pytest.mark.multirank)
        if not system and not item.get_closest_marker("slow") and not item.get_closest_marker("multirank"):
            item.add_marker(pytest.mark.unit)
