"""Loader speed per CPU core on real photographs at ImageNet-like size: our decode paths vs torchvision.

Data (made once under --workdir, reused by later runs): --images JPEGs of 500x375 (or 375x500), quality 90,
cut from the colour photographs scikit-image ships (``skimage.data``: astronaut, chelsea, coffee, rocket,
hubble_deep_field, immunohistochemistry, retina, stereo_motorcycle left/right; one class per photo) -- a random
crop of 35-100 % of the photo's area, resized (bicubic) and randomly flipped; no synthetic images. The tree is
sharded with ``mimscale.data.write_folder`` (8 shards), and once more with ``max_side=--max-side`` (pre-resized
shards, FFCV's ``max_resolution`` idea).

Contenders: one epoch each, batch --batch, RandomResizedCrop 224 (scale 0.2-1, bicubic) + flip + normalise +
a random 75 % patch mask (MaskCollate), the same JPEG files:

  tv_folder     torchvision ImageFolder + DataLoader + torchvision.transforms (RandomResizedCrop, flip, ToTensor,
                Normalize) and the same mask collate -- the usual torchvision recipe
  cpu_before    ShardLoader + TrainTransform(fast=False): our CPU path before reduced decode (full decode, PIL
                crop + resize + flip, then the normalising copy)
  cpu           ShardLoader + TrainTransform(): reduced-size DCT decode when the crop allows it, one fused crop +
                resize (torch's uint8 bicubic-AA kernel), the flip inside the normalising copy
  cpu_preresized  as cpu, on the pre-resized shards
  device_host   ShardLoader(decode="device"): only what the workers do on that path (read the tar, parse the
                JPEG header, draw the crop boxes, pack the bytes, masks); decoding happens on the accelerator
  device_on_cpu ShardLoader(decode="device") + to_device("cpu"): the device code run on the CPU (information:
                the same tensors as on a GPU, but the CPU does the decoding)

Timing: CPU seconds (``os.times``: this process + its reaped children, i.e. the DataLoader workers of an epoch),
so samples per CPU-second = samples/s per core, and the figure barely moves with other jobs on the box. Two
settings: in-process (``num_workers=0``, the work alone) and ``--workers`` worker processes (adds what moving
batches between processes costs). Repeats are interleaved (the order rotates); ratios are medians of the
per-repeat ratios. Targets: cpu / tv_folder >= 2 (per core, same JPEGs); device_host <= 0.25 cores per 1,000
samples/s. "cores per GPU" = img/s one H100 consumes (MAE ViT-L/16 at 50 % MFU, from ``mimscale bench plan``)
/ samples per CPU-second.

Run:   python benchmarks/loader_speed.py            (~5 min on 2 loaded cores; first run +10 s to make data)
       python benchmarks/loader_speed.py --images 2000 --epoch-passes 1 --repeats 5 --workers 4
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

from common import write_results

REPO = Path(__file__).resolve().parent.parent
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "motorcycle_left",
    "motorcycle_right",
)


# ------------------------------------------------------------------------------------- data


def photo(name: str):
    import skimage.data as sd

    if name.startswith("motorcycle_"):
        left, right, _ = sd.stereo_motorcycle()
        return left if name.endswith("left") else right
    return getattr(sd, name)()


def make_tree(root: Path, n: int, seed: int, quality: int = 90) -> dict:
    """``root/tree/<photo>/<i>.jpg``: ``n`` JPEGs of 500x375 / 375x500 cut from skimage's photographs."""
    import numpy as np
    from PIL import Image

    info_path = root / "info.json"
    if info_path.exists():
        info = json.loads(info_path.read_text())
        if info.get("n") == n and info.get("quality") == quality:
            return info
    rng = np.random.default_rng(seed)
    sources = [Image.fromarray(photo(p)).convert("RGB") for p in PHOTOS]
    total = 0
    for i in range(n):
        c = int(rng.integers(len(PHOTOS)))
        src = sources[c]
        w, h = (500, 375) if rng.random() < 0.75 else (375, 500)
        frac = rng.uniform(0.35, 1.0)  # area of the photo the image shows
        cw = min(src.width, int(round((frac * src.width * src.height * w / h) ** 0.5)))
        ch = min(src.height, int(round(cw * h / w)))
        cw = int(round(ch * w / h))
        left, top = int(rng.integers(0, src.width - cw + 1)), int(rng.integers(0, src.height - ch + 1))
        img = src.resize((w, h), Image.Resampling.BICUBIC, box=(left, top, left + cw, top + ch))
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        d = root / "tree" / PHOTOS[c]
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"{i:06d}.jpg"
        img.save(path, quality=quality)
        total += path.stat().st_size
    info = {
        "n": n,
        "quality": quality,
        "source": "skimage.data photographs: " + ", ".join(PHOTOS),
        "size": "500x375 (75 %) / 375x500",
        "mean_kb": total / n / 1024,
    }
    info_path.write_text(json.dumps(info))
    return info


def shard_tree(root: Path, n: int, max_side: int | None) -> Path:
    from mimscale.data.shards import write_folder

    out = root / ("shards" if max_side is None else f"shards_max{max_side}")
    return write_folder(
        root / "tree", out, shard_size=max(1, -(-n // 8)), workers=2, progress=False, max_side=max_side, quality=90
    )


# ------------------------------------------------------------------------------------- contenders


class FolderMaskCollate:
    """``[(image, label)]`` -> ``{"image", "label", "mask"}`` with the objective's random masks."""

    def __init__(self, spec):
        self.spec = spec

    def __call__(self, samples):
        import torch

        batch = {
            "image": torch.stack([s[0] for s in samples]),
            "label": torch.tensor([s[1] for s in samples], dtype=torch.long),
        }
        batch.update(self.spec.generate(len(samples), torch.Generator().manual_seed(random.getrandbits(62))))
        return batch


def make_contenders(
    root: Path,
    shards: Path,
    small: Path,
    out_px: int,
    patch: int,
    batch: int,
    workers: int,
    epoch: int,
    device: str = "cpu",
) -> dict:
    import torch
    from torch.utils.data import DataLoader, RandomSampler
    from torchvision import datasets
    from torchvision import transforms as T

    from mimscale.data import ShardLoader, TrainTransform
    from mimscale.masking import MaskCollate, MaskSpec

    spec = MaskSpec("random", (out_px // patch) ** 2, 0.75)
    tv = T.Compose(
        [
            T.RandomResizedCrop(out_px, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(MEAN, STD),
        ]
    )
    common = dict(
        batch_size=batch,
        collate=MaskCollate(spec),
        num_workers=workers,
        seed=0,
        shuffle_buffer=1000,
        samples_per_epoch=epoch,
    )  # > the images: the streams cycle, as the sampler below does

    def ours(src, decode="cpu", **tf):
        return ShardLoader(
            str(src),
            transform=TrainTransform(out_px, scale=(0.2, 1.0), mean=MEAN, std=STD, **tf),
            decode=decode,
            **common,
        )

    ds = datasets.ImageFolder(str(root / "tree"), transform=tv)
    folder = DataLoader(
        ds,
        batch_size=batch,
        sampler=RandomSampler(ds, num_samples=epoch, generator=torch.Generator().manual_seed(0)),
        drop_last=True,
        num_workers=workers,
        collate_fn=FolderMaskCollate(spec),
    )
    dev = ours(shards, decode="device")
    out = {
        "tv_folder": folder,
        "cpu_before": ours(shards, fast=False),
        "cpu": ours(shards),
        "cpu_preresized": ours(small),
        "device_host": dev,
        "device_on_cpu": ("cpu", dev),
    }
    if device != "cpu":  # on a GPU node: the whole device path, host CPU seconds per sample
        out[f"device_on_{device.split(':')[0]}"] = (device, dev)
    return out


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def run_epoch(contender) -> tuple[int, float]:
    """(samples, CPU seconds of this process and the workers it reaped) for one full epoch."""
    device, loader = contender if isinstance(contender, tuple) else (None, contender)
    n = 0
    c0 = cpu_seconds()
    for b in loader:
        if device is not None:
            b = loader.to_device(b, device)
        assert b["mask"].shape[0] == b["label"].shape[0]
        n += b["label"].shape[0]
    if device is not None and device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
    return n, cpu_seconds() - c0


def interleaved(contenders: dict, repeats: int) -> dict[str, list[float]]:
    """samples per CPU-second per repeat per contender; the order rotates each repeat."""
    names = list(contenders)
    for k in names:
        run_epoch(contenders[k])  # warm the page cache, imports and allocators once
    rates: dict[str, list[float]] = {k: [] for k in names}
    for r in range(repeats):
        for k in names[r % len(names) :] + names[: r % len(names)]:
            n, cpu = run_epoch(contenders[k])
            rates[k].append(n / cpu)
    return rates


def marginal_device_host(
    shards: Path, out_px: int, patch: int, batch: int, workers: int, images: int, repeats: int
) -> dict:
    """Steady-state worker-side cost of the device path with worker processes: (samples of a long epoch - samples
    of a one-batch-per-worker epoch) / (CPU seconds of the long one - the short one), so that starting the
    workers (once per epoch: ~0.1 CPU-s, nothing next to a real epoch of ~10^6 images) drops out."""
    from mimscale.data import ShardLoader, TrainTransform
    from mimscale.masking import MaskCollate, MaskSpec

    def ld(epoch):
        return ShardLoader(
            str(shards),
            batch_size=batch,
            transform=TrainTransform(out_px, mean=MEAN, std=STD),
            collate=MaskCollate(MaskSpec("random", (out_px // patch) ** 2, 0.75)),
            decode="device",
            num_workers=workers,
            seed=0,
            shuffle_buffer=1000,
            samples_per_epoch=epoch,
        )

    short, long = ld(batch * workers), ld(16 * images)
    run_epoch(short)
    rates, startup = [], []
    for _ in range(repeats):
        n1, c1 = run_epoch(short)
        n2, c2 = run_epoch(long)
        rates.append((n2 - n1) / max(c2 - c1, 1e-9))
        startup.append(c1 - n1 / rates[-1])
    return {
        "samples_per_cpu_s": rates,
        "median": statistics.median(rates),
        "startup_cpu_s_per_epoch": statistics.median(startup),
        "cores_per_1000_samples_s": 1000.0 / statistics.median(rates),
    }


def ratio_stats(a: list[float], b: list[float]) -> dict:
    r = [x / y for x, y in zip(a, b)]
    q = statistics.quantiles(r, n=4) if len(r) > 1 else [r[0]] * 3
    return {"median": statistics.median(r), "q1": q[0], "q3": q[2], "per_repeat": r}


def reduced_share(shards: Path, out_px: int, n: int = 2000) -> dict:
    """How often the crop allows a reduced DCT decode (s >= 2) at ``out_px`` for these images' sizes."""
    import torch
    from PIL import Image

    from mimscale.data import TrainTransform
    from mimscale.data.transforms import reduced_decode_scale

    tree = shards.parent / "tree"
    sizes = [Image.open(p).size for p in sorted(tree.rglob("*.jpg"))[:50]]
    out = {}
    for px in sorted({out_px, 160, 128, 96}):
        tf, hits, g = TrainTransform(px), 0, torch.Generator().manual_seed(0)
        for i in range(n):
            w, h = sizes[i % len(sizes)]
            top, left, bh, bw, _ = tf.draw(w, h, g)
            hits += reduced_decode_scale(w, h, bh, bw, px, px) > 1
        out[str(px)] = hits / n
    return out


def plan_img_s(gpu: str, mfu: float) -> float | None:
    """MAE ViT-L/16 img/s per GPU from ``mimscale bench plan`` (None if it fails)."""
    try:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "mimscale.cli",
                "bench",
                "plan",
                "--recipe",
                "mae_vit_l16",
                "--gpu",
                gpu,
                "--mfu",
                str(mfu),
                "--json",
            ],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=120,
            check=True,
        ).stdout
        return float(json.loads(out)["images_per_s_per_gpu"])
    except Exception:
        return None


# ------------------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=256, help="JPEGs in the tree (default: %(default)s)")
    ap.add_argument("--out", type=int, default=224, help="crop side (default: %(default)s)")
    ap.add_argument("--patch", type=int, default=16, help="patch size of the mask (default: %(default)s)")
    ap.add_argument(
        "--max-side", type=int, default=320, help="longer side of the pre-resized shards (default: %(default)s)"
    )
    ap.add_argument("--batch", type=int, default=64, help="default: %(default)s")
    ap.add_argument(
        "--workers",
        type=int,
        default=2,
        help="worker processes of the second setting (default: %(default)s; 0: skip it)",
    )
    ap.add_argument("--repeats", type=int, default=3, help="interleaved epochs per contender (default: %(default)s)")
    ap.add_argument(
        "--epoch-passes",
        type=int,
        default=4,
        help="an epoch = this many passes over the images, so that starting the workers (once per "
        "epoch) does not dominate a tiny data set (default: %(default)s)",
    )
    ap.add_argument("--gpu", default="h100-80gb", help="GPU for 'cores per GPU' (default: %(default)s)")
    ap.add_argument("--mfu", type=float, default=0.5, help="MFU for 'cores per GPU' (default: %(default)s)")
    ap.add_argument(
        "--workdir", default="/tmp/mimscale_loader_bench_photos", help="JPEG tree and shards (default: %(default)s)"
    )
    ap.add_argument(
        "--device",
        default="cpu",
        help="also run the whole device path on this device, e.g. cuda "
        "(host CPU-seconds per sample; default: %(default)s = skip)",
    )
    ap.add_argument("--no-save", action="store_true", help="do not write benchmarks/results/*.json")
    args = ap.parse_args()

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    root = Path(args.workdir) / f"photos_{args.images}"
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    info = make_tree(root, args.images, seed=0)
    shards, small = shard_tree(root, args.images, None), shard_tree(root, args.images, args.max_side)
    from mimscale.data import read_manifest

    info["preresized"] = {k: read_manifest(small).get(k) for k in ("max_side", "quality", "resized")}
    print(
        f"data ready in {time.time() - t0:.1f} s under {root}: {info['n']} JPEGs, {info['size']}, "
        f"{info['mean_kb']:.1f} KB on average ({info['source']})",
        flush=True,
    )

    settings = {"in_process": 0, **({f"{args.workers}_workers": args.workers} if args.workers else {})}
    results: dict = {}
    for name, workers in settings.items():
        rates = interleaved(
            make_contenders(
                root,
                shards,
                small,
                args.out,
                args.patch,
                args.batch,
                workers,
                args.epoch_passes * args.images,
                args.device,
            ),
            args.repeats,
        )
        med = {k: statistics.median(v) for k, v in rates.items()}
        results[name] = {
            "workers": workers,
            "samples_per_cpu_s": rates,
            "median": med,
            "ratios_over_tv_folder": {k: ratio_stats(rates[k], rates["tv_folder"]) for k in rates if k != "tv_folder"},
            "device_host_cores_per_1000_samples_s": 1000.0 / med["device_host"],
        }
    steady = (
        marginal_device_host(shards, args.out, args.patch, args.batch, args.workers, args.images, args.repeats)
        if args.workers
        else None
    )
    share = reduced_share(shards, args.out)
    gpu_img_s = plan_img_s(args.gpu, args.mfu) or 3900.0

    print(
        f"\nsamples per CPU-second (= samples/s per core), batch {args.batch}, {args.out} px crops, "
        f"{args.repeats} interleaved epochs of {args.epoch_passes} x {args.images} images; ratios: median (IQR) "
        "over repeats"
    )
    head = f"{'contender':<16}" + "".join(f"{s:>30}" for s in settings)
    print(head)
    met = {}
    for k in results["in_process"]["median"]:
        row = f"{k:<16}"
        for s in settings:
            r = results[s]
            v = r["median"][k]
            if k == "tv_folder":
                row += f"{v:>12.0f}{'':>18}"
            else:
                q = r["ratios_over_tv_folder"][k]
                row += f"{v:>12.0f}  {q['median']:5.2f}x ({q['q1']:.2f}-{q['q3']:.2f})"
        print(row)
    for s, r in results.items():
        cpu_ratio = r["ratios_over_tv_folder"]["cpu"]["median"]
        host = r["device_host_cores_per_1000_samples_s"]
        met[s] = {"cpu_over_tv_folder>=2": cpu_ratio >= 2.0, "device_host_cores_per_1000<=0.25": host <= 0.25}
        print(
            f"{s:<12} cpu / tv_folder = {cpu_ratio:.2f}x (target >= 2: {'MET' if cpu_ratio >= 2 else 'MISSED'}); "
            f"device path host work = {host:.3f} cores per 1,000 samples/s (target <= 0.25: "
            f"{'MET' if host <= 0.25 else 'MISSED'})"
        )
    if steady:
        print(
            f"device path, {args.workers} workers, steady state (worker start-up of "
            f"{steady['startup_cpu_s_per_epoch']:.2f} CPU-s per epoch taken out): "
            f"{steady['median']:.0f} samples per CPU-second = {steady['cores_per_1000_samples_s']:.3f} cores per "
            f"1,000 samples/s (target <= 0.25: {'MET' if steady['cores_per_1000_samples_s'] <= 0.25 else 'MISSED'})"
        )
    print(
        f"share of {args.out} px crops whose box allows a reduced DCT decode on these images: "
        + ", ".join(f"{px} px {100 * v:.0f}%" for px, v in share.items())
    )
    cores = {}
    last = results[list(settings)[-1]]["median"]
    print(
        f"CPU cores per {args.gpu} the loader needs for MAE ViT-L/16 at {args.mfu:.0%} MFU ({gpu_img_s:,.0f} img/s), "
        f"from the {list(settings)[-1]} rates:"
    )
    for k in ("tv_folder", "cpu_before", "cpu", "cpu_preresized", "device_host"):
        cores[k] = gpu_img_s / last[k]
        print(f"  {k:<16} {cores[k]:5.1f}")
    if steady:
        cores["device_host_steady_state"] = gpu_img_s / steady["median"]
        print(f"  {'device_host, steady state':<16} {cores['device_host_steady_state']:5.1f}")

    if not args.no_save:
        out = write_results(
            "loader_speed",
            {
                "config": vars(args),
                "data": info,
                "results": results,
                "reduced_decode_share": share,
                "device_host_steady_state": steady,
                "gpu_img_per_s": gpu_img_s,
                "cores_per_gpu": cores,
                "met": met,
                "targets": {
                    "cpu_over_tv_folder": ">= 2.0 samples per CPU-second",
                    "device_host_cores_per_1000_samples_s": "<= 0.25",
                },
                "caveat": "shared 2-core machine (no AVX-512): CPU-second rates; the device path's decode runs on the "
                "GPU and is not measured here (no GPU on this machine); device_on_cpu is the same code on CPU",
            },
        )
        print(f"wrote {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
