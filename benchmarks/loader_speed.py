"""Loader speed: ShardLoader (+MaskCollate) vs torchvision ImageFolder + DataLoader on the same JPEGs.

Data (made once under --workdir, reused by later runs):
  small  --images JPEGs of --px x --px (default 2,000 x 64 px, RGB, quality 90) in a class-folder tree,
         made from Fashion-MNIST (/usr/share/datasets/fashion-mnist, Debian's dataset-fashion-mnist;
         synthetic garments if it is missing), upsampled and tinted
  large  --large-images JPEGs of ImageNet-like size (sides 333-500 px, ~95 KB; default 256 images) with photo-like
         texture (Fashion-MNIST shape + multi-octave noise), for the 224 px pipeline
Each tree is sharded with ``mimscale.data.write_folder`` (8 shards).

Contenders, same batch size, same worker count, same files, one epoch each:
  shards        ShardLoader(TrainTransform, MaskCollate(random 75%))          -- the training path
  folder        ImageFolder + DataLoader(shuffle) with the *same* TrainTransform and a mask-adding collate
  folder_tv     ImageFolder + DataLoader with torchvision.transforms (RandomResizedCrop bicubic + flip +
                ToTensor + Normalize) and the same mask-adding collate: the "usual" torchvision recipe
Every sample is decoded, augmented (RandomResizedCrop scale 0.2-1 + flip), normalised, batched and gets
a random 75% patch mask.  Repeats are interleaved (the order rotates) and the reported figures are the
median over repeats of ``shards samples/s / folder samples/s`` (target >= 1.0) and of
``shards / folder_tv``.  "per worker" = samples/s / workers (wall clock, shared machine).

CPU time: both sets are also run in-process (num_workers=0, 1 thread) for shards and folder and timed in
*CPU seconds* (process_time, insensitive to other jobs on the box): samples per CPU-second = samples/s
per core, and a second shards/folder ratio that the machine's load barely moves.
CPU cores per A100 use the 224 px in-process ShardLoader rate.  Cores per A100 = (MAE ViT-L/16 img/s per A100 from ``mimscale bench plan --recipe
mae_vit_l16``, ~1,100 at 45% MFU) / (samples/s per core).

Run:   python benchmarks/loader_speed.py                      (~1.5 min)
       python benchmarks/loader_speed.py --images 20000 --large-images 2000 --workers 8 --batch 256
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ------------------------------------------------------------------------------------- data


from common import write_results  # noqa: E402


def garments(n: int, rng):
    """``n`` 28x28 uint8 images + labels: Fashion-MNIST if installed, else blobs."""
    import numpy as np

    from mimscale.data.shards import FASHION_MNIST_DIR, read_idx

    imgs = FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz"
    labels = FASHION_MNIST_DIR / "train-labels-idx1-ubyte.gz"
    if imgs.exists() and labels.exists():
        x, y = read_idx(imgs), read_idx(labels)
        idx = rng.permutation(len(x))[:n]
        return x[idx], y[idx], "fashion-mnist"
    yy, xx = np.mgrid[:28, :28]
    out = np.empty((n, 28, 28), np.uint8)
    for i in range(n):
        cy, cx, r = rng.uniform(9, 19), rng.uniform(9, 19), rng.uniform(5, 12)
        out[i] = np.clip(255 * (((yy - cy) ** 2 + (xx - cx) ** 2) < r * r) * rng.uniform(0.4, 1), 0, 255)
    return out, rng.integers(0, 10, n), "synthetic"


def make_tree(root: Path, n: int, large: bool, seed: int, px: int) -> dict:
    """Class-folder JPEG tree; returns facts about it (cached in root/info.json)."""
    import numpy as np
    from PIL import Image

    info_path = root / "info.json"
    if info_path.exists():
        info = json.loads(info_path.read_text())
        if info.get("n") == n and info.get("large") == large:
            return info
    rng = np.random.default_rng(seed)
    base, labels, source = garments(n, rng)
    total_bytes = total_px = 0
    for i in range(n):
        if large:
            w, h = int(rng.integers(333, 501)), int(rng.integers(333, 501))
        else:
            w = h = px
        g = Image.fromarray(base[i]).resize((w, h), Image.BICUBIC)
        arr = np.asarray(g, np.float32)[:, :, None] * rng.uniform(0.5, 1.0, 3)
        if large:  # photo-like texture: octaves of smooth noise; ~0.55 B/px, near ImageNet's ~110 KB at ~500x375
            for scale, amp in ((32, 40.0), (8, 30.0), (2, 30.0), (1, 20.0)):
                small = rng.normal(0, amp, (h // scale + 1, w // scale + 1, 3)).astype(np.float32)
                up = np.asarray(Image.fromarray(small[:, :, 0]).resize((w, h), Image.BILINEAR))
                arr += np.stack([up, np.roll(up, 7, 0), np.roll(up, 7, 1)], axis=-1)
            arr += rng.uniform(40, 120, 3)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
        d = root / "tree" / f"class_{int(labels[i]):02d}"
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"{i:06d}.jpg"
        img.save(path, quality=90)
        total_bytes += path.stat().st_size
        total_px += w * h
    info = {"n": n, "large": large, "source": source, "mean_kb": total_bytes / n / 1024, "mean_px": total_px / n}
    info_path.write_text(json.dumps(info))
    return info


def shard_tree(root: Path, n: int) -> Path:
    from mimscale.data.shards import write_folder

    return write_folder(root / "tree", root / "shards", shard_size=max(1, -(-n // 8)), workers=2, progress=False)


# ------------------------------------------------------------------------------------- contenders


class SeededTransform:
    """ImageFolder transform around our generator-driven TrainTransform: one fresh generator per sample
    (as the ShardLoader does), seeded from the worker's Python RNG (DataLoader seeds it per worker)."""

    def __init__(self, tf):
        self.tf = tf

    def __call__(self, img):
        import torch

        return self.tf(img, torch.Generator().manual_seed(random.getrandbits(62)))


class FolderMaskCollate:
    """``[(image, label)]`` -> ``{"image", "label", "mask"}`` with the objective's random masks."""

    def __init__(self, spec):
        self.spec = spec

    def __call__(self, samples):
        import torch

        batch = {"image": torch.stack([s[0] for s in samples]),
                 "label": torch.tensor([s[1] for s in samples], dtype=torch.long)}
        batch.update(self.spec.generate(len(samples), torch.Generator().manual_seed(random.getrandbits(62))))
        return batch


def make_contenders(root: Path, out_px: int, patch: int, batch: int, workers: int) -> dict:
    import torch
    from torch.utils.data import DataLoader
    from torchvision import datasets
    from torchvision import transforms as T

    from mimscale.data import ShardLoader, TrainTransform
    from mimscale.masking import MaskCollate, MaskSpec

    spec = MaskSpec("random", (out_px // patch) ** 2, 0.75)
    tf = TrainTransform(out_px, scale=(0.2, 1.0), hflip=True, mean=MEAN, std=STD)
    tv = T.Compose([T.RandomResizedCrop(out_px, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                    T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])
    shards = ShardLoader(str(root / "shards"), batch_size=batch, transform=tf, collate=MaskCollate(spec),
                         num_workers=workers, seed=0, shuffle_buffer=1000)
    kw = dict(batch_size=batch, shuffle=True, drop_last=True, num_workers=workers,
              collate_fn=FolderMaskCollate(spec), generator=torch.Generator().manual_seed(0))
    folder = DataLoader(datasets.ImageFolder(str(root / "tree"), transform=SeededTransform(tf)), **kw)
    folder_tv = DataLoader(datasets.ImageFolder(str(root / "tree"), transform=tv), **kw)
    return {"shards": shards, "folder": folder, "folder_tv": folder_tv}


def run_epoch(loader) -> tuple[int, float, float]:
    """(samples, wall seconds, CPU seconds of this process) for one full epoch."""
    n = 0
    w0, c0 = time.perf_counter(), time.process_time()
    for b in loader:
        assert b["mask"].shape[0] == b["image"].shape[0]
        n += b["image"].shape[0]
    return n, time.perf_counter() - w0, time.process_time() - c0


def interleaved(loaders: dict, repeats: int, metric: str) -> dict[str, list[float]]:
    """samples/s per repeat per contender; the order rotates each repeat. metric: 'wall' or 'cpu'."""
    names = list(loaders)
    run_epoch(loaders[names[0]])  # warm the page cache and imports once
    rates: dict[str, list[float]] = {k: [] for k in names}
    for r in range(repeats):
        for k in names[r % len(names):] + names[:r % len(names)]:
            n, wall, cpu = run_epoch(loaders[k])
            rates[k].append(n / (wall if metric == "wall" else cpu))
    return rates


def ratio_stats(a: list[float], b: list[float]) -> dict:
    r = [x / y for x, y in zip(a, b)]
    q = statistics.quantiles(r, n=4) if len(r) > 1 else [r[0]] * 3
    return {"median": statistics.median(r), "q1": q[0], "q3": q[2], "per_repeat": r}


def plan_img_s() -> float | None:
    """MAE ViT-L/16 img/s per A100 at 45% MFU from ``mimscale bench plan`` (None if it fails)."""
    try:
        out = subprocess.run([sys.executable, "-m", "mimscale.cli", "bench", "plan", "--recipe", "mae_vit_l16",
                              "--gpu", "a100-80gb", "--mfu", "0.45", "--json"],
                             capture_output=True, text=True, cwd=REPO, timeout=120, check=True).stdout
        return float(json.loads(out)["images_per_s_per_gpu"])
    except Exception:  # noqa: BLE001 - fall back to the documented figure
        return None


# ------------------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000, help="small JPEGs (default: %(default)s)")
    ap.add_argument("--px", type=int, default=64, help="side of the small JPEGs and of their crops (default: %(default)s)")
    ap.add_argument("--large-images", type=int, default=256, help="ImageNet-sized JPEGs (default: %(default)s)")
    ap.add_argument("--large-out", type=int, default=224, help="crop side for the large set (default: %(default)s)")
    ap.add_argument("--batch", type=int, default=64, help="default: %(default)s")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers for both (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved epochs per contender (default: %(default)s)")
    ap.add_argument("--cpu-repeats", type=int, default=3, help="in-process CPU-time epochs per contender and set "
                                                                   "(default: %(default)s)")
    ap.add_argument("--gpu-img-s", type=float, default=None,
                    help="img/s one A100 consumes (default: from `mimscale bench plan --recipe mae_vit_l16`, ~1,100)")
    ap.add_argument("--workdir", default="/tmp/mimscale_loader_bench", help="JPEG trees and shards (default: %(default)s)")
    ap.add_argument("--no-save", action="store_true", help="do not write benchmarks/results/*.json")
    args = ap.parse_args()

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    work = Path(args.workdir)
    sets = {"small": (work / f"small_{args.images}x{args.px}", args.images, False, args.px, 8),
            "large": (work / f"large_{args.large_images}", args.large_images, True, args.large_out, 16)}
    infos = {}
    t0 = time.time()
    for name, (root, n, large, _, _) in sets.items():
        root.mkdir(parents=True, exist_ok=True)
        infos[name] = make_tree(root, n, large, seed=1 if large else 0, px=args.px)
        shard_tree(root, n)
    print(f"data ready in {time.time() - t0:.1f} s under {work}: "
          + ", ".join(f"{k}: {v['n']} JPEGs, {v['mean_kb']:.1f} KB, {v['mean_px'] ** 0.5:.0f} px side ({v['source']})"
                      for k, v in infos.items()), flush=True)

    results: dict = {}
    for name, (root, n, large, out_px, patch) in sets.items():
        loaders = make_contenders(root, out_px, patch, args.batch, args.workers)
        rates = interleaved(loaders, args.repeats, "wall")
        results[name] = {"images": n, "out_px": out_px, "patch": patch, "samples_per_s": rates,
                         "median_samples_per_s": {k: statistics.median(v) for k, v in rates.items()},
                         "ratio_shards_over_folder": ratio_stats(rates["shards"], rates["folder"]),
                         "ratio_shards_over_folder_tv": ratio_stats(rates["shards"], rates["folder_tv"])}

    # samples per CPU-second, in-process (num_workers=0, 1 thread): the per-core rate, robust to other jobs
    cpu: dict = {}
    for name, (root, n, _, out_px, patch) in sets.items():
        inproc = make_contenders(root, out_px, patch, args.batch, 0)
        rates = interleaved({k: inproc[k] for k in ("shards", "folder")}, args.cpu_repeats, "cpu")
        cpu[name] = {"samples_per_cpu_s": rates, "median": {k: statistics.median(v) for k, v in rates.items()},
                     "ratio_shards_over_folder": ratio_stats(rates["shards"], rates["folder"])}
    cpu_rates = cpu["large"]["samples_per_cpu_s"]
    per_core = statistics.median(cpu_rates["shards"])
    gpu = args.gpu_img_s or plan_img_s() or 1100.0
    cores = gpu / per_core

    print(f"\nbatch {args.batch}, {args.workers} workers, {args.repeats} interleaved epochs per contender; "
          f"samples/s = decoded + RandomResizedCrop + flip + normalised + batched + masked")
    print(f"{'set':<18} {'contender':<10} {'samples/s':>10} {'per worker':>11}")
    for name, r in results.items():
        label = f"{name} {r['out_px']}px"
        for k, v in r["median_samples_per_s"].items():
            print(f"{label:<18} {k:<10} {v:>10.0f} {v / max(1, args.workers):>11.0f}")
            label = ""
    print("ratios (median over repeats, IQR):")
    met = True
    for name, r in results.items():
        a, b = r["ratio_shards_over_folder"], r["ratio_shards_over_folder_tv"]
        met &= a["median"] >= 1.0
        print(f"  {name:<6} shards/folder    {a['median']:.3f} ({a['q1']:.3f}-{a['q3']:.3f}) target >= 1.0: "
              f"{'OK' if a['median'] >= 1.0 else 'MISSED'}")
        print(f"  {name:<6} shards/folder_tv {b['median']:.3f} ({b['q1']:.3f}-{b['q3']:.3f})")
    print("in-process, 1 thread, samples per CPU-second (robust to the machine's load):")
    for name, c in cpu.items():
        r = c["ratio_shards_over_folder"]
        print(f"  {name:<6} shards {c['median']['shards']:>6.0f}  folder {c['median']['folder']:>6.0f}  "
              f"shards/folder {r['median']:.3f} ({r['q1']:.3f}-{r['q3']:.3f})")
    print(f"=> CPU cores per A100 for MAE ViT-L/16 at {gpu:,.0f} img/s: {cores:.1f} "
          f"({8 * cores:.0f} per 8-GPU node, before the main process and the trainer's own threads)")

    if not args.no_save:
        out = write_results("loader_speed", {
            "config": vars(args), "data": infos, "results": results,
            "cpu_time_in_process": cpu,
            "samples_per_s_per_core_224px": per_core, "a100_img_per_s": gpu, "cores_per_a100": cores,
            "target": "shards/folder >= 1.0", "met": met,
            "caveat": "shared, noisy 2-core machine: only the interleaved ratios are meaningful; per-core rate "
                      "from CPU time of one process (this CPU: no AVX-512), synthetic ImageNet-sized JPEGs",
        })
        print(f"wrote {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
