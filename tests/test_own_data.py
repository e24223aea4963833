"""A newcomer's own photos, end to end, as docs/guide/own-data.md tells it: a generated folder of mixed photos
(three classes told apart by shape only, random colours, mixed sizes/modes/formats, an animated GIF, a corrupt JPEG,
a text file) -> `mimscale data folder --val-fraction` -> `mimscale pretrain` with the recipe's defaults and
`train.steps` -> kNN on the held-out split of the SAME data, better than at random init -> `mimscale report`.
Nothing in the run (config, logs, metrics) mentions the recipe's own data set. Also: an unlabelled folder."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from launch_utils import run
from PIL import Image, ImageDraw

from mimscale.data.shards import read_manifest

CLI = [sys.executable, "-m", "mimscale.cli"]
CLASSES = ("hstripes", "vstripes", "discs")


def make_photos(root: Path, per_class: int, seed: int = 0, labelled: bool = True) -> int:
    """Photos as people have them; returns how many good images were written. Colours are random in every class,
    so only the shapes (horizontal stripes, vertical stripes, discs) tell the classes apart."""
    rng = np.random.default_rng(seed)
    formats = [("png", {}), ("jpg", {"quality": 90}), ("webp", {"quality": 90}), ("bmp", {}), ("gif", {}), ("tiff", {})]
    n = 0
    for c, name in enumerate(CLASSES):
        d = root / name if labelled else root / ("nested" if c else "")
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = (int(v) for v in rng.integers(28, 72, 2))
            bg, fg = (tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(2))
            img = Image.new("RGB", (w, h), bg)
            draw = ImageDraw.Draw(img)
            period = int(rng.integers(6, 12))
            off = int(rng.integers(0, period))
            if c == 0:
                for y in range(off, h, period):
                    draw.rectangle([0, y, w, y + period // 2 - 1], fill=fg)
            elif c == 1:
                for x in range(off, w, period):
                    draw.rectangle([x, 0, x + period // 2 - 1, h], fill=fg)
            else:
                for _ in range(int(rng.integers(2, 5))):
                    r = int(rng.integers(5, max(6, min(w, h) // 3)))
                    x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
                    draw.ellipse([x - r, y - r, x + r, y + r], fill=fg)
            ext, kw = formats[(i + c) % len(formats)]
            (img.convert("L") if i % 7 == 3 else img).save(d / f"{name}_{i:03d}.{ext}", **kw)
            n += 1
    first = root / CLASSES[0] if labelled else root
    frames = [Image.new("RGB", (40, 40), (200, 30, 30)), Image.new("RGB", (40, 40), (30, 30, 200))]
    for y in range(0, 40, 8):
        ImageDraw.Draw(frames[0]).rectangle([0, y, 40, y + 3], fill=(250, 250, 250))
    frames[0].save(first / "animated.gif", save_all=True, append_images=frames[1:])
    buf = io.BytesIO()
    Image.new("RGB", (50, 50), (1, 2, 3)).save(buf, format="JPEG")
    last = root / CLASSES[2] if labelled else root / "nested"
    (last / "broken.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    (last / "README.txt").write_text("my photos")
    return n + 1


@pytest.mark.slow
@pytest.mark.allow_slow("the newcomer's path end to end: convert, pre-train 120 steps with kNN twice, report", 150)
def test_own_photos_folder_to_report(tmp_path):
    good = make_photos(tmp_path / "photos", per_class=60)
    out = tmp_path / "shards"
    p = run([*CLI, "data", "folder", str(tmp_path / "photos"), str(out), "--val-fraction", "0.25"])
    assert "labels: 3 classes from the subfolders" in p.stderr
    assert "1 corrupt images" in p.stderr and ".txt 1" in p.stderr
    train, val = read_manifest(out / "train"), read_manifest(out / "val")
    assert train["num_samples"] + val["num_samples"] == good and val["num_samples"] >= 20
    assert train["classes"] == sorted(CLASSES) and [c["path"] for c in train["corrupt"]] == ["discs/broken.jpg"]

    rd = tmp_path / "run"
    p = run(
        [
            *CLI,
            "pretrain",
            f"data.train={out / 'train'}",
            "train.steps=120",  # the one knob a small folder needs (docs/guide/own-data.md) ...
            "train.batch_size=32",  # ... and a batch well under its size
            "train.micro_batch_size=32",
            "data.num_workers=1",
            f"train.run_dir={rd}",
            "log.wandb=disabled",
        ],
        timeout=900,
    )
    logs = p.stdout + p.stderr
    assert "kNN evaluation on your data" in logs and "normalisation from the shards' manifest" in logs
    cfg = yaml.safe_load((rd / "config.yaml").read_text())
    assert cfg["eval"]["knn_train"] == str(out / "train") and cfg["eval"]["knn_test"] == str((out / "val").resolve())
    assert cfg["data"]["mean"] == train["mean"] and cfg["data"]["std"] == train["std"]
    assert cfg["derived"]["total_steps"] == 120
    s = json.loads((rd / "summary.json").read_text())
    assert s["steps"] == 120
    # kNN on the held-out split of the same photos: the pre-trained encoder beats its random init (measured on
    # 2 busy cores: 27.3% -> 36.4% on the 44 held-out photos, 63 s of training; deterministic: seeded data and run)
    assert s["knn_top1_final"] > s["knn_top1_init"] + 5.0, (s["knn_top1_init"], s["knn_top1_final"])
    assert f"kNN top-1 on the test split: trained {s['knn_top1_final']:.2f}%" in p.stdout
    run([*CLI, "report", str(rd)])
    assert (rd / "report.html").is_file()
    everything = (rd / "config.yaml").read_text() + logs + (rd / "metrics.jsonl").read_text()
    assert "fashion" not in everything.lower() and "mnist" not in everything.lower()


def test_unlabelled_photos_convert_and_kNN_is_off_with_a_line(tmp_path, capsys):
    """A flat/nested folder without classes: converted with label -1, and a run on it turns kNN off with one line
    saying how to turn it on (there is no labelled set to evaluate on), before any work."""
    from mimscale import config as C
    from mimscale.cli import main

    good = make_photos(tmp_path / "photos", per_class=8, labelled=False)
    out = tmp_path / "shards"
    assert main(["data", "folder", str(tmp_path / "photos"), str(out), "--val-fraction", "0.2", "--workers", "1"]) == 0
    err = capsys.readouterr().err
    assert "labels: none" in err and "1 corrupt images" in err
    train, val = read_manifest(out / "train"), read_manifest(out / "val")
    assert train["labels"] == "none" and train["classes"] == []
    assert train["num_samples"] + val["num_samples"] == good
    cfg = C.load("tiny_cpu", [f"data.train={out / 'train'}"])
    assert cfg.eval.knn_train is None and cfg.eval.knn_test is None
