"""The pre-training loop. Objective-agnostic: it only sees ``Objective`` and its ``LossOutput``."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
import torch.distributed as tdist

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
from ..objectives import StepContext, build_objective
from ..telemetry import MetricLogger, Progress, memory_stats
from . import deepspeed as ds
from .schedule import cosine, warmup_cosine

log = logging.getLogger("mimscale.train")


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


def _forever(loader):
    while True:
        yield from loader


def _mean_across_ranks(values: dict[str, torch.Tensor], device) -> dict[str, float]:
    keys = sorted(values)
    t = torch.stack([values[k].detach().float().to(device) for k in keys])
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        tdist.all_reduce(t)
        t /= tdist.get_world_size()
    return {k: v for k, v in zip(keys, t.tolist())}


def _all_ranks(value: int, device) -> list[int]:
    t = torch.tensor([value], dtype=torch.long, device=device)
    if not (tdist.is_initialized() and tdist.get_world_size() > 1):
        return [value]
    out = [torch.zeros_like(t) for _ in range(tdist.get_world_size())]
    tdist.all_gather(out, t)
    return [int(o.item()) for o in out]


def _any_rank(flag: bool, device) -> bool:
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item())


def pretrain(cfg: C.Config) -> dict:
    """Train ``cfg`` under whatever launcher started this process; returns the run summary."""
    d = dist.detect()
    dist.export(d)
    torch.set_num_threads(dist.configure_threads(d))
    accelerator = dist.accelerator_name()
    t, m = cfg.train, cfg.model

    train_src = builtin.resolve(cfg.data.train, cfg.data.root)
    derived = C.derive(cfg, d.world_size, count_samples(train_src, cfg.data.samples_per_epoch))
    run_dir = Path(derived.run_dir)
    if d.is_main:
        C.save_resolved(cfg, derived, run_dir / "config.yaml")

    torch.manual_seed(t.seed)  # identical init on every rank
    encoder = build_vit(m.arch, m.img_size, m.patch_size, m.in_chans, drop_path_rate=m.drop_path,
                        layer_scale_init=m.layer_scale_init, pos_embed=m.pos_embed)
    encoder.set_grad_checkpointing(m.grad_checkpointing)
    objective = build_objective(cfg.objective["name"], encoder, C.objective_knobs(cfg))
    engine = ds.initialize(objective, cfg, derived, accelerator)
    device = torch.device(engine.device)

    loader = ShardLoader(train_src, batch_size=t.micro_batch_size, rank=d.rank, world_size=d.world_size,
                         transform=objective.train_transform(
                             TrainTransform(m.img_size, scale=cfg.data.crop_scale, hflip=cfg.data.hflip,
                                            mean=cfg.data.mean, std=cfg.data.std, in_chans=m.in_chans)),
                         collate=MaskCollate(objective.mask_spec()), num_workers=cfg.data.num_workers,
                         seed=t.seed, shuffle_buffer=cfg.data.shuffle_buffer,
                         samples_per_epoch=derived.samples_per_epoch, pin_memory=accelerator == "cuda")
    knn = build_knn(cfg, d)
    logger = MetricLogger(run_dir, enabled=d.is_main, jsonl=cfg.log.jsonl, tensorboard=cfg.log.tensorboard,
                          wandb=cfg.log.wandb, project=cfg.log.project, run_name=cfg.log.run_name,
                          config=C.to_dict(cfg))
    flops = objective.flops_per_sample()
    stop = min(derived.total_steps, t.max_steps or derived.total_steps)
    summary = {"objective": cfg.objective["name"], "arch": m.arch, "world_size": d.world_size,
               "total_steps": derived.total_steps, "flops_per_sample": flops,
               "params_total": ds.total_param_numel(engine),
               "params_per_rank": _all_ranks(ds.local_param_numel(engine), device)}

    clock = {"start": time.time(), "eval_s": 0.0}

    def train_seconds() -> float:
        """Wall-clock since training began, without the time spent evaluating."""
        return time.time() - clock["start"] - clock["eval_s"]

    def evaluate(step: int, tag: str) -> None:
        if knn is None:
            return
        t0 = time.time()
        res = knn(engine.module.encoder, device)
        clock["eval_s"] += time.time() - t0
        res.update({"time/train_s": train_seconds(), "time/train_device_hours": train_seconds() * d.world_size / 3600})
        logger.log(res, step=step)
        summary[f"knn_top1_{tag}"] = res["eval/knn_top1"]
        if d.is_main:
            log.info("kNN top-1 (%s, step %d): %.2f%%", tag, step, res["eval/knn_top1"])

    if cfg.eval.knn_at_start:
        evaluate(0, "init")
    clock.update(start=time.time(), eval_s=0.0)
    next_eval_s = 60 * cfg.eval.knn_every_minutes if cfg.eval.knn_every_minutes else None
    progress = Progress(stop, images_per_step=t.batch_size, enabled=d.is_main)
    batches = _forever(loader)
    window: dict[str, torch.Tensor] = {}
    postfix: dict[str, str] = {}
    n_window, step = 0, 0
    engine.train()
    while step < stop:
        lr = warmup_cosine(step, derived.total_steps, derived.warmup_steps, derived.lr, cfg.optim.min_lr)
        wd = cosine(step, derived.total_steps, cfg.optim.weight_decay,
                    cfg.optim.weight_decay if cfg.optim.weight_decay_end is None else cfg.optim.weight_decay_end)
        ds.set_hparams(engine, lr, wd)
        ctx = StepContext(step=step, total_steps=derived.total_steps, epoch=step / derived.steps_per_epoch, lr=lr,
                          lr_factor=lr / derived.lr if derived.lr else 0.0, rank=d.rank, world_size=d.world_size,
                          grad_accum=derived.grad_accum, master_params=partial(ds.master_params, engine),
                          all_reduce_mean=ds.all_reduce_mean)
        engine.module.before_step(ctx)
        for _ in range(derived.grad_accum):
            batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in next(batches).items()}
            out = engine(batch)
            engine.backward(out.loss)
            engine.step()
            for k, v in out.metrics.items():
                window[k] = window.get(k, 0.0) + v.detach().float()
            n_window += 1
        step += 1
        engine.module.after_optimizer_step(replace(ctx, step=step))
        if step % t.log_every == 0 or step == stop:
            metrics = {f"train/{k}": v / n_window for k, v in _mean_across_ranks(window, device).items()}
            elapsed = train_seconds()
            metrics.update({"train/lr": lr, "train/wd": wd, "train/epoch": step / derived.steps_per_epoch,
                            "perf/img_per_s": progress.rate(), "time/elapsed_s": elapsed,
                            "perf/step_time_s": t.batch_size / max(progress.rate(), 1e-9),
                            **memory_stats(device),
                            "time/device_hours": elapsed * d.world_size / 3600.0,
                            "perf/train_pflops": flops * step * t.batch_size / 1e15,
                            **{f"data/{k}": float(v) for k, v in loader.stats.items()}})
            logger.log(metrics, step=step)
            postfix = {"loss": f"{metrics['train/loss']:.4f}", "lr": f"{lr:.2e}"}
            summary["final_loss"] = metrics["train/loss"]
            window, n_window = {}, 0
        progress.update(step, **postfix)
        if t.max_minutes and _any_rank(train_seconds() > 60 * t.max_minutes, device):
            log.info("train.max_minutes=%s reached at step %d", t.max_minutes, step)
            break                                       # the final evaluation follows
        if cfg.eval.knn_every and step % cfg.eval.knn_every == 0 and step != stop:
            evaluate(step, f"step{step}")
        if next_eval_s is not None and step != stop and _any_rank(train_seconds() >= next_eval_s, device):
            evaluate(step, f"{train_seconds() / 60:.1f}min")
            next_eval_s += 60 * cfg.eval.knn_every_minutes
    progress.close()
    summary.update(steps=step, train_seconds=train_seconds(), img_per_s=progress.rate())
    evaluate(step, "final")
    ds.save_encoder(engine, run_dir / "encoder.safetensors", is_main=d.is_main)
    if d.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    logger.close()
    return summary
