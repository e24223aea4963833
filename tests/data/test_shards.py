"""Shard writers: Fashion-MNIST (real Debian files), image folders (multiprocess), manifests."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from mimscale.data import (
    FASHION_MNIST_DIR,
    MANIFEST_FORMAT,
    is_complete,
    read_idx,
    read_manifest,
    write_fashion_mnist,
    write_folder,
    write_manifest,
    write_shard,
)
from mimscale.data import shards as shards_mod
from mimscale.errors import DataError

HAVE_FMNIST = (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file()
needs_fmnist = pytest.mark.skipif(
    not HAVE_FMNIST, reason="needs Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist)"
)


def _wds_samples(urls):
    return list(wds.WebDataset([str(u) for u in urls], shardshuffle=False))


@needs_fmnist
def test_fashion_mnist_writer_real_files(tmp_path):
    out = write_fashion_mnist(tmp_path / "fm", limit=2000, shard_size=500, workers=2)
    assert set(out) == {"train", "test"}
    labels = {
        "train": read_idx(FASHION_MNIST_DIR / "train-labels-idx1-ubyte.gz"),
        "test": read_idx(FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz"),
    }
    train_images = read_idx(FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz")
    for split, d in out.items():
        m = read_manifest(d)
        assert m["format"] == MANIFEST_FORMAT and m["num_samples"] == 2000
        assert [s["name"] for s in m["shards"]] == [f"{split}-{i:06d}.tar" for i in range(4)]
        assert [s["count"] for s in m["shards"]] == [500] * 4
        assert len(m["classes"]) == 10 and m["classes"][0] == "T-shirt/top"
        samples = _wds_samples(d / s["name"] for s in m["shards"])  # the real webdataset library reads them
        assert len(samples) == 2000
        assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(2000)]
        assert [int(s["cls"]) for s in samples] == labels[split][:2000].tolist()
    first = _wds_samples([out["train"] / "train-000000.tar"])[:3]
    for i, s in enumerate(first):
        img = Image.open(io.BytesIO(s["png"]))
        assert img.mode == "L" and img.size == (28, 28)
        np.testing.assert_array_equal(np.asarray(img), train_images[i])


@needs_fmnist
def test_fashion_mnist_is_idempotent_and_atomic(tmp_path, monkeypatch):
    root = tmp_path / "fm"
    real_task = shards_mod._fmnist_shard_task
    calls = []

    def failing(args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # an interrupted conversion
        return real_task(args)

    monkeypatch.setattr(shards_mod, "_fmnist_shard_task", failing)
    with pytest.raises(KeyboardInterrupt):
        write_fashion_mnist(root, splits=("test",), limit=300, shard_size=100, workers=1)
    assert not (root / "test").exists()  # nothing that looks like a dataset
    assert list(root.iterdir()) == []  # and no temp dir left behind
    monkeypatch.setattr(shards_mod, "_fmnist_shard_task", real_task)
    d = write_fashion_mnist(root, splits=("test",), limit=300, shard_size=100, workers=1)["test"]
    assert is_complete(d) and read_manifest(d)["num_samples"] == 300
    stamp = (d / "manifest.json").stat().st_mtime_ns
    assert write_fashion_mnist(root, splits=("test",), limit=300)["test"] == d
    assert (d / "manifest.json").stat().st_mtime_ns == stamp  # returned immediately, nothing rewritten
    with pytest.raises(DataError, match="holds 300 samples"):
        write_fashion_mnist(root, splits=("test",), limit=200)


def test_fashion_mnist_missing_files_names_the_package(tmp_path):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        write_fashion_mnist(tmp_path / "out", source_dir=tmp_path / "nowhere")


def _make_tree(root: Path) -> dict[bytes, int]:
    """3 classes of PNG/JPEG files; returns {file bytes: label}."""
    rng = np.random.default_rng(0)
    expected = {}
    for label, cls in enumerate(["ant", "bee", "cat"]):
        (root / cls / "sub").mkdir(parents=True)
        for i in range(11):
            arr = rng.integers(0, 256, (9 + i, 7 + label, 3), dtype=np.uint8)
            fmt, ext = [("PNG", "png"), ("JPEG", "jpg"), ("JPEG", "JPEG")][i % 3]
            where = root / cls / ("sub" if i == 4 else "") / f"img{i}.{ext}"
            Image.fromarray(arr).save(where, format=fmt)
            expected[where.read_bytes()] = label
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    return expected


def test_write_folder_multiprocess(tmp_path, capfd):
    expected = _make_tree(tmp_path / "src")
    out = write_folder(tmp_path / "src", tmp_path / "out", shard_size=7, workers=2, prefix="train", seed=3)
    m = read_manifest(out)
    assert m["classes"] == ["ant", "bee", "cat"]
    assert m["num_samples"] == 33 and [s["count"] for s in m["shards"]] == [7, 7, 7, 7, 5]
    assert all(len(s["sha1"]) == 40 for s in m["shards"])
    samples = _wds_samples(out / s["name"] for s in m["shards"])
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(33)]
    got = {}
    for s in samples:
        ext = next(e for e in ("png", "jpg", "jpeg") if e in s)
        got[s[ext]] = int(s["cls"])
        Image.open(io.BytesIO(s[ext])).verify()
    assert got == expected  # original bytes, right labels, every file once
    err = capfd.readouterr().err
    assert "files/s" in err and "ETA" in err and "33/33 files" in err
    # the seeded shuffle mixes classes across shards and is reproducible
    out2 = write_folder(tmp_path / "src", tmp_path / "out2", shard_size=7, workers=1, seed=3, progress=False)
    assert [s["sha1"] for s in read_manifest(out2)["shards"]] == [s["sha1"] for s in m["shards"]]
    assert len({int(s["cls"]) for s in samples[:7]}) > 1
    assert write_folder(tmp_path / "src", out, shard_size=7) == out  # complete -> returned as is


def test_write_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        write_folder(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match="no image files"):
        write_folder(tmp_path / "empty", tmp_path / "out")
    (tmp_path / "flat").mkdir()
    with pytest.raises(DataError, match="no class subfolders"):
        write_folder(tmp_path / "flat", tmp_path / "out")


def test_read_manifest_errors(tmp_path):
    with pytest.raises(DataError, match="no shard manifest"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="corrupt shard manifest"):
        read_manifest(tmp_path)
    bad = {"format": MANIFEST_FORMAT, "num_samples": 5, "shards": [{"name": "a.tar", "count": 3}], "classes": []}
    (tmp_path / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(DataError, match="add up to 3"):
        read_manifest(tmp_path / "manifest.json")
    for err in (DataError("x"),):
        assert "\n" not in str(err)


def test_write_shard_extra_fields_roundtrip(tmp_path):
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    info = write_shard(
        tmp_path / "x-000000.tar",
        [
            {"__key__": "000000001", "png": b"\x89PNG...", "cls": 3, "npy": arr, "txt": "hello"},
            {"__key__": "000000002", "jpg": b"\xff\xd8...", "cls": 4, "npy": arr + 1, "txt": "world"},
        ],
    )
    assert info["count"] == 2 and info["name"] == "x-000000.tar"
    write_manifest(tmp_path, [info], classes=["a"], source="unit")
    assert read_manifest(tmp_path)["num_samples"] == 2
    samples = _wds_samples([tmp_path / "x-000000.tar"])
    assert [s["__key__"] for s in samples] == ["000000001", "000000002"]
    np.testing.assert_array_equal(np.load(io.BytesIO(samples[1]["npy"])), arr + 1)
    assert samples[0]["txt"] == b"hello" and samples[1]["cls"] == b"4"
    with pytest.raises(ValueError, match="no '.'"):
        write_shard(tmp_path / "y.tar", [{"__key__": "a.b", "cls": 1}])


def test_write_folder_max_side_through_the_cli(tmp_path, capsys):
    """``mimscale data folder --max-side N --quality Q``: large images shrunk to N (aspect kept) as JPEG, small
    ones kept byte for byte, both recorded in the manifest; the loader reads the result; a rerun with another
    N is refused in one line."""
    from mimscale.cli import main
    from mimscale.data import ShardLoader, TrainTransform

    rng = np.random.default_rng(0)
    originals = {}
    for cls in ["a", "b"]:
        (tmp_path / "src" / cls).mkdir(parents=True)
        for i, (w, h, fmt) in enumerate([(120, 90, "JPEG"), (60, 100, "PNG"), (30, 20, "JPEG"), (50, 40, "PNG")]):
            yy, xx = np.mgrid[:h, :w]
            arr = np.stack([xx * 2, yy * 2, (xx + yy) % 256], -1).astype(np.uint8) + rng.integers(
                0, 9, (h, w, 3), dtype=np.uint8
            )
            path = tmp_path / "src" / cls / f"{i}.{'jpg' if fmt == 'JPEG' else 'png'}"
            Image.fromarray(arr).convert("RGBA" if i == 1 else "RGB").save(path, format=fmt, quality=95)
            originals[path.read_bytes()] = (w, h)
    out = tmp_path / "capped"
    assert (
        main(
            [
                "data",
                "folder",
                str(tmp_path / "src"),
                str(out),
                "--max-side",
                "48",
                "--quality",
                "80",
                "--workers",
                "1",
                "--shard-size",
                "3",
            ]
        )
        == 0
    )
    m = read_manifest(out)
    assert (m["max_side"], m["quality"], m["resized"], m["num_samples"]) == (48, 80, 6, 8)
    sizes = []
    for s in _wds_samples(out / x["name"] for x in m["shards"]):
        ext = next(e for e in ("png", "jpg") if e in s)
        img = Image.open(io.BytesIO(s[ext]))
        if s[ext] in originals:  # untouched: already small enough
            assert max(img.size) <= 48 and img.size == originals[s[ext]]
        else:
            assert ext == "jpg" and img.format == "JPEG" and img.mode == "RGB" and max(img.size) == 48
        sizes.append(img.size)
    assert sorted(sizes).count((48, 36)) == 2 and sorted(sizes).count((29, 48)) == 2  # aspect kept (60x100 -> 29x48)
    ld = ShardLoader(str(out), batch_size=4, transform=TrainTransform(16), num_workers=0)
    assert sum(b["image"].shape[0] for b in ld) == 8
    capsys.readouterr()
    assert main(["data", "folder", str(tmp_path / "src"), str(out), "--max-side", "64", "--workers", "1"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "max_side=48" in err[0]
