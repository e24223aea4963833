"""The ``Trainer``: small stateful parts around one short step loop, for any :class:`~.task.Task`.

It only sees the task's module and its ``LossOutput`` (no objective names). The parts own their concerns
(:mod:`.cadence` for save/eval/time triggers, :mod:`.nonfinite` for the non-finite policy, :mod:`.flags` for
agreeing on all of it in ONE collective per optimizer step, :class:`TrainState` for what a checkpoint
carries); :meth:`Trainer.fit` only sequences them.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import NamedTuple, cast

import torch

from .. import checkpoint as ckpt
from .. import config as C
from .. import dist
from ..errors import ConfigError, NonFiniteError
from ..objectives import StepContext
from ..telemetry import MetricLogger, Progress, memory_stats
from ..telemetry.mfu import mfu, peak_flops_for
from . import deepspeed as ds
from .build import configure_backends
from .cadence import Clock, EvalCadence, SaveCadence, TimeLimit
from .flags import Agreed, StepFlags
from .nonfinite import NonFinitePolicy
from .resolution import ResolutionSchedule, at_size
from .resume import all_ranks, restore
from .schedule import cosine, time_budget_total, warmup_cosine
from .signals import Signals
from .state import TrainState
from .task import StepHooks, Task

log = logging.getLogger("mimscale.train")

LossHook = Callable[[int, torch.Tensor], torch.Tensor]  # (step, loss) -> loss; tests inject faults with it


class Trainer:
    """Builds ``task`` under whatever launcher started this process (``cfg``: model/optim/train/log sections);
    :meth:`fit` trains it. ``now``/``wall`` replace the training clock and the wall clock (tests drive the
    minute triggers with a fake clock); ``loss_hooks`` see every micro-batch loss before the step uses it.
    """

    def __init__(
        self,
        cfg: C.Config,
        task: Task,
        *,
        now: Callable[[], float] = time.time,
        wall: Callable[[], float] = time.monotonic,
    ):
        self.cfg, self.task, t = cfg, task, cfg.train
        self.d = d = dist.detect()
        dist.export(d)
        dist.nccl_env_defaults()
        torch.set_num_threads(dist.configure_threads(d))
        accelerator = dist.accelerator_name()
        dist.bind_device(d, accelerator)  # before any process group or engine: DeepSpeed uses the current device
        configure_backends(cfg, accelerator)
        self.derived = C.derive(cfg, d.world_size, task.samples_per_epoch())
        self.run_dir = Path(self.derived.run_dir)
        self.identity = task.identity()
        self.found = ckpt.find(self.run_dir, self.identity) if t.resume == "auto" else None
        universal = self.found is not None and self.found.meta["world_size"] != d.world_size
        if universal:
            ds.init_distributed()
            assert self.found is not None  # universal implies a checkpoint was found
            ckpt.convert_to_universal(self.found, d.rank)
        if d.is_main:
            task.write_config(self.derived, self.run_dir)

        torch.manual_seed(t.seed)  # identical init on every rank
        self.module = task.build()
        self.engine = ds.initialize(
            self.module, cfg, self.derived, accelerator, load_universal=universal, groups=task.param_groups(self.module)
        )
        self.device = torch.device(self.engine.device)
        # identical initial weights above; from here each rank draws its own stream (drop-path masks and any other
        # randomness drawn in the step), on the CPU and every CUDA device; a resumed run restores it below
        torch.manual_seed(rank_seed(t.seed, d.rank))
        self.loader = task.loader(self.module, self.derived, d, accelerator)
        shapes = ckpt.param_shapes(self.module)
        self.saver = ckpt.Checkpointer(
            self.run_dir,
            self.engine,
            rank=d.rank,
            world_size=d.world_size,
            keep_last=t.keep_last,
            identity=self.identity,
            shapes=shapes,
        )
        self.state = TrainState()
        if self.found is not None:
            ckpt.check_shapes(self.found, shapes)
            self.state.load_state_dict(restore(self.saver, self.found, universal, self.loader, self.module, d))
        cut = t.stop_after_steps or t.max_steps  # a hard cut; train.steps sets the schedule's length instead
        self.stop = min(self.derived.total_steps, cut or self.derived.total_steps)
        dv = self.derived
        if d.is_main and cut and cut > dv.total_steps:
            log.warning(
                "train.stop_after_steps=%d is past the end of the run (%d steps): it has no effect; "
                "train.steps=%d sets the run's length",
                cut,
                dv.total_steps,
                cut,
            )
        if d.is_main and t.steps is None and dv.total_steps < 100 and not cut:
            log.warning(
                "this run is only %d optimizer steps (train.epochs=%g x %d steps of train.batch_size=%d per epoch of "
                "%d samples); train.steps=N sets the length (warm-up and cosine end at N)",
                dv.total_steps,
                t.epochs,
                dv.steps_per_epoch,
                t.batch_size,
                dv.samples_per_epoch,
            )

        self.evaluation = task.evaluation(d, self.derived)
        self.logger = MetricLogger(
            self.run_dir,
            enabled=d.is_main,
            jsonl=cfg.log.jsonl,
            tensorboard=cfg.log.tensorboard,
            wandb=cfg.log.wandb,
            project=cfg.log.project,
            run_name=cfg.log.run_name,
            config=C.to_dict(cfg),
            resume_id=self.state.wandb_id,
            purge_step=self.state.step + 1 if self.found is not None else None,
        )
        self.flops = cast(StepHooks, self.module).flops_per_sample()
        sched, self.size = t.resolution_schedule, cfg.model.img_size
        self.resolution = ResolutionSchedule(sched, self.size) if sched else None
        self._size_said: int | None = None
        at = getattr(self.module, "flops_per_sample_at", None)  # progressive resolution: FLOPs of each size
        if self.resolution is not None and at is None:
            raise ConfigError(f"train.resolution_schedule is for pre-training: {task.name} trains at model.img_size")
        self._flops_at = {s: at(s) for s in self.resolution.distinct_sizes()} if self.resolution and at else {}
        if self.found is not None and not self.state.train_flops:  # a checkpoint from before the counter
            self.state.train_flops = self.flops * self.state.step * t.batch_size
        self.peak = peak_flops_for(self.device, t.precision)  # per device: datasheet on GPUs, measured on CPUs
        self.summary = {
            **task.summary(),
            "world_size": d.world_size,
            "total_steps": self.derived.total_steps,
            "flops_per_sample": self.resolution.mean_flops(self._flops_at.__getitem__)
            if self.resolution
            else self.flops,
            "params_total": ds.total_param_numel(self.engine),
            "params_per_rank": all_ranks(ds.local_param_numel(self.engine), self.device),
            **self.state.summary,
        }
        self.now, self.wall = now, wall
        self.clock = Clock(d.world_size, self.state.train_s, self.state.device_hours, now=now)
        self.saves = SaveCadence(t.save_every, t.save_every_minutes, now=wall)
        ev = self.evaluation
        self.evals = EvalCadence(ev.every_steps, ev.every_minutes) if ev else EvalCadence(0, None)
        self.limit = TimeLimit(t.max_minutes)
        self.nonfinite = NonFinitePolicy(t.nonfinite_patience, t.on_nonfinite, t.rollback_lr_scale, self.state)
        self.flags = StepFlags(self.device)
        self.loss_hooks: list[LossHook] = []
        self._postfix: dict[str, str] = {}
        self.last_eval: dict[str, float] = {}
        self._wd = cfg.optim.weight_decay
        self._budget_s = 60 * t.max_minutes if t.schedule_by_time and t.max_minutes else None
        self._sched_total: int | None = None  # the steps the schedules span (re-planned: _schedule_total)

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        """Train to ``stop``; returns the run summary. On SIGUSR1/SIGTERM saves and returns with
        ``summary["exit_code"] = EXIT_REQUEUE``."""
        signals = Signals()  # before the baseline evaluation: a signal during it saves after the first step
        batches = self._batches()
        try:
            return self._fit(signals, batches)
        finally:  # also when a step raised: the loader's workers shut down and the run stays killable
            batches.close()
            signals.restore()

    def _fit(self, signals: Signals, batches: Iterator[dict]) -> dict:
        st, cfg = self.state, self.cfg
        if self.found is None:
            if self.evaluation is not None and self.evaluation.at_start:
                self.evaluate("init")
                self.clock = Clock(self.d.world_size, now=self.now)  # the baseline is not training time
            st.next_eval_s = self.evals.first_due_s()
        elif self._missed_eval(st.step):  # the run was stopped by a signal at a step that was due an evaluation
            self.evaluate(f"step{st.step}")
        progress = Progress(
            self.stop,
            start_step=st.step,
            images_per_step=cfg.train.batch_size,
            enabled=self.d.is_main,
            desc=self.task.name,  # "finetune: step ..." for fine-tuning
        )
        window, stopped_by = _Window(), None
        self.engine.train()
        while st.step < self.stop:
            ctx = self._step_context()
            self.engine.module.before_step(ctx)
            r = self._run_step(batches, window, signals, log_now=self._log_due(st.step + 1))
            agreed = r.agreed
            if r.dropped:  # on every rank; already counted by the policy
                if r.action != "continue":
                    self._stop_or_roll_back()
                    continue
            else:
                st.step += 1
                st.train_flops += self.flops * cfg.train.batch_size  # at this step's resolution
                self.nonfinite.good()
                self.engine.module.after_optimizer_step(replace(ctx, step=st.step))
                if agreed.metrics:
                    self._log(agreed.metrics, ctx.lr, progress)
                    window.clear()
            progress.update(st.step, **self._postfix)
            if agreed.signal:
                stopped_by = "signal"
                break
            if agreed.time_up:
                log.info("train.max_minutes=%s reached at step %d", cfg.train.max_minutes, st.step)
                break  # the final evaluation follows
            if r.dropped:
                continue
            if st.step == self.stop:
                break
            if self.evals.due_by_steps(st.step):
                self.evaluate(f"step{st.step}")
            if agreed.eval_due:
                self.evaluate(f"{self.clock.train_s() / 60:.1f}min")
                st.next_eval_s = self.evals.advance(st.next_eval_s)
            if self.saves.due(st.step, agreed.save_due):
                self.save()
        progress.close()
        signals.restore()
        return self._finish(stopped_by, progress.rate())

    def _run_step(self, batches: Iterator[dict], window: _Window, signals: Signals, log_now: bool) -> _StepResult:
        """Forward/backward the step's micro-batches. The flags are agreed once, at the last micro-batch and
        before its backward, so a step with a non-finite loss on any rank never updates the weights.

        With gradient accumulation a non-finite micro-batch before the last is dropped at once (one scalar
        collective each): its backward would already have put NaN into the accumulated gradients."""
        gas, done, skipped_before = self.derived.grad_accum, 0, self.engine.skipped_steps
        while True:
            out = self.engine(self._device_batch(next(batches)))
            loss = out.loss
            for hook in self.loss_hooks:
                loss = hook(self.state.step, loss)
            bad = ~torch.isfinite(loss.detach())  # stays on the device until the flags are agreed
            if done < gas - 1:
                if self.flags.agree(bad).nonfinite:
                    action = self.nonfinite.bad(self._can_roll_back())
                    if action != "continue":
                        return _StepResult(Agreed(nonfinite=True), True, action)
                    continue  # the step goes on with another micro-batch
            else:
                st, train_s = self.state, self.clock.train_s()
                agreed = self.flags.agree(
                    bad,
                    signal=signals.received is not None,
                    time_up=self.limit.due_local(train_s),
                    eval_due=st.step + 1 != self.stop and self.evals.due_local(train_s, st.next_eval_s),
                    save_due=self.saves.due_local(),
                    metrics=window.with_(out.metrics) if log_now else None,
                    count=window.n + 1,
                )
                if agreed.nonfinite:
                    return _StepResult(agreed, True, self.nonfinite.bad(self._can_roll_back()))
            self.engine.backward(loss)
            self.engine.step()
            window.add(out.metrics)
            done += 1
            if done == gas:
                if self.engine.skipped_steps > skipped_before:  # DeepSpeed saw inf/NaN gradients
                    return _StepResult(agreed, True, self.nonfinite.bad(self._can_roll_back()))
                return _StepResult(agreed, False, "continue")

    # ------------------------------------------------------------------ parts of a step
    def _batches(self) -> Generator[dict, None, None]:
        while True:
            yield from self.loader

    def _device_batch(self, batch: dict) -> dict:
        """The batch on the device, at this step's image size under ``train.resolution_schedule``."""
        b = self.loader.to_device(batch, self.device)
        return b if self.resolution is None else at_size(b, self.size, self.resolution.full)

    def _follow_resolution(self, fraction: float) -> None:
        """The schedule's image size at ``fraction`` of the budget (the lr schedule's position), and its FLOPs."""
        assert self.resolution is not None
        size = self.resolution.size_at(fraction)
        if size != self._size_said and self.d.is_main:
            log.info("resolution: %d px from step %d (%s)", size, self.state.step, self.resolution)
        self.size, self.flops, self._size_said = size, self._flops_at[size], size

    def _step_context(self) -> StepContext:
        st, dv, o = self.state, self.derived, self.cfg.optim
        total = self._schedule_total()
        if self.resolution is not None:
            self._follow_resolution(st.step / total)
        lr = st.lr_scale * warmup_cosine(st.step, total, dv.warmup_steps, dv.lr, o.min_lr)
        wd = cosine(
            st.step,
            total,
            o.weight_decay,
            o.weight_decay if o.weight_decay_end is None else o.weight_decay_end,
        )
        ds.set_hparams(self.engine, lr, wd)
        self._wd = wd
        return StepContext(
            step=st.step,
            total_steps=total,
            epoch=st.step / dv.steps_per_epoch,
            lr=lr,
            lr_factor=lr / dv.lr if dv.lr else 0.0,
            rank=self.d.rank,
            world_size=self.d.world_size,
            grad_accum=dv.grad_accum,
            loss_scale=ds.loss_scale(self.engine),
            master_params=partial(ds.master_params, self.engine),
            master_shards=partial(ds.master_shards, self.engine),
            master_fragments=partial(ds.master_fragments, self.engine),
            all_reduce_mean=ds.all_reduce_mean,
        )

    def _schedule_total(self) -> int:
        """The steps the lr / wd / EMA schedules span: ``total_steps``, or with ``train.schedule_by_time``
        re-planned every ``log_every`` steps from the training time so far (:func:`.schedule.time_budget_total`;
        the time is averaged over the ranks, so every rank uses the same schedule)."""
        st = self.state
        if self._budget_s is None:
            return self.derived.total_steps
        if self._sched_total is None or st.step % self.cfg.train.log_every == 0:
            train_s = torch.tensor([self.clock.train_s()], device=self.device, dtype=torch.float64)
            train_s_mean = float(ds.all_reduce_mean(train_s).item())  # every log_every steps, only in this mode
            self._sched_total = time_budget_total(st.step, self.derived.total_steps, train_s_mean, self._budget_s)
        return self._sched_total

    def _log_due(self, step: int) -> bool:
        return step % self.cfg.train.log_every == 0 or step == self.stop

    def _log(self, means: dict[str, float], lr: float, progress: Progress) -> None:
        st, t, dv = self.state, self.cfg.train, self.derived
        rate = progress.rate()
        metrics = {f"train/{k}": v for k, v in means.items()}
        metrics.update(
            {
                "train/lr": lr,
                "train/wd": self._wd,
                "train/epoch": st.step / dv.steps_per_epoch,
                "train/nonfinite_skipped": st.nonfinite_total,
                "perf/img_per_s": rate,
                "time/elapsed_s": self.clock.train_s(),
                "perf/step_time_s": t.batch_size / max(rate, 1e-9),
                **memory_stats(self.device),
                "time/device_hours": self.clock.device_hours(),
                "perf/train_pflops": st.train_flops / 1e15,  # the actual per-step FLOPs summed
                **{f"data/{k}": float(v) for k, v in self.loader.stats.items()},
            }
        )
        norm = ds.grad_norm(self.engine)
        if norm is not None:  # before clipping: above optim.clip_grad means the step was clipped
            metrics["train/grad_norm"] = norm
        if self.peak and rate > 0:
            metrics["perf/mfu"] = mfu(self.flops, rate / self.d.world_size, self.peak)
        self.logger.log(metrics, step=st.step)
        self._postfix = {"loss": f"{metrics.get('train/loss', float('nan')):.4f}", "lr": f"{lr:.2e}"}
        self.summary["final_loss"] = metrics.get("train/loss")

    def _stop_or_roll_back(self) -> None:
        st, t = self.state, self.cfg.train
        found = ckpt.find(self.run_dir, self.identity)
        if t.on_nonfinite == "stop" or found is None:
            raise NonFiniteError(
                f"{st.nonfinite_in_row} non-finite losses/gradients in a row at step {st.step}; "
                f"stopping (train.on_nonfinite={t.on_nonfinite}); checkpoints in "
                f"{self.run_dir / ckpt.CKPT_DIR} are intact"
            )
        keep = {"nonfinite_total": st.nonfinite_total, "lr_scale": st.lr_scale, "wandb_id": st.wandb_id}
        st.load_state_dict({**restore(self.saver, found, False, None, self.module, self.d), **keep})
        self.nonfinite.rolled_back()
        log.warning(
            "rolled back to checkpoint step=%d after %d non-finite steps; lr scale now %.3g (the data stream moves on)",
            st.step,
            t.nonfinite_patience,
            st.lr_scale,
        )

    # ------------------------------------------------------------------ evaluation, saving, the end
    def _missed_eval(self, step: int) -> bool:
        """A step-scheduled evaluation of ``step`` that is not in the (restored) summary: a signal stops the loop
        before the step's evaluation, and the resumed run starts after that step."""
        ev = self.evaluation
        return (
            ev is not None
            and 0 < step < self.stop
            and self.evals.due_by_steps(step)
            and f"{ev.summary_prefix}_step{step}" not in self.summary
        )

    def evaluate(self, tag: str) -> None:
        ev = self.evaluation
        if ev is None:
            return
        with self.clock.pause():
            res = ev.run(self.engine.module, self.device)
        res.update({"time/train_s": self.clock.train_s(), "time/train_device_hours": self.clock.device_hours()})
        self.logger.log(res, step=self.state.step)
        self.summary[f"{ev.summary_prefix}_{tag}"] = res[ev.key]
        self.last_eval = res
        if self.d.is_main:
            log.info("%s (%s, step %d): %.2f", ev.key, tag, self.state.step, res[ev.key])
        self._live_report()

    def save(self) -> None:
        st = self.state
        st.train_s, st.device_hours = self.clock.train_s(), self.clock.device_hours()
        st.wandb_id = self.logger.wandb_id
        prefix = self.evaluation.summary_prefix if self.evaluation else "final_loss"
        st.summary = {k: v for k, v in self.summary.items() if k.startswith((prefix + "_", "final_loss"))}
        hooks = cast(StepHooks, self.module)
        with self.clock.pause():  # saving is not training time
            self.saver.save(
                st.step,
                st.state_dict(),
                self.loader.state_dict(),
                hooks.checkpoint_state(),
                extra=lambda tmp: self.task.export(self.engine, tmp, self.d.is_main),
            )
        self.saves.saved()

    def _finish(self, stopped_by: str | None, rate: float) -> dict:
        st = self.state
        self.summary.update(
            steps=st.step,
            train_seconds=self.clock.train_s(),
            device_hours=self.clock.device_hours(),
            img_per_s=rate,
            nonfinite_skipped=st.nonfinite_total,
            collectives_per_step=self.flags.collectives / max(self._steps_run(), 1),
            train_pflops=st.train_flops / 1e15,
        )
        if stopped_by == "signal":
            self.save()
            self.summary["exit_code"] = ckpt.EXIT_REQUEUE
            self.logger.close()
            return self.summary
        ev = self.evaluation  # a run signalled at its last step resumes with nothing to train: still evaluate it
        unevaluated = ev is not None and f"{ev.summary_prefix}_final" not in self.summary
        if self.found is None or st.step > self._start_step or unevaluated:
            self.evaluate("final")
            self.save()
        self.task.export(self.engine, self.run_dir, self.d.is_main)
        if self.d.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(self.summary, indent=2))
        self._live_report()  # finished: the static page
        self.logger.close()
        return self.summary

    def _live_report(self) -> None:
        """Rank 0 has the task rewrite its report (tasks with a ``write_report(run_dir)``, e.g. pre-training's
        ``RUN_DIR/report.html``, which reloads itself while the run trains). Not training time."""
        write = getattr(self.task, "write_report", None)
        if not (self.d.is_main and write is not None):
            return
        with self.clock.pause():
            self.logger.flush()
            write(self.run_dir)

    def _can_roll_back(self) -> bool:
        return bool(ckpt.candidates(self.run_dir))

    @property
    def _start_step(self) -> int:
        return int(self.found.meta["step"]) if self.found is not None else 0

    def _steps_run(self) -> int:
        return self.state.step - self._start_step + self.state.nonfinite_total


def rank_seed(seed: int, rank: int) -> int:
    """The seed of ``rank``'s random stream after initialisation (rank 0 keeps ``seed``; distinct per rank)."""
    return (seed + 1_000_003 * rank) % 2**63


class _Window:
    """Per-metric sums of the micro-batches since the last log, kept on the device (no sync)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.n = 0

    def add(self, metrics: dict[str, torch.Tensor]) -> None:
        for k, v in metrics.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.n += 1

    def with_(self, metrics: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The sums including ``metrics`` (the micro-batch whose step is being decided), not stored."""
        return {k: self.sums.get(k, 0.0) + v.detach().float() for k, v in metrics.items()}

    def clear(self) -> None:
        self.sums, self.n = {}, 0


class _StepResult(NamedTuple):
    agreed: Agreed
    dropped: bool  # the step was not taken, on every rank
    action: str  # the non-finite policy's answer: continue / stop / rollback
