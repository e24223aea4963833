"""Run state that outlives a process: cross-rank flags, the training clock, signals, checkpoint restore."""
from __future__ import annotations

import logging
import os
import signal
import time

import torch
import torch.distributed as tdist

from .. import checkpoint as ckpt
from .. import config as C
from .. import dist
from ..data.loader import ShardLoader

log = logging.getLogger("mimscale.train")


def mean_across_ranks(values: dict[str, torch.Tensor], device) -> dict[str, float]:
    keys = sorted(values)
    t = torch.stack([values[k].detach().float().to(device) for k in keys])
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        tdist.all_reduce(t)
        t /= tdist.get_world_size()
    return {k: v for k, v in zip(keys, t.tolist())}


def all_ranks(value: int, device) -> list[int]:
    t = torch.tensor([value], dtype=torch.long, device=device)
    if not (tdist.is_initialized() and tdist.get_world_size() > 1):
        return [value]
    out = [torch.zeros_like(t) for _ in range(tdist.get_world_size())]
    tdist.all_gather(out, t)
    return [int(o.item()) for o in out]


def any_rank(flag: bool, device) -> bool:
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item())


class Signals:
    """SIGUSR1/SIGTERM (SLURM's warning signal, preemption) -> finish the step, save, exit EXIT_REQUEUE."""

    def __init__(self):
        self.received: int | None = None
        self.pid = os.getpid()          # loader workers inherit the handler: only this process logs
        self._old = {}
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:              # not the main thread (e.g. an embedding app): no handler
                pass

    def _handle(self, signum, frame) -> None:
        self.received = signum
        if os.getpid() == self.pid:
            log.warning("received %s: saving after this step", signal.Signals(signum).name)

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class Clock:
    """Training time (evaluation excluded) and device-hours, carried across resumes."""

    def __init__(self, world_size: int, train_s: float = 0.0, device_hours: float = 0.0):
        self.world_size, self.prior_s, self.prior_dh = world_size, train_s, device_hours
        self.start, self.eval_s = time.time(), 0.0

    def segment_s(self) -> float:
        return time.time() - self.start - self.eval_s

    def train_s(self) -> float:
        return self.prior_s + self.segment_s()

    def device_hours(self) -> float:
        return self.prior_dh + self.segment_s() * self.world_size / 3600.0

    def state(self) -> dict:
        return {"train_s": self.train_s(), "device_hours": self.device_hours()}


def identity(cfg: C.Config) -> dict:
    """What must match for a checkpoint to belong to this run."""
    m = cfg.model
    return {"objective": cfg.objective["name"], "arch": m.arch, "img_size": m.img_size, "patch_size": m.patch_size,
            "in_chans": m.in_chans, "pos_embed": m.pos_embed}


def restore(saver: ckpt.Checkpointer, found: ckpt.Found, universal: bool, loader: ShardLoader | None,
             objective, d: dist.DistEnv) -> dict:
    """Load ``found`` (engine, objective state, RNG, and unless ``loader`` is None this rank's data position);
    returns the trainer state."""
    got = saver.load(found, universal)
    objective.load_checkpoint_state(got["objective"])
    if loader is not None and got["loader"] is not None:
        loader.load_state_dict(got["loader"])
    elif loader is not None:
        loader.set_epoch(got["epoch"])
        if d.is_main:
            log.warning("world size %d -> %d: the data position cannot be mapped exactly; the loader restarts "
                        "epoch %d with the new layout", found.meta["world_size"], d.world_size, got["epoch"])
    if d.is_main:
        how = f" (universal checkpoint, world size {found.meta['world_size']} -> {d.world_size})" if universal else ""
        log.info("resumed from checkpoint step=%d%s", got["trainer"]["step"], how)
    return got["trainer"]
