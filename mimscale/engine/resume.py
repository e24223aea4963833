"""What identifies a run's checkpoints, and restoring one (engine, objective, RNG, data position)."""

from __future__ import annotations

import logging

import torch
import torch.distributed as tdist

from .. import checkpoint as ckpt
from .. import config as C
from .. import dist
from ..errors import DataError

log = logging.getLogger("mimscale.train")


def identity(cfg: C.Config) -> dict:
    """What must match for a checkpoint to belong to this run."""
    m = cfg.model
    return {
        "objective": cfg.objective["name"],
        "arch": m.arch,
        "img_size": m.img_size,
        "patch_size": m.patch_size,
        "in_chans": m.in_chans,
        "pos_embed": m.pos_embed,
    }


def restore(saver: ckpt.Checkpointer, found: ckpt.Found, universal: bool, loader, objective, d: dist.DistEnv) -> dict:
    """Load ``found`` (engine, objective state, RNG, and unless ``loader`` is None this rank's data position);
    returns the saved trainer state (a ``TrainState.state_dict()``)."""
    got = saver.load(found, universal)
    objective.load_checkpoint_state(got["objective"])
    if loader is not None and got["loader"] is not None:
        try:
            loader.load_state_dict(got["loader"])
        except DataError as e:  # data.num_workers, micro-batch size, ... changed
            loader.set_epoch(got["epoch"])
            if d.is_main:
                log.warning(
                    "the data position cannot be restored exactly (%s); the loader restarts epoch %d", e, got["epoch"]
                )
    elif loader is not None:
        loader.set_epoch(got["epoch"])
        if d.is_main:
            log.warning(
                "world size %d -> %d: the data position cannot be mapped exactly; the loader restarts "
                "epoch %d with the new layout",
                found.meta["world_size"],
                d.world_size,
                got["epoch"],
            )
    if d.is_main:
        how = f" (universal checkpoint, world size {found.meta['world_size']} -> {d.world_size})" if universal else ""
        log.info("resumed from checkpoint step=%d%s", got["trainer"]["step"], how)
    return got["trainer"]


def all_ranks(value: int, device) -> list[int]:
    """``value`` of every rank (start-up only: one all_gather)."""
    t = torch.tensor([value], dtype=torch.long, device=device)
    if not (tdist.is_initialized() and tdist.get_world_size() > 1):
        return [value]
    out = [torch.zeros_like(t) for _ in range(tdist.get_world_size())]
    tdist.all_gather(out, t)
    return [int(o.item()) for o in out]
