"""Pre-training as a :class:`~mimscale.engine.task.Task`: an objective (encoder inside) on the training shards,
the kNN evaluation on labelled shards, the encoder exported as ``encoder.safetensors``.

``pretrain(cfg)`` is what ``mimscale pretrain`` and every launcher (``python -m mimscale.train``) run.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from . import config as C
from . import dist
from .data import builtin
from .data.epoch import capped_eval_loader, count_samples
from .data.loader import ShardLoader
from .data.targets import check_targets
from .data.transforms import EvalTransform, TrainTransform
from .engine import deepspeed as ds
from .engine.build import build_model
from .engine.resume import identity
from .engine.task import Evaluation
from .engine.trainer import Trainer
from .eval.knn import KNNEvaluator
from .masking import GridMasks, MaskCollate
from .models.init import DECODER_FILE
from .objectives import Objective
from .objectives.mae import decoder_metadata

log = logging.getLogger("mimscale.train")


class PretrainTask:
    name = "pretrain"

    def __init__(self, cfg: C.Config):
        self.cfg = cfg
        self.train_src = builtin.resolve(cfg.data.train, cfg.data.root)

    def samples_per_epoch(self) -> int:
        return count_samples(self.train_src, self.cfg.data.samples_per_epoch)

    def identity(self) -> dict:
        return identity(self.cfg)

    def write_report(self, run_dir: Path) -> None:
        """Called by the Trainer on rank 0 after every evaluation and at the end: ``RUN_DIR/report.html``, which
        reloads itself in the browser while the run trains and is static once summary.json exists."""
        from .report import write_live_report

        write_live_report(run_dir)

    def write_config(self, derived: C.Derived, run_dir: Path) -> None:
        self.run_dir = run_dir
        C.save_resolved(self.cfg, derived, run_dir / "config.yaml")

    def build(self) -> nn.Module:
        return build_model(self.cfg)

    def param_groups(self, module: nn.Module) -> list[dict] | None:
        return None  # the objective's decay / no-decay groups

    def loader(self, module: nn.Module, derived: C.Derived, d: dist.DistEnv, accelerator: str) -> ShardLoader:
        """This rank's training stream; an objective's cached targets must be in the shards' manifest with the
        crop rule and size it trains on (checked here, before any worker starts)."""
        cfg, m, t = self.cfg, self.cfg.model, self.cfg.train
        objective = cast(Objective, module)  # what build() made
        wanted = objective.cached_targets()
        if wanted:
            check_targets(self.train_src, **wanted)
        return ShardLoader(
            self.train_src,
            batch_size=t.micro_batch_size,
            rank=d.rank,
            world_size=d.world_size,
            transform=objective.train_transform(
                TrainTransform(
                    m.img_size,
                    scale=cfg.data.crop_scale,
                    hflip=cfg.data.hflip,
                    mean=cfg.data.mean,
                    std=cfg.data.std,
                    in_chans=m.in_chans,
                )
            ),
            collate=MaskCollate(self._masks(objective)),
            num_workers=cfg.data.num_workers,
            seed=t.seed,
            shuffle_buffer=cfg.data.shuffle_buffer,
            samples_per_epoch=derived.samples_per_epoch,
            pin_memory=accelerator == "cuda",
            decode=cfg.data.decode,
        )

    def _masks(self, objective: Objective):
        """The objective's masks; with ``train.resolution_schedule`` those of every scheduled size (GridMasks)."""
        sched, full = self.cfg.train.resolution_schedule, self.cfg.model.img_size
        if not sched:
            return objective.mask_spec()
        return GridMasks({s: objective.mask_spec_at(s) for _, s in sched}, full)

    def evaluation(self, d: dist.DistEnv, derived: C.Derived) -> Evaluation | None:
        knn = build_knn(self.cfg, d)
        if knn is None:
            return None
        e = self.cfg.eval

        def run(module: nn.Module, device: torch.device) -> dict[str, float]:
            return knn(module.encoder, device)

        return Evaluation(
            run,
            key="eval/knn_top1",
            summary_prefix="knn_top1",
            every_steps=e.knn_every,
            every_minutes=e.knn_every_minutes,
            at_start=e.knn_at_start,
        )

    def summary(self) -> dict[str, Any]:
        return {"objective": self.cfg.objective["name"], "arch": self.cfg.model.arch}

    def export(self, engine, run_dir: Path, is_main: bool) -> None:
        ds.save_encoder(engine, run_dir / "encoder.safetensors", is_main)
        dec_meta = decoder_metadata(engine.module)
        if dec_meta is not None:  # MAE / EMAE: the whole model, for model.init and export --format hf-mae
            ds.save_decoder(engine, run_dir / DECODER_FILE, is_main, dec_meta)
        if is_main and run_dir == getattr(self, "run_dir", None):  # the end of the run, not a checkpoint
            self.reconstructions(engine, run_dir)

    def reconstructions(self, engine, run_dir: Path, count: int = 8) -> None:
        """The final evaluation's picture (:mod:`.eval.reconstruct`): ``count`` fixed validation images (the kNN
        queries, else the first training images) through the objective's pixel decoder. Rank 0 only; at ZeRO-3
        the parameters are partitioned, so it is skipped with a line saying so."""
        from .eval import reconstruct

        objective = engine.module
        if reconstruct.pixel_kind(objective) is None:
            reconstruct.save(objective, torch.empty(0), (), (), run_dir)  # says "not a pixel objective"
            return
        if engine.zero_optimization_stage() == 3:
            log.info("reconstructions skipped: parameters are partitioned at ZeRO-3 (export and reload to draw them)")
            return
        cfg, m = self.cfg, self.cfg.model
        src = builtin.resolve(cfg.eval.knn_test, cfg.data.root) if cfg.eval.knn_test else self.train_src
        size = reconstruct.image_size(objective)
        tf = EvalTransform(size, mean=cfg.data.mean, std=cfg.data.std, in_chans=m.in_chans)
        loader = capped_eval_loader(src, count, batch_size=count, transform=tf, rank=0, world_size=1, num_workers=0)
        images = next(iter(loader))["image"][:count]
        reconstruct.save(objective, images, cfg.data.mean, cfg.data.std, run_dir, seed=cfg.train.seed)


def build_knn(cfg: C.Config, d: dist.DistEnv) -> KNNEvaluator | None:
    """kNN evaluator over two labelled shard directories (bank and queries), each optionally capped."""
    e = cfg.eval
    if not e.knn_train:
        return None
    tf = EvalTransform(
        e.img_size or cfg.model.img_size, mean=cfg.data.mean, std=cfg.data.std, in_chans=cfg.model.in_chans
    )
    loaders = []
    for src, cap in ((e.knn_train, e.knn_train_samples), (e.knn_test, e.knn_test_samples)):
        assert src is not None  # config: knn_train and knn_test are set together
        src = builtin.resolve(src, cfg.data.root)
        loaders.append(
            capped_eval_loader(
                src,
                cap,
                batch_size=e.batch_size,
                transform=tf,
                rank=d.rank,
                world_size=d.world_size,
                num_workers=e.num_workers,
            )
        )
    return KNNEvaluator(loaders[0], loaders[1], k=e.knn_k, temperature=e.knn_temperature, pool=e.pool)


def trainer(cfg: C.Config, **kw) -> Trainer:
    """The pre-training Trainer of ``cfg`` (``kw``: the Trainer's clock hooks)."""
    return Trainer(cfg, PretrainTask(cfg), **kw)


def pretrain(cfg: C.Config) -> dict:
    """Train ``cfg``; returns the run summary (``exit_code`` set when it saved on a signal)."""
    return trainer(cfg).fit()
