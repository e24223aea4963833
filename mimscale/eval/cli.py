"""`mimscale eval knn|linear|finetune SOURCE --data TRAIN --test TEST [key=value ...]` (plugged into mimscale.cli)."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

DESCRIPTION = """\
Evaluate a pre-trained encoder on labelled shard directories (written by `mimscale data ...`).
SOURCE is a `mimscale pretrain` run directory (geometry and normalisation from its config.yaml, weights
from encoder.safetensors) or an exported encoder .safetensors file (geometry read from its tensors;
--arch etc. are checked against it). Results are printed and written as JSON (RUN_DIR/eval/<kind>.json),
and eval/linear_top1 / eval/finetune_top1 are appended to the run's metrics.jsonl for `mimscale report`.

  knn       weighted kNN (cosine, k=20, T=0.07) on frozen features      knobs: k, temperature, pool, ...
  linear    linear probe (BatchNorm + Linear, LARS/SGD) via accelerate  knobs: see mimscale/eval/linear.py
            accelerate launch --multi_gpu --num_processes 2 -m mimscale.cli eval linear RUN ...  (CPU too)
  finetune  MAE fine-tuning recipe through the DeepSpeed engine         recipe: --recipe finetune_vit_b16
            (default by arch: finetune_vit_{b16,l16,h14}); overrides like train.epochs=10 finetune.mixup=0

  mimscale eval linear runs/tiny_cpu --data DIR/train --test DIR/test epochs=20 batch_size=256 optimizer=sgd"""


@dataclass
class KNNConfig:
    # None: what the encoder's run recorded (its config.yaml: eval.knn_k / knn_temperature / pool), else the
    # pre-training defaults (mimscale.config.EvalConfig): the same kNN as in training
    k: int | None = None
    temperature: float | None = None
    pool: Literal["cls", "mean"] | None = None
    num_classes: int | None = None
    train_samples: int | None = None
    test_samples: int | None = None
    batch_size: int = 256
    num_workers: int = 2
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # encoder autocast: auto = bf16 on CUDA, else fp32


def _options(p: argparse.ArgumentParser, suppress: bool = False) -> None:
    d: dict[str, Any] = {"default": argparse.SUPPRESS} if suppress else {}
    p.add_argument(
        "--data",
        metavar="TRAIN_SHARDS",
        help="labelled training shard directory (or built-in name, e.g. fashion-mnist:train)",
        **d,
    )
    p.add_argument("--test", metavar="TEST_SHARDS", help="labelled test shard directory", **d)
    p.add_argument("--arch", help="with a .safetensors SOURCE: expected arch (checked)", **d)
    p.add_argument("--img-size", type=int, help="evaluate at this image size (position embeddings resampled)", **d)
    p.add_argument("--patch-size", type=int, help="expected patch size (checked)", **d)
    p.add_argument("--in-chans", type=int, help="expected input channels (checked)", **d)
    p.add_argument("--recipe", help="finetune: recipe name or YAML (default: by arch)", **d)
    p.add_argument(
        "--precision",
        choices=("auto", "bf16", "fp16", "fp32"),
        help="knn/linear: autocast of the encoder's forward (default auto: bf16 on CUDA, fp32 elsewhere; "
        "fp32 turns it off); same as the knob precision=...",
        **d,
    )
    p.add_argument("--out", help="result JSON path (default: RUN_DIR/eval/<kind>.json)", **d)
    p.add_argument("--out-dir", help="finetune: where the model and its logs go (default: RUN_DIR/eval/finetune)", **d)
    p.add_argument(
        "--data-root",
        default=argparse.SUPPRESS if suppress else "~/.cache/mimscale/data",
        help="where built-in data sets are converted to shards",
    )


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="kNN / linear probe / fine-tune a pre-trained encoder",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("kind", choices=("knn", "linear", "finetune"))
    p.add_argument("source", metavar="SOURCE", help="run directory or exported encoder .safetensors")
    _options(p)
    # options may also follow SOURCE, mixed with key=value overrides: parsed again in run()
    p.add_argument("rest", nargs=argparse.REMAINDER, help="key=value overrides (and options)")
    p.set_defaults(run=run)


def _knobs(cls, overrides: list[str]):
    """A knob dataclass from ``key=value`` strings (typed and checked like the YAML config)."""
    from ..config import from_dict, parse_override
    from ..errors import ConfigError

    raw = {}
    for item in overrides:
        keys, value = parse_override(item)
        if len(keys) != 1:
            raise ConfigError(f"override '{item}': {cls.__name__} knobs have no sections (e.g. epochs=20)")
        raw[keys[0]] = value
    return from_dict(cls, raw)


def run(args) -> int:
    from ..data import builtin
    from ..errors import ConfigError
    from .results import record
    from .source import load_source

    again = argparse.ArgumentParser(prog=f"mimscale eval {args.kind}", add_help=False)
    _options(again, suppress=True)
    again.add_argument("overrides", nargs="*")
    ns = again.parse_intermixed_args(args.rest)
    for k, v in vars(ns).items():
        setattr(args, k, v)
    if not args.data or not args.test:
        raise ConfigError("pass the labelled shard directories: --data TRAIN_SHARDS --test TEST_SHARDS")
    train_dir, test_dir = (builtin.resolve(s, args.data_root) for s in (args.data, args.test))
    source = load_source(args.source, args.arch, args.img_size, args.patch_size, args.in_chans)
    if args.kind == "finetune":
        if getattr(args, "precision", None):
            raise ConfigError("--precision is for knn / linear; a fine-tune sets train.precision=... in its recipe")
        return _finetune(args, source, train_dir, test_dir)

    import torch
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    from .. import dist

    d = dist.detect()
    dist.export(d)
    torch.set_num_threads(dist.configure_threads(d))
    dist.bind_device(d)  # this rank's GPU current (and LOCAL_RANK its ordinal) before accelerate picks a device
    acc = Accelerator(
        cpu=dist.accelerator_name() == "cpu", dataloader_config=DataLoaderConfiguration(split_batches=True)
    )
    if getattr(args, "precision", None):  # --precision wins over a precision=... knob
        args.overrides = [*args.overrides, f"precision={args.precision}"]
    if args.kind == "knn":
        cfg = _knobs(KNNConfig, args.overrides)
        where = recorded_knn(cfg, source)
        if acc.is_main_process:
            print(f"knn: k={cfg.k}, temperature={cfg.temperature}, pool={cfg.pool} ({where})", flush=True)
        result = _knn(source, train_dir, test_dir, cfg, acc.device, acc.process_index, acc.num_processes)
    else:
        from .linear import LinearConfig, linear_probe

        cfg = _knobs(LinearConfig, args.overrides)
        result = linear_probe(
            source.encoder,
            train_dir,
            test_dir,
            cfg,
            acc,
            img_size=source.img_size,
            in_chans=source.in_chans,
            mean=cfg.mean or source.mean,
            std=cfg.std or source.std,
        )
    from ..config import to_dict

    result["config"] = to_dict(cfg)
    if acc.is_main_process:
        metrics = {f"eval/{args.kind}_top1": result["top1"]}
        path = record(source, args.kind, result, metrics if args.kind == "linear" else {}, args.out)
        print(
            f"{args.kind} top-1: {result['top1']:.2f}% (best {result.get('best_top1', result['top1']):.2f}%) "
            f"on {result['test_samples']} test images -> {path}",
            flush=True,
        )
    acc.wait_for_everyone()
    acc.end_training()
    return 0


def recorded_knn(cfg: KNNConfig, source) -> str:
    """Fill the kNN knobs left unset from the encoder's run (``config.yaml``: ``eval.knn_k``,
    ``eval.knn_temperature``, ``eval.pool``), else from the pre-training defaults; says where they came from."""
    import yaml

    from ..config import EvalConfig

    recorded: dict[str, Any] = {}
    if source.run_dir is not None:
        try:
            recorded = (yaml.safe_load((source.run_dir / "config.yaml").read_text()) or {}).get("eval") or {}
        except (OSError, yaml.YAMLError):
            recorded = {}
    base = EvalConfig()
    unset = [k for k in ("k", "temperature", "pool") if getattr(cfg, k) is None]
    for knob, key in (("k", "knn_k"), ("temperature", "knn_temperature"), ("pool", "pool")):
        if getattr(cfg, knob) is None:
            setattr(cfg, knob, recorded.get(key, getattr(base, key)))
    if not unset:
        return "as given"
    return "the run's recorded choice" if recorded else "the pre-training defaults; the file records none"


def _knn(source, train_dir, test_dir, cfg: KNNConfig, device, rank: int, world: int) -> dict:
    from ..data.epoch import capped_eval_loader
    from ..data.transforms import EvalTransform
    from .knn import KNNEvaluator
    from .source import num_classes

    tf = EvalTransform(
        source.img_size, mean=cfg.mean or source.mean, std=cfg.std or source.std, in_chans=source.in_chans
    )
    train_loader, test_loader = (
        capped_eval_loader(
            src,
            cap,
            batch_size=cfg.batch_size,
            transform=tf,
            rank=rank,
            world_size=world,
            num_workers=cfg.num_workers,
        )
        for src, cap in ((train_dir, cfg.train_samples), (test_dir, cfg.test_samples))
    )
    ev = KNNEvaluator(
        train_loader,
        test_loader,
        num_classes=num_classes(train_dir, cfg.num_classes),
        k=cast(int, cfg.k),
        temperature=cast(float, cfg.temperature),
        pool=cast(str, cfg.pool),
        precision=cast(str, cfg.precision),
    )
    res = ev(source.encoder.to(device), device)
    return {
        "top1": res["eval/knn_top1"],
        "train_samples": int(res["eval/knn_bank"]),
        "test_samples": int(res["eval/knn_queries"]),
        "processes": world,
    }


def _finetune(args, source, train_dir: str, test_dir: str) -> int:
    from .. import dist
    from .finetune import RECIPE_BY_ARCH, finetune, fit_batch, load_recipe
    from .results import record

    recipe = load_recipe(args.recipe, args.overrides, source)
    say = logging.getLogger("mimscale.eval").info if dist.detect().is_main else (lambda *a: None)
    if not args.recipe:
        name = RECIPE_BY_ARCH.get(source.arch, "finetune_vit_b16")
        say("finetune: recipe %s (by the encoder's arch, %s; --recipe NAME chooses another)", name, source.arch)
    explicit = any(o.split("=", 1)[0].strip() == "train.batch_size" for o in args.overrides)
    fitted = fit_batch(recipe, train_dir, explicit, dist.detect().world_size)
    if fitted:
        say("%s", fitted)
    if args.out_dir:
        out_dir = Path(args.out_dir)
    elif source.run_dir is not None:
        out_dir = source.run_dir / "eval" / "finetune"
    else:
        out_dir = source.weights.with_name(f"{source.weights.stem}_finetune")
    result = finetune(source, train_dir, test_dir, recipe, out_dir)
    if "exit_code" in result:  # saved on SIGUSR1/SIGTERM: requeue and run the same command again to resume
        return result["exit_code"]
    if result["rank"] == 0:
        metrics = {"eval/finetune_top1": result["top1"]}
        path = record(source, "finetune", result, metrics, args.out)
        print(
            f"finetune top-1: {result['top1']:.2f}% (best {result['best_top1']:.2f}%) on "
            f"{result['test_samples']} test images after {result['steps']} steps -> {path}",
            flush=True,
        )
    logging.getLogger("mimscale.eval").info("fine-tuned model: %s", result["model"])
    return 0


__all__ = ["add_parser", "run", "KNNConfig"]
