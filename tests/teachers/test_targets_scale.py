"""add-targets at scale: one process per device through a launcher, resumable per output shard."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
import torch

from mimscale.data import iter_tar_samples, read_manifest, write_fashion_mnist
from mimscale.errors import DataError
from mimscale.teachers.clip import TINY_CLIP_CFG, build_clip, save_clip
from mimscale.teachers.targets import add_targets

MEAN, STD = [0.286] * 3, [0.353] * 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("targets_scale")
    src = write_fashion_mnist(root / "fm", splits=("test",), shard_size=40, limit=160)["test"]  # 4 shards
    torch.manual_seed(0)
    clip = save_clip(build_clip(TINY_CLIP_CFG), TINY_CLIP_CFG, root / "clip.pt", mean=MEAN, std=STD)
    clean = add_targets(src, clip, root / "clean", batch_size=16, progress=False, device="cpu")
    return root, src, clip, clean


def _features(shard_dir) -> list[tuple[str, np.ndarray]]:
    out = []
    for s in read_manifest(shard_dir)["shards"]:
        with open(shard_dir / s["name"], "rb") as f:
            out += [(x["__key__"], np.load(io.BytesIO(x["clip.npy"]))) for x in iter_tar_samples(f, s["name"])]
    return out


def _same(a, b) -> None:
    fa, fb = _features(a), _features(b)
    assert [k for k, _ in fa] == [k for k, _ in fb] and len(fa) == 160
    np.testing.assert_allclose(
        np.stack([v for _, v in fa]).astype(np.float32),
        np.stack([v for _, v in fb]).astype(np.float32),
        rtol=0,
        atol=2e-3,
    )


def test_an_interrupted_run_resumes_without_recomputing_finished_shards(setup, tmp_path):
    root, src, clip, clean = setup
    copy = tmp_path / "src"
    shutil.copytree(src, copy)
    third = copy / read_manifest(copy)["shards"][2]["name"]
    good = third.read_bytes()
    third.write_bytes(good[:3000])  # a shard that breaks mid-run
    out = tmp_path / "out"
    with pytest.raises(DataError, match="cannot read source shard"):
        add_targets(copy, clip, out, batch_size=16, progress=False, device="cpu")
    assert not out.exists()  # nothing published
    stage = tmp_path / ".out.partial"
    done = sorted(p.name for p in stage.glob("*.tar"))
    assert len(done) == 2 and len(list(stage.glob("*.tar.json"))) == 2  # shards 0 and 1 finished
    stamps = {n: (stage / n).stat().st_mtime_ns for n in done}
    third.write_bytes(good)  # repaired: run again
    assert add_targets(copy, clip, out, batch_size=16, progress=False, device="cpu") == out
    assert {n: (out / n).stat().st_mtime_ns for n in done} == stamps  # not recomputed
    assert not stage.exists() and not list(out.glob("*.json.tmp*")) and not list(out.glob("*.tar.json"))
    assert read_manifest(out)["num_samples"] == 160
    _same(out, clean)
    # a different job (another batch size) does not reuse a stale staging directory
    third.write_bytes(good[:3000])
    with pytest.raises(DataError):
        add_targets(copy, clip, tmp_path / "o2", batch_size=16, progress=False, device="cpu")
    first = {p.name: p.stat().st_mtime_ns for p in (tmp_path / ".o2.partial").glob("*.tar")}
    with pytest.raises(DataError):
        add_targets(copy, clip, tmp_path / "o2", batch_size=8, progress=False, device="cpu")
    again = {p.name: p.stat().st_mtime_ns for p in (tmp_path / ".o2.partial").glob("*.tar")}
    assert again.keys() == first.keys() and all(again[n] != first[n] for n in first)  # redone, not kept
    assert '"batch_size": 8' in (tmp_path / ".o2.partial" / "job.json").read_text()


@pytest.mark.slow
def test_two_ranks_through_torchrun_write_the_same_shards(setup, tmp_path):
    from launch_utils import free_port, run

    root, src, clip, clean = setup
    out = tmp_path / "two"
    p = run(
        [
            "torchrun",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),
            "-m",
            "mimscale.cli",
            "data",
            "add-targets",
            str(src),
            "--teacher",
            str(clip),
            "--out",
            str(out),
            "--batch-size",
            "16",
            "--device",
            "cpu",
        ],
        timeout=300,
    )
    assert str(out) in p.stdout
    m, c = read_manifest(out), read_manifest(clean)
    assert m["shards"] == c["shards"] or [s["count"] for s in m["shards"]] == [s["count"] for s in c["shards"]]
    assert m["targets"] == c["targets"] and m["num_samples"] == 160
    _same(out, clean)
    assert not (tmp_path / ".two.partial").exists()
