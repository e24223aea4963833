"""What the loop builds from the config besides the engine: the epoch size, the model, the train loader and
the kNN evaluator. ``mimscale check-config`` (:mod:`mimscale.preflight`) calls the same functions, so the
checks they run (objective knobs, cached targets in the manifest, loader layout) cannot differ from the launch's.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .. import config as C
from .. import dist
from ..data import builtin
from ..data.loader import ShardLoader, expand_source
from ..data.shards import read_manifest
from ..data.transforms import EvalTransform, TrainTransform
from ..errors import DataError
from ..eval.knn import KNNEvaluator
from ..masking import MaskCollate
from ..models.vit import build_vit
from ..objectives import Objective, build_objective


def count_samples(source: str, override: int | None) -> int:
    """Epoch size: ``data.samples_per_epoch``, else the manifest counts of exactly the listed shards."""
    if override:
        return override
    urls, manifest = expand_source(source)
    local = [u for u in urls if not u.startswith("pipe:")]
    if manifest is None and local:
        manifest = str(Path(local[0]).parent)
    if manifest is None:
        raise DataError(f"cannot size an epoch of '{source}' without a manifest: set data.samples_per_epoch")
    counts = {s["name"]: int(s["count"]) for s in read_manifest(manifest)["shards"]}
    missing = [u for u in urls if Path(u.split()[-1]).name not in counts]
    if missing:
        raise DataError(f"{missing[0]} is not listed in {manifest}: set data.samples_per_epoch")
    return sum(counts[Path(u.split()[-1]).name] for u in urls)


def build_model(cfg: C.Config) -> Objective:
    """The encoder and the objective around it (its knob checks run here), seeded with ``train.seed`` so every
    rank starts from the same weights. Under ``with torch.device("meta")`` it builds shapes only (preflight)."""
    m = cfg.model
    torch.manual_seed(cfg.train.seed)
    encoder = build_vit(m.arch, m.img_size, m.patch_size, m.in_chans, drop_path_rate=m.drop_path,
                        layer_scale_init=m.layer_scale_init, pos_embed=m.pos_embed)
    encoder.set_grad_checkpointing(m.grad_checkpointing)
    return build_objective(cfg.objective["name"], encoder, C.objective_knobs(cfg))


def train_loader(cfg: C.Config, objective: Objective, source: str, derived: C.Derived, d: dist.DistEnv,
                 accelerator: str) -> ShardLoader:
    """This rank's training stream: the objective's transform and masks; its cached targets are checked
    against the shards' manifest (field, image size, crop rule) here."""
    m, t, data = cfg.model, cfg.train, cfg.data
    default = TrainTransform(m.img_size, scale=data.crop_scale, hflip=data.hflip, mean=data.mean, std=data.std,
                             in_chans=m.in_chans)
    return ShardLoader(source, batch_size=t.micro_batch_size, rank=d.rank, world_size=d.world_size,
                       transform=objective.train_transform(default), collate=MaskCollate(objective.mask_spec()),
                       num_workers=data.num_workers, seed=t.seed, shuffle_buffer=data.shuffle_buffer,
                       samples_per_epoch=derived.samples_per_epoch, pin_memory=accelerator == "cuda",
                       targets=objective.cached_targets())


def build_knn(cfg: C.Config, d: dist.DistEnv) -> KNNEvaluator | None:
    """kNN evaluator over two labelled shard directories (bank and queries), each optionally capped."""
    e = cfg.eval
    if not e.knn_train:
        return None
    tf = EvalTransform(e.img_size or cfg.model.img_size, mean=cfg.data.mean, std=cfg.data.std,
                       in_chans=cfg.model.in_chans)
    loaders = []
    for src, cap in ((e.knn_train, e.knn_train_samples), (e.knn_test, e.knn_test_samples)):
        src = builtin.resolve(src, cfg.data.root)
        loaders.append(ShardLoader(_first_shards(src, cap), manifest=src, batch_size=e.batch_size, transform=tf,
                                   rank=d.rank, world_size=d.world_size, num_workers=e.num_workers,
                                   mode="eval", shuffle=False))
    return KNNEvaluator(*loaders, k=e.knn_k, temperature=e.knn_temperature, pool=e.pool)


def _first_shards(source: str, cap: int | None) -> list[str]:
    """The shards of a shard directory, or its first whole shards covering ``cap`` samples."""
    shards, n = [], 0
    for s in read_manifest(source)["shards"]:
        if cap and n >= cap:
            break
        shards.append(str(Path(source) / s["name"]))
        n += int(s["count"])
    return shards
