"""``mimscale teacher train-clip | fit-kmeans`` and ``mimscale data add-targets`` (plugged into mimscale.cli)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DESCRIPTION = """\
Frozen teachers for DTM / MaPeT:
  mimscale teacher train-clip clip.pt                      a small real CLIP on Fashion-MNIST captions
  mimscale teacher fit-kmeans SHARDS --teacher clip.pt --k 8192 --out km.pt   k-CLIP tokenizer (MaPeT)
  torchrun --nproc_per_node 8 -m mimscale.cli teacher fit-kmeans ...        one process per GPU (srun too)"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "teacher",
        help="train a small CLIP teacher / fit the k-CLIP tokenizer",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tsub = p.add_subparsers(dest="teacher_cmd", required=True, metavar="ACTION")

    tc = tsub.add_parser("train-clip", help="train a tiny open_clip CLIP on Fashion-MNIST + class captions")
    tc.add_argument("out", metavar="OUT.pt", help="checkpoint to write (the result goes beside it as OUT.json)")
    tc.add_argument("--data-root", default="~/.cache/mimscale/data", help="where Fashion-MNIST shards live/are made")
    tc.add_argument("--train", default="fashion-mnist:train", help="training shards (default: Fashion-MNIST train)")
    tc.add_argument("--test", default="fashion-mnist:test", help="zero-shot test shards (default: Fashion-MNIST test)")
    tc.add_argument("--samples", type=int, default=None, help="training images seen (default: 60000, one epoch)")
    tc.add_argument("--batch-size", type=int, default=None)
    tc.add_argument("--lr", type=float, default=None)
    tc.add_argument("--seed", type=int, default=0)
    tc.add_argument("--workers", type=int, default=1, help="loader worker processes")
    tc.add_argument("--test-samples", type=int, default=None, help="evaluate on the first N test images only")
    tc.set_defaults(run=_run_train_clip)

    km = tsub.add_parser("fit-kmeans", help="streaming k-means over CLIP patch features (k-CLIP tokenizer)")
    km.add_argument("shards", metavar="SHARDS", help="shard directory (or pattern) to fit on")
    km.add_argument("--teacher", required=True, metavar="CLIP.pt", help="CLIP teacher file")
    km.add_argument("--arch", default=None, help="open_clip architecture of a plain open_clip checkpoint")
    km.add_argument("--k", type=int, default=8192, help="number of centroids (<= 65536)")
    km.add_argument("--out", required=True, metavar="KM.pt")
    km.add_argument("--iters", type=int, default=10, help="streaming Lloyd passes over the data after the init")
    km.add_argument(
        "--init-sample",
        type=int,
        default=None,
        help="feature vectors kept for the k-means++ init (default: min(max(20k, 20000), 200000))",
    )
    km.add_argument("--max-images", type=int, default=None, help="use only the first N images of SHARDS")
    km.add_argument("--image-size", type=int, default=None, help="center-crop size (default: the teacher's)")
    km.add_argument("--mean", type=float, nargs="+", default=None, help="normalisation (default: the teacher's)")
    km.add_argument("--std", type=float, nargs="+", default=None)
    km.add_argument("--l2-normalize", action="store_true", help="cluster L2-normalised features (cosine k-means)")
    km.add_argument("--batch-size", type=int, default=256, help="images per teacher forward")
    km.add_argument("--workers", type=int, default=1, help="loader worker processes")
    km.add_argument("--seed", type=int, default=0)
    km.add_argument("--device", default="auto", help="auto (CUDA if present) | cpu | cuda | cuda:N; one per rank")
    km.add_argument(
        "--cache",
        default=None,
        metavar="DIR",
        help="keep the teacher features here (memory-mapped, one file per rank) and reuse them on a "
        "rerun (default: OUT.cache, removed when done)",
    )
    km.add_argument(
        "--cache-dtype",
        choices=("float16", "float32"),
        default="float16",
        help="dtype of the cached features (float16 halves the disk; float32 = exact)",
    )
    km.add_argument("--chunk-rows", type=int, default=65536, help="feature rows per k-means step on the device")
    km.set_defaults(run=_run_fit_kmeans)


def add_targets_parser(dsub) -> None:
    """``mimscale data add-targets`` (plugged into the ``data`` subcommands; :mod:`.targets` does the work and is
    imported only when it runs, so ``mimscale --help`` stays free of numpy and torch)."""
    p = dsub.add_parser("add-targets", help="copy shards adding cached CLIP features or k-CLIP codes per sample")
    p.add_argument("src", metavar="SRC_SHARDS", help="source shard directory (or pattern)")
    p.add_argument("--teacher", required=True, metavar="CLIP.pt")
    p.add_argument("--arch", default=None, help="open_clip architecture of a plain open_clip checkpoint")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument(
        "--kind",
        choices=("codes", "features"),  # the keys of data.targets.FIELD_NAMES (a test checks)
        default="features",
        help="features -> clip.npy float16 [N, D]; codes -> kclip.npy uint16 [N] (needs --kmeans)",
    )
    p.add_argument("--kmeans", default=None, metavar="KM.pt", help="k-means file of mimscale teacher fit-kmeans")
    p.add_argument("--image-size", type=int, default=None, help="centre-crop size (default: the teacher's)")
    p.add_argument("--grid", type=int, default=None, help="token grid side (default: image size // teacher patch)")
    p.add_argument("--crop-pct", type=float, default=1.0, help="shorter side -> floor(size / crop_pct), then crop")
    p.add_argument("--mean", type=float, nargs="+", default=None, help="normalisation (default: the teacher's)")
    p.add_argument("--std", type=float, nargs="+", default=None)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument(
        "--workers", type=int, default=1, help="CPU: processes sharing this rank's shards; CUDA: image-decoding threads"
    )
    p.add_argument(
        "--device",
        default="auto",
        help="auto (CUDA if present) | cpu | cuda | cuda:N; one per rank "
        "(torchrun --nproc_per_node 8 -m mimscale.cli data add-targets ...)",
    )
    p.set_defaults(run=_run_add_targets)


def _run_add_targets(args) -> int:
    from .targets import run

    return run(args)


def _run_train_clip(args) -> int:
    from ..data import builtin
    from .train_clip import TrainCLIPConfig, train_clip

    cfg = TrainCLIPConfig(seed=args.seed, num_workers=args.workers, test_samples=args.test_samples)
    for name in ("samples", "batch_size", "lr"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    train = builtin.resolve(args.train, args.data_root)
    test = builtin.resolve(args.test, args.data_root)
    res = train_clip(args.out, train, test, cfg)
    print(
        f"zero-shot top-1 on {res['test_samples']} test images: {res['zero_shot_top1']:.2f}% "
        f"(chance {res['chance']:.0f}%), trained {res['train_samples']} images in {res['train_seconds']:.0f} s"
    )
    print(f"checkpoint: {res['checkpoint']}")
    print(f"result:     {Path(res['checkpoint']).with_suffix('.json')}")
    return 0


def _run_fit_kmeans(args) -> int:
    from .kmeans import fit_kmeans_shards

    info = fit_kmeans_shards(
        args.shards,
        args.teacher,
        k=args.k,
        out=args.out,
        arch=args.arch,
        iters=args.iters,
        init_sample=args.init_sample,
        max_images=args.max_images,
        image_size=args.image_size,
        mean=args.mean,
        std=args.std,
        l2_normalize=args.l2_normalize,
        batch_size=args.batch_size,
        num_workers=args.workers,
        seed=args.seed,
        device=args.device,
        cache=args.cache,
        cache_dtype=args.cache_dtype,
        chunk_rows=args.chunk_rows,
    )
    if "sha256" in info:  # rank 0 (the one that wrote the file)
        print(
            json.dumps(
                {
                    k: info[k]
                    for k in (
                        "k",
                        "dim",
                        "points",
                        "inertia",
                        "empty_clusters",
                        "seconds",
                        "encode_seconds",
                        "ranks",
                        "device",
                    )
                }
            )
        )
        print(f"k-means: {args.out}")
    return 0
