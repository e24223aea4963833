"""The pre-training loop. Objective-agnostic: it only sees ``Objective`` and its ``LossOutput``."""
from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

from .. import checkpoint as ckpt
from .. import config as C
from .. import dist
from ..data import builtin
from ..errors import NonFiniteError
from ..objectives import StepContext
from ..telemetry import MetricLogger, Progress, memory_stats
from ..telemetry.mfu import mfu, peak_flops_for
from . import deepspeed as ds
from . import runstate as rs
from .setup import build_knn, build_model, count_samples, train_loader
from .schedule import cosine, warmup_cosine

log = logging.getLogger("mimscale.train")


def _forever(loader):
    while True:
        yield from loader


def pretrain(cfg: C.Config) -> dict:
    """Train ``cfg`` under whatever launcher started this process; returns the run summary.

    Resumes from ``RUN_DIR/checkpoints`` when it holds a checkpoint (``train.resume=auto``); on SIGUSR1 or
    SIGTERM saves and returns with ``summary["exit_code"] = EXIT_REQUEUE``.
    """
    d = dist.detect()
    dist.export(d)
    dist.nccl_env_defaults()
    torch.set_num_threads(dist.configure_threads(d))
    accelerator = dist.accelerator_name()
    t, m = cfg.train, cfg.model

    train_src = builtin.resolve(cfg.data.train, cfg.data.root)
    derived = C.derive(cfg, d.world_size, count_samples(train_src, cfg.data.samples_per_epoch))
    run_dir = Path(derived.run_dir)
    found = ckpt.find(run_dir, rs.identity(cfg)) if t.resume == "auto" else None
    universal = found is not None and found.meta["world_size"] != d.world_size
    if universal:
        ds.init_distributed()
        ckpt.convert_to_universal(found, d.rank)
    if d.is_main:
        C.save_resolved(cfg, derived, run_dir / "config.yaml")

    objective = build_model(cfg)  # seeded: identical init on every rank
    engine = ds.initialize(objective, cfg, derived, accelerator, load_universal=universal)
    device = torch.device(engine.device)
    peak = peak_flops_for(device, t.precision)           # per device: datasheet on GPUs, measured on CPUs
    loader = train_loader(cfg, objective, train_src, derived, d, accelerator)
    saver = ckpt.Checkpointer(run_dir, engine, rank=d.rank, world_size=d.world_size, keep_last=t.keep_last,
                              identity=rs.identity(cfg))
    state = {"step": 0, "train_s": 0.0, "device_hours": 0.0, "summary": {}, "next_eval_s": None,
             "nonfinite_total": 0, "lr_scale": 1.0, "wandb_id": None}
    if found is not None:
        state.update(rs.restore(saver, found, universal, loader, objective, d))
    stop = min(derived.total_steps, t.max_steps or derived.total_steps)

    knn = build_knn(cfg, d)
    logger = MetricLogger(run_dir, enabled=d.is_main, jsonl=cfg.log.jsonl, tensorboard=cfg.log.tensorboard,
                          wandb=cfg.log.wandb, project=cfg.log.project, run_name=cfg.log.run_name,
                          config=C.to_dict(cfg), resume_id=state["wandb_id"],
                          purge_step=state["step"] + 1 if found is not None else None)
    flops = objective.flops_per_sample()
    summary = {"objective": cfg.objective["name"], "arch": m.arch, "world_size": d.world_size,
               "total_steps": derived.total_steps, "flops_per_sample": flops,
               "params_total": ds.total_param_numel(engine),
               "params_per_rank": rs.all_ranks(ds.local_param_numel(engine), device), **state["summary"]}
    clock = rs.Clock(d.world_size, state["train_s"], state["device_hours"])

    def evaluate(step: int, tag: str) -> None:
        if knn is None:
            return
        t0 = time.time()
        res = knn(engine.module.encoder, device)
        clock.eval_s += time.time() - t0
        res.update({"time/train_s": clock.train_s(), "time/train_device_hours": clock.device_hours()})
        logger.log(res, step=step)
        summary[f"knn_top1_{tag}"] = res["eval/knn_top1"]
        if d.is_main:
            log.info("kNN top-1 (%s, step %d): %.2f%%", tag, step, res["eval/knn_top1"])

    def save(step: int) -> None:
        trainer = {**clock.state(), "step": step, "summary": {k: v for k, v in summary.items()
                                                             if k.startswith(("knn_", "final_loss"))},
                   "next_eval_s": next_eval_s, "nonfinite_total": nonfinite_total, "lr_scale": lr_scale,
                   "wandb_id": logger.wandb_id}
        t0 = time.time()
        saver.save(step, trainer, loader.state_dict(), objective.checkpoint_state(),
                   extra=lambda tmp: ds.save_encoder(engine, tmp / "encoder.safetensors", d.is_main))
        clock.eval_s += time.time() - t0             # saving is not training time

    step, lr_scale, nonfinite_total = state["step"], state["lr_scale"], state["nonfinite_total"]
    if found is None and cfg.eval.knn_at_start:
        evaluate(0, "init")
        clock = rs.Clock(d.world_size)
    every_min = cfg.eval.knn_every_minutes
    next_eval_s = state["next_eval_s"] if found is not None else (60 * every_min if every_min else None)
    last_save = time.time()
    signals = rs.Signals()
    progress = Progress(stop, start_step=step, images_per_step=t.batch_size, enabled=d.is_main)
    batches = _forever(loader)
    window: dict[str, torch.Tensor] = {}
    postfix: dict[str, str] = {}
    n_window, bad_in_row, stopped_by = 0, 0, None
    inject = Counter(t.inject_nonfinite_at)
    engine.train()
    while step < stop:
        lr = lr_scale * warmup_cosine(step, derived.total_steps, derived.warmup_steps, derived.lr, cfg.optim.min_lr)
        wd = cosine(step, derived.total_steps, cfg.optim.weight_decay,
                    cfg.optim.weight_decay if cfg.optim.weight_decay_end is None else cfg.optim.weight_decay_end)
        ds.set_hparams(engine, lr, wd)
        ctx = StepContext(step=step, total_steps=derived.total_steps, epoch=step / derived.steps_per_epoch, lr=lr,
                          lr_factor=lr / derived.lr if derived.lr else 0.0, rank=d.rank, world_size=d.world_size,
                          grad_accum=derived.grad_accum, master_params=partial(ds.master_params, engine),
                          all_reduce_mean=ds.all_reduce_mean)
        engine.module.before_step(ctx)
        done, skipped_before = 0, engine.skipped_steps
        while done < derived.grad_accum and bad_in_row < t.nonfinite_patience:
            batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in next(batches).items()}
            out = engine(batch)
            loss = out.loss
            if d.rank == 0 and inject[step] > 0:     # fault injection for tests of this policy
                inject[step] -= 1
                loss = loss * float("nan")
            if rs.any_rank(not bool(torch.isfinite(loss.detach())), device):
                nonfinite_total, bad_in_row = nonfinite_total + 1, bad_in_row + 1   # drop it, on every rank
                continue
            engine.backward(loss)
            engine.step()
            for k, v in out.metrics.items():
                window[k] = window.get(k, 0.0) + v.detach().float()
            n_window, done = n_window + 1, done + 1
        if done == derived.grad_accum and engine.skipped_steps > skipped_before:   # DeepSpeed saw inf/NaN grads
            nonfinite_total, bad_in_row = nonfinite_total + 1, bad_in_row + 1
        elif done == derived.grad_accum:
            step, bad_in_row = step + 1, 0
            engine.module.after_optimizer_step(replace(ctx, step=step))
        if bad_in_row >= t.nonfinite_patience:
            if t.on_nonfinite == "stop" or not ckpt.candidates(run_dir):
                raise NonFiniteError(f"{bad_in_row} non-finite losses/gradients in a row at step {step}; stopping "
                                     f"(train.on_nonfinite={t.on_nonfinite}); checkpoints in {run_dir / ckpt.CKPT_DIR} "
                                     "are intact")
            restored = rs.restore(saver, ckpt.find(run_dir, rs.identity(cfg)), False, None, objective, d)
            step, lr_scale, bad_in_row = restored["step"], lr_scale * t.rollback_lr_scale, 0
            log.warning("rolled back to checkpoint step=%d after %d non-finite steps; lr scale now %.3g (the data "
                        "stream moves on)", step, t.nonfinite_patience, lr_scale)
            continue
        if step % t.log_every == 0 or step == stop:
            metrics = {f"train/{k}": v / max(n_window, 1) for k, v in rs.mean_across_ranks(window, device).items()}
            metrics.update({"train/lr": lr, "train/wd": wd, "train/epoch": step / derived.steps_per_epoch,
                            "train/nonfinite_skipped": nonfinite_total,
                            "perf/img_per_s": progress.rate(), "time/elapsed_s": clock.train_s(),
                            "perf/step_time_s": t.batch_size / max(progress.rate(), 1e-9),
                            **memory_stats(device), "time/device_hours": clock.device_hours(),
                            "perf/train_pflops": flops * step * t.batch_size / 1e15,
                            **{f"data/{k}": float(v) for k, v in loader.stats.items()}})
            if peak and progress.rate() > 0:
                metrics["perf/mfu"] = mfu(flops, progress.rate() / d.world_size, peak)
            logger.log(metrics, step=step)
            postfix = {"loss": f"{metrics.get('train/loss', float('nan')):.4f}", "lr": f"{lr:.2e}"}
            summary["final_loss"] = metrics.get("train/loss")
            window, n_window = {}, 0
        progress.update(step, **postfix)
        if rs.any_rank(signals.received is not None, device):
            stopped_by = "signal"
            break
        if t.max_minutes and rs.any_rank(clock.train_s() > 60 * t.max_minutes, device):
            log.info("train.max_minutes=%s reached at step %d", t.max_minutes, step)
            break                                       # the final evaluation follows
        if cfg.eval.knn_every and step % cfg.eval.knn_every == 0 and step != stop:
            evaluate(step, f"step{step}")
        if next_eval_s is not None and step != stop and rs.any_rank(clock.train_s() >= next_eval_s, device):
            evaluate(step, f"{clock.train_s() / 60:.1f}min")
            next_eval_s += 60 * every_min
        due = (t.save_every and step % t.save_every == 0) or \
            (t.save_every_minutes and rs.any_rank(time.time() - last_save >= 60 * t.save_every_minutes, device))
        if due and step != stop:
            save(step)
            last_save = time.time()
    progress.close()
    signals.restore()
    summary.update(steps=step, train_seconds=clock.train_s(), device_hours=clock.device_hours(),
                   img_per_s=progress.rate(), nonfinite_skipped=nonfinite_total)
    if stopped_by == "signal":
        save(step)
        summary["exit_code"] = ckpt.EXIT_REQUEUE
        logger.close()
        return summary
    if step > state["step"] or found is None:
        evaluate(step, "final")
        save(step)
    ds.save_encoder(engine, run_dir / "encoder.safetensors", is_main=d.is_main)
    if d.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    logger.close()
    return summary
