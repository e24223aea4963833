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
    assert write_folder(tmp_path / "src", out, shard_size=7, seed=3) == out  # the same request -> returned as is
    with pytest.raises(DataError, match=r"written with seed=3 \(now 0\).*--overwrite"):  # never silently mixed
        write_folder(tmp_path / "src", out, shard_size=7)


def test_write_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        write_folder(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match="no image files"):
        write_folder(tmp_path / "empty", tmp_path / "out")
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "a.png")
    with pytest.raises(DataError, match="no class subfolders.*--labels none"):
        write_folder(tmp_path / "flat", tmp_path / "out", labels="folders")
    with pytest.raises(DataError, match="--val-fraction 1.5"):
        write_folder(tmp_path / "flat", tmp_path / "out", val_fraction=1.5)
    with pytest.raises(DataError, match="leaves 1 training and 0 validation"):
        write_folder(tmp_path / "flat", tmp_path / "out", val_fraction=0.01)
    with pytest.raises(DataError, match="inside the image folder"):
        write_folder(tmp_path / "flat", tmp_path / "flat" / "shards")


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


def _mixed_photos(root: Path, labelled: bool) -> dict[str, tuple[int, int, int]]:
    """A folder as people have it: mixed sizes, modes and formats (PNG/JPEG/GIF/TIFF/WebP/BMP, an animated GIF,
    a 16-bit PNG, a palette PNG with transparency), a corrupt JPEG, a text file; nested. Returns
    ``{relative path: mean RGB}`` of the good images (flat colours, so the mean is known)."""
    kinds = [
        ("png", "RGB", {}),
        ("jpg", "RGB", {"quality": 100}),
        ("gif", "P", {}),
        ("tiff", "RGB", {}),
        ("webp", "RGB", {"lossless": True}),
        ("bmp", "RGB", {}),
        ("png", "RGBA", {}),
        ("png", "L", {}),
    ]
    good = {}
    for i, (ext, mode, kw) in enumerate(kinds * 2):
        colour = ((37 * i) % 256, (91 * i) % 256, (173 * i) % 256)
        cls = f"c{i % 2}" if labelled else ("" if i % 3 else "nested/deeper")
        d = root / cls
        d.mkdir(parents=True, exist_ok=True)
        img = Image.new("RGB", (20 + 3 * i, 12 + 5 * i), colour)
        if mode == "L":
            img = img.convert("L")
            colour = (img.getpixel((0, 0)),) * 3
        elif mode == "RGBA":
            img = img.convert("RGBA")
        elif mode == "P":
            img = img.quantize(4)
            colour = img.convert("RGB").getpixel((0, 0))
        img.save(d / f"img{i}.{ext}", **kw)
        good[str(Path(cls, f"img{i}.{ext}"))] = colour
    frames = [Image.new("RGB", (16, 16), c) for c in ((250, 0, 0), (0, 0, 250))]  # animated: first frame kept
    frames[0].save(root / ("c0" if labelled else "") / "anim.gif", save_all=True, append_images=frames[1:])
    good[str(Path("c0" if labelled else "", "anim.gif"))] = (
        Image.open(root / ("c0" if labelled else "") / "anim.gif").convert("RGB").getpixel((0, 0))
    )
    Image.fromarray(np.full((10, 14), 40000, dtype=np.uint16)).save(root / ("c1" if labelled else "") / "deep.png")
    good[str(Path("c1" if labelled else "", "deep.png"))] = (155, 155, 155)  # 40000 / 65535 * 255
    jpeg = io.BytesIO()
    Image.new("RGB", (64, 64), (9, 9, 9)).save(jpeg, format="JPEG")
    (root / ("c1" if labelled else "") / "broken.jpg").write_bytes(jpeg.getvalue()[:200])  # truncated
    (root / ("c0" if labelled else "") / "notes.txt").write_text("not an image")
    return good


def _decoded(out: Path) -> dict[str, tuple[tuple[int, ...], int]]:
    """key -> (mean RGB of the stored image, label or -1) over every shard of ``out``."""
    got = {}
    m = read_manifest(out)
    for s in _wds_samples(out / x["name"] for x in m["shards"]):
        ext = next(e for e in ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tiff") if e in s)
        assert ext in ("png", "jpg", "webp", "bmp")  # what the loader reads: GIF/TIFF were re-encoded
        img = Image.open(io.BytesIO(s[ext]))
        rgb = np.asarray(img.convert("RGBA").convert("RGB") if img.mode in ("P", "RGBA") else img.convert("RGB"))
        got[s["__key__"]] = (tuple(int(round(v)) for v in rgb.reshape(-1, 3).mean(0)), int(s.get("cls", b"-1")))
    return got


def test_write_folder_unlabelled_mixed_formats(tmp_path, capsys):
    """No class subfolders: detected and stated in one line, every image gets label -1 (no cls field), every
    format Pillow opens is kept (GIF/TIFF as RGB PNG of the first frame), the corrupt JPEG is counted and
    listed and not written, the text file is counted as left out; mean/std measured; shard size automatic."""
    from mimscale.cli import main

    good = _mixed_photos(tmp_path / "photos", labelled=False)
    out = tmp_path / "shards"
    assert main(["data", "folder", str(tmp_path / "photos"), str(out), "--workers", "2"]) == 0
    captured = capsys.readouterr()
    err = captured.err.splitlines()
    assert any(ln.startswith("labels: none") and "detected" in ln for ln in err)
    left = [ln for ln in err if ln.startswith("left out")]
    assert len(left) == 1 and "1 files that are not images" in left[0] and ".txt 1" in left[0]
    assert "1 corrupt images" in left[0] and "broken.jpg" in left[0]
    assert captured.out.strip() == str(out)
    m = read_manifest(out)
    assert m["labels"] == "none" and m["classes"] == [] and m["num_samples"] == len(good) == 18
    assert [c["path"] for c in m["corrupt"]] == ["broken.jpg"] and m["left_out"]["corrupt"] == 1
    assert m["left_out"]["not_images"] == {".txt": 1}
    assert len(m["shards"]) == 18  # 18 images: one per shard, so 16 takers (8 ranks x 2 workers) all get one
    got = _decoded(out)
    assert all(label == -1 for _, label in got.values())
    have = np.array(sorted(c for c, _ in got.values()), dtype=float)
    assert np.abs(have - np.array(sorted(good.values()), dtype=float)).max() <= 2  # each image once (JPEG: +-2)
    want = np.array(sorted(good.values()), dtype=float)
    assert np.allclose(m["mean"], (want / 255).mean(0), atol=0.08)  # pixel-weighted, so near the image mean
    assert all(0 < s < 0.6 for s in m["std"])
    # the loader reads it, labels -1
    from mimscale.data import ShardLoader, TrainTransform

    ld = ShardLoader(str(out), batch_size=6, transform=TrainTransform(16), num_workers=0)
    b = next(iter(ld))
    assert b["image"].shape == (6, 3, 16, 16) and (b["label"] == -1).all()


def test_write_folder_labelled_val_split_and_overwrite(tmp_path, capsys):
    """Class subfolders + --val-fraction: OUT/train and OUT/val by a hash of the path (the same split on a
    rerun and for the same file whatever else is there), labels kept, the train manifest names its held-out
    split; an existing output with other options is refused in one line unless --overwrite; the same request
    again is reused (said in a line); a raw image folder or the split parent given as shards gets a one-line fix."""
    from mimscale.cli import main
    from mimscale.data.shards import split_of

    good = _mixed_photos(tmp_path / "photos", labelled=True)
    out = tmp_path / "shards"
    argv = ["data", "folder", str(tmp_path / "photos"), str(out), "--val-fraction", "0.3", "--workers", "1"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "labels: 2 classes from the subfolders" in err and f"data.train={out / 'train'}" in err
    tr, va = read_manifest(out / "train"), read_manifest(out / "val")
    assert tr["classes"] == va["classes"] == ["c0", "c1"] and tr["held_out"] == "../val"
    assert tr["num_samples"] + va["num_samples"] == len(good) and va["num_samples"] > 0
    assert tr["mean"] == va["mean"]  # the training split's statistics, in both
    in_val = sorted(p for p in good if split_of(p, 0.3) == "val")
    assert va["num_samples"] == len(in_val)
    labels = [lab for _, lab in _decoded(out / "val").values()]
    assert sorted(labels) == sorted(int(Path(p).parts[0][1]) for p in in_val)
    sha = [s["sha1"] for s in tr["shards"]]
    # same request: reused; other options: refused (one line) until --overwrite
    assert main(argv) == 0 and "nothing to do" in capsys.readouterr().err
    assert main([*argv, "--shard-size", "2"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "shard_size=None (now 2)" in lines[0] and "--overwrite" in lines[0]
    assert [s["sha1"] for s in read_manifest(out / "train")["shards"]] == sha  # untouched
    assert main([*argv, "--shard-size", "2", "--overwrite"]) == 0
    assert all(s["count"] <= 2 for s in read_manifest(out / "train")["shards"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos", "shards"]  # no temp dirs left
    # pointing training at the wrong thing: one line that says what to run / pass
    for wrong, want in ((tmp_path / "photos", "mimscale data folder"), (out, f"pass {out / 'train'}")):
        with pytest.raises(DataError, match=want):
            read_manifest(wrong)
