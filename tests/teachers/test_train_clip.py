"""train-clip learns a real CLIP (zero-shot above chance); fit-kmeans runs on its features from shards."""

from __future__ import annotations

import json

import pytest
import torch

from mimscale.cli import main
from mimscale.teachers.clip import CLIPTeacher, load_clip
from mimscale.teachers.kmeans import KMeans
from mimscale.teachers.train_clip import TrainCLIPConfig, _tokens, zero_shot_top1


@pytest.mark.slow
def test_short_run_beats_chance_and_the_number_is_reproducible(tiny_clip, fmnist_small):
    res = json.loads(tiny_clip.with_suffix(".json").read_text())
    assert res["chance"] == 10.0 and res["test_samples"] == 512 and res["train_samples"] == 4096
    assert res["zero_shot_top1"] >= 20.0, res  # >= 2x chance after 4096 images
    model, info = load_clip(tiny_clip)
    assert info["sha256"] == res["sha256"] and info["meta"]["zero_shot_top1"] == res["zero_shot_top1"]
    cfg = TrainCLIPConfig(num_workers=0, test_samples=512)
    again, n = zero_shot_top1(model, _tokens(cfg), str(fmnist_small["test"]), cfg)
    assert n == 512 and round(again, 2) == res["zero_shot_top1"]
    # an untrained CLIP of the same shape is at chance level on the same data
    torch.manual_seed(0)
    from mimscale.teachers.clip import TINY_CLIP_CFG, build_clip

    rand, _ = zero_shot_top1(build_clip(TINY_CLIP_CFG), _tokens(cfg), str(fmnist_small["test"]), cfg)
    assert rand < res["zero_shot_top1"] - 5


@pytest.mark.slow
def test_fit_kmeans_cli_on_teacher_features(tiny_clip, fmnist_small, tmp_path, capsys):
    out = tmp_path / "km.pt"
    rc = main(
        [
            "teacher",
            "fit-kmeans",
            str(fmnist_small["train"]),
            "--teacher",
            str(tiny_clip),
            "--k",
            "16",
            "--out",
            str(out),
            "--iters",
            "3",
            "--max-images",
            "256",
            "--init-sample",
            "2000",
            "--batch-size",
            "64",
            "--workers",
            "0",
        ]
    )
    assert rc == 0
    stats = json.loads(capsys.readouterr().out.splitlines()[0])
    assert stats["points"] == 256 * 64 and stats["k"] == 16 and stats["dim"] == 64
    km = KMeans.load(out)
    teacher = CLIPTeacher(tiny_clip)
    assert km.teacher["sha256"] == teacher.teacher_id()["sha256"]
    assert km.view["image_size"] == [32, 32] and km.view["grid"] == [8, 8] and km.view["crop_rule"]
    codes = km.assign(teacher(torch.randn(4, 3, 32, 32)))
    assert codes.shape == (4, 64) and int(codes.max()) < 16


def test_caption_names_come_from_the_manifest():
    from mimscale.teachers.train_clip import FASHION_MNIST_PROMPT_NAMES, caption_names

    fashion = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    assert caption_names(fashion) == FASHION_MNIST_PROMPT_NAMES and caption_names([]) == FASHION_MNIST_PROMPT_NAMES
    assert caption_names([str(i) for i in range(10)]) == tuple(str(i) for i in range(10))  # MNIST
    assert caption_names(["Cat", "Dog"]) == ("cat", "dog")
