"""mimscale.eval.cli + the knobs it resolves before any work: kNN knobs from the encoder's run, batch sizes that fit
small data (linear probe, fine-tuning), a fine-tuning recipe that matches the encoder's size."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from PIL import Image

from mimscale import config as C
from mimscale.errors import ConfigError
from mimscale.eval.cli import KNNConfig, recorded_knn
from mimscale.eval.finetune import RECIPE_BY_ARCH, RECIPE_DIR, FinetuneRecipe, fit_batch
from mimscale.eval.linear import fit_batch_size

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory) -> str:
    """40 labelled images in shards (what `mimscale data folder` writes for a small folder)."""
    from mimscale.data.shards import write_folder

    root = tmp_path_factory.mktemp("small")
    for i in range(40):
        (root / "img" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (i, 0, 0)).save(root / "img" / f"c{i % 2}" / f"{i}.png")
    return str(write_folder(root / "img", root / "shards", workers=1, progress=False))


def test_knn_knobs_come_from_the_encoders_run(tmp_path):
    """`eval knn RUN` uses the run's recorded pool/k/T (what its in-training kNN used); an exported file without a
    run uses the pre-training defaults; what is given wins."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"eval": {"pool": "mean", "knn_k": 7, "knn_temperature": 0.2}}))
    cfg = KNNConfig()
    assert recorded_knn(cfg, SimpleNamespace(run_dir=run)) == "the run's recorded choice"
    assert (cfg.pool, cfg.k, cfg.temperature) == ("mean", 7, 0.2)
    cfg = KNNConfig(k=3)
    recorded_knn(cfg, SimpleNamespace(run_dir=run))
    assert (cfg.pool, cfg.k) == ("mean", 3)
    cfg = KNNConfig()
    assert "defaults" in recorded_knn(cfg, SimpleNamespace(run_dir=None))
    e = C.EvalConfig()
    assert (cfg.pool, cfg.k, cfg.temperature) == (e.pool, e.knn_k, e.knn_temperature)
    # the default recipe's run records its pooling, so both paths agree on it
    assert C.load().eval.pool == "mean"


def test_linear_probe_batch_fits_small_data(small_shards):
    assert fit_batch_size(None, small_shards, None, world=1, say=False) == 8  # <= 40 / 4, a power of two
    assert fit_batch_size(None, small_shards, None, world=3, say=False) == 6  # divisible by the processes
    assert fit_batch_size(32, small_shards, None, world=1, say=False) == 32
    with pytest.raises(ConfigError, match=r"batch_size=16384 is larger than the 40 training samples.*batch_size=N"):
        fit_batch_size(16384, small_shards, None, world=1, say=False)


def _recipe(name: str) -> FinetuneRecipe:
    return C.from_dict(FinetuneRecipe, C.load_raw(str(RECIPE_DIR / f"{name}.yaml")))


def test_finetune_recipe_by_size_and_batch_fits(small_shards):
    """Small ViTs get the small recipe (not ViT-B/16's 100 epochs, 10 workers, bf16); the recipe's batch shrinks
    to a small training set (said in one line); a given batch larger than an epoch is refused before any work."""
    for arch in ("vit_micro", "vit_tiny", "vit_small"):
        assert RECIPE_BY_ARCH[arch] == "finetune_vit_small"
    small = _recipe("finetune_vit_small")
    assert (small.train.precision, small.data.num_workers, small.finetune.layer_decay) == ("fp32", 2, 0.75)
    line = fit_batch(small, small_shards, explicit=False, world=1)
    assert small.train.batch_size == 8 and small.train.micro_batch_size == 8
    assert line is not None and "256 fitted to 40 training samples" in line and "\n" not in line
    big = _recipe("finetune_vit_b16")
    big.train.batch_size = 1024
    with pytest.raises(ConfigError, match=r"train.batch_size=1024 is larger than an epoch \(40 training samples"):
        fit_batch(big, small_shards, explicit=True, world=1)
    fits = _recipe("finetune_vit_small")
    fits.train.batch_size, fits.train.micro_batch_size = 8, 8
    assert fit_batch(fits, small_shards, explicit=True, world=1) is None  # given and fits: kept
    assert Path(RECIPE_DIR / "finetune_vit_small.yaml").is_file()
