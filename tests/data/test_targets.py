"""Cached teacher targets in shards: exact values on the deterministic crop, manifest, crop-rule refusal."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from mimscale.data import ShardLoader, iter_tar_samples, read_manifest, write_fashion_mnist
from mimscale.data.targets import check_targets, crop_rule, target_view
from mimscale.errors import DataError
from mimscale.teachers.clip import TINY_CLIP_CFG, CLIPTeacher, build_clip, save_clip
from mimscale.teachers.kmeans import KMeans
from mimscale.teachers.targets import add_targets

MEAN, STD = [0.286] * 3, [0.353] * 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("targets")
    src = write_fashion_mnist(root / "fm", splits=("test",), shard_size=48, limit=144)["test"]
    torch.manual_seed(0)
    clip = save_clip(build_clip(TINY_CLIP_CFG), TINY_CLIP_CFG, root / "clip.pt", mean=MEAN, std=STD)
    feats = add_targets(src, clip, root / "feat", batch_size=20, workers=2, progress=False)
    return root, src, clip, feats


def test_features_are_the_teacher_on_the_center_crop(setup):
    root, src, clip, feats = setup
    m = read_manifest(feats)
    assert m["num_samples"] == 144 and len(m["shards"]) == 3 and m["classes"] == read_manifest(src)["classes"]
    e = m["targets"]["clip.npy"]
    teacher = CLIPTeacher(clip)
    assert e["teacher"] == teacher.teacher_id() and e["kmeans"] is None
    assert (e["kind"], e["dtype"], e["shape"], e["grid"]) == ("features", "float16", [64, 64], [8, 8])
    assert (e["crop_rule"], e["image_size"], e["mean"]) == (crop_rule(1.0), [32, 32], MEAN)
    view = target_view(32, MEAN, STD)
    with open(feats / m["shards"][1]["name"], "rb") as f:
        samples = list(iter_tar_samples(f, "x"))
    assert len(samples) == 48 and {"png", "cls", "clip.npy"} <= set(samples[0])
    img = torch.stack([view(Image.open(io.BytesIO(s["png"])), None) for s in samples[:5]])
    got = torch.from_numpy(np.stack([np.load(io.BytesIO(s["clip.npy"])) for s in samples[:5]]))
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), teacher(img), rtol=1e-2, atol=1e-2)
    # the loader hands them over as batch["clip.npy"] float16 [B, N, D], aligned with the images
    loader = ShardLoader(
        feats,
        batch_size=16,
        mode="eval",
        num_workers=0,
        transform=view,
    )
    check_targets(feats, ["clip.npy"], 32)
    batch = next(iter(loader))
    assert batch["clip.npy"].shape == (16, 64, 64) and batch["clip.npy"].dtype == torch.float16
    torch.testing.assert_close(batch["clip.npy"].float(), teacher(batch["image"]), rtol=1e-2, atol=1e-2)


def test_codes_from_kmeans_and_refusals(setup, tmp_path):
    root, src, clip, feats = setup
    teacher = CLIPTeacher(clip)
    km = KMeans(torch.randn(40, 64), teacher=teacher.teacher_id())
    km.save(tmp_path / "km.pt")
    codes = add_targets(feats, clip, tmp_path / "codes", kind="codes", kmeans=tmp_path / "km.pt", progress=False)
    m = read_manifest(codes)
    assert set(m["targets"]) == {"clip.npy", "kclip.npy"}  # features kept, codes added
    e = m["targets"]["kclip.npy"]
    assert e["kmeans"]["sha256"] == KMeans.load(tmp_path / "km.pt").sha256 and e["shape"] == [64]
    loader = ShardLoader(codes, batch_size=8, mode="eval", num_workers=0, transform=target_view(32, MEAN, STD))
    batch = next(iter(loader))
    assert batch["kclip.npy"].dtype == torch.uint16 and batch["kclip.npy"].shape == (8, 64)
    want = km.assign(teacher(batch["image"]))
    assert (batch["kclip.npy"].long() == want).float().mean() > 0.98  # fp16-free path: same codes
    # a caller that trains on another crop / size is refused with one line
    with pytest.raises(DataError, match="crop rule") as err:
        check_targets(codes, ["kclip.npy"], 28)
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="crop rule"):
        check_targets(codes, ["kclip.npy"], 32, crop_pct=0.875)
    with pytest.raises(DataError, match="no cached targets 'kclip.npy'"):
        check_targets(feats, ["kclip.npy"], 32)
    assert set(check_targets(codes, ["clip.npy", "kclip.npy"], 32)) == {"clip.npy", "kclip.npy"}
    # codes need a k-means fit on the same teacher
    other = KMeans(torch.randn(4, 64), teacher={"sha256": "0" * 64})
    other.save(tmp_path / "other.pt")
    with pytest.raises(DataError, match="fit k-means with this teacher"):
        add_targets(src, clip, tmp_path / "x", kind="codes", kmeans=tmp_path / "other.pt", progress=False)
    assert not (tmp_path / "x").exists()


def test_idempotent_and_atomic(setup):
    root, src, clip, feats = setup
    before = (feats / "manifest.json").read_text()
    assert add_targets(src, clip, feats, progress=False) == feats  # complete: kept as is
    assert (feats / "manifest.json").read_text() == before
    assert not [p for p in root.iterdir() if p.name.startswith((".feat.tmp", ".feat.partial"))]
    json.loads(before)
