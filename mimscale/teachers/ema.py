"""EMA teacher: an fp32 moving average of a student submodule, correct at every ZeRO stage.

Any objective can hold one (or several) :class:`EMATeacher` per student submodule::

    hold_outside(self, "teacher", EMATeacher(self.encoder))  # deepcopy NOW, before DeepSpeed touches the student
    def private_modules(self): return [self.teacher]          # the engine moves it to the device
    def after_optimizer_step(self, ctx):
        self.teacher.update(ctx, self.encoder, cosine_to_one(ctx.step, ctx.total_steps, 0.996))
    def checkpoint_state(self): return {"teacher": self.teacher.checkpoint_state()}

The update reads the student's FULL fp32 master weights through ``ctx.master_params(student)`` (the optimizer's
fp32 copy under bf16 / ZeRO-1/2; gathered shard-wise under ZeRO-3, a collective that every rank runs in the
same order), so ``(1 - m) * delta`` never underflows bf16 and never reads a partition or a stale working copy.
Parameters are matched by name; buffers (e.g. BatchNorm running statistics) are not averaged. The teacher stays
fp32 and replicated on every rank (the same update on the same gathered weights keeps the replicas equal); a
bf16 forward casts at forward time (e.g. under ``torch.autocast``).
"""
from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError


def hold_outside(owner: nn.Module, name: str, module: nn.Module) -> None:
    """Set ``owner.<name> = module`` WITHOUT registering it as a submodule.

    A teacher must stay out of the objective's module tree: DeepSpeed ZeRO-3 walks ``engine.module.parameters()``
    after every step and fails on parameters it does not manage ("no attribute 'ds_active_sub_modules'"), and
    ``objective.bfloat16()`` / ``.train()`` / ``state_dict()`` must not reach it either (fp32, own mode, saved
    via ``checkpoint_state``). Return it from ``private_modules()`` so the engine moves it to the device.
    """
    object.__setattr__(owner, name, module)


def cosine_to_one(step: int, total_steps: int, m0: float) -> float:
    """``m(it) = 1 - (1 - m0) * (1 + cos(pi * it / T)) / 2``: ``m0`` at 0, rising to 1 at ``T`` (and after)."""
    if total_steps <= 0:
        return 1.0
    it = min(max(step, 0), total_steps)
    return 1.0 - (1.0 - m0) * (1.0 + math.cos(math.pi * it / total_steps)) / 2.0


def momentum_at(schedule: str, step: int, total_steps: int, m0: float) -> float:
    """Momentum of a named schedule: ``"cosine_to_1"`` (:func:`cosine_to_one`) or ``"constant"`` (``m0``)."""
    if schedule == "cosine_to_1":
        return cosine_to_one(step, total_steps, m0)
    if schedule == "constant":
        return float(m0)
    raise ValueError(f"unknown EMA momentum schedule {schedule!r} (cosine_to_1 | constant)")


class EMATeacher(nn.Module):
    """fp32 copy of ``student`` (taken at construction), moved only by :meth:`update`.

    ``forward(*args)`` runs the copy. Its parameters have ``requires_grad=False`` and must never reach an
    optimizer: hold it with :func:`hold_outside` and return it from the objective's ``private_modules()`` (not
    ``frozen_modules()``, which would force eval mode: the mode is the objective's choice, e.g. train mode for
    BatchNorm batch statistics). ``deterministic=True`` turns stochastic depth and dropout off in the copy (a
    teacher target must not be noisy); parameter names are unchanged by that.
    """

    def __init__(self, student: nn.Module, deterministic: bool = True):
        super().__init__()
        self.module = copy.deepcopy(student).float().requires_grad_(False)
        if deterministic:
            for m in self.module.modules():
                if isinstance(m, nn.Dropout) or type(m).__name__ == "DropPath":
                    m.p = 0.0

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    @torch.no_grad()
    def update(self, ctx, student: nn.Module, momentum: float) -> None:
        """``t = m * t + (1 - m) * s`` in fp32 for every trainable student parameter (matched by name).

        ``ctx.master_params(student)`` yields ``(name, full fp32 master value)``; under ZeRO-3 it is a collective,
        so EVERY rank must call ``update`` at the same point. ``student`` must be a submodule of the objective
        with the same structure as the copy. Frozen student parameters (not yielded) keep their copied value.
        """
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"EMA momentum {momentum} must be in [0, 1]")
        mine = dict(self.module.named_parameters())
        for name, value in ctx.master_params(student):
            t = mine.get(name)
            if t is None or tuple(t.shape) != tuple(value.shape):
                got = None if t is None else tuple(t.shape)
                raise ValueError(f"EMA teacher has no parameter '{name}' of shape {tuple(value.shape)} (got {got})")
            v = value.to(device=t.device, dtype=torch.float32)
            if momentum == 0.0:
                t.copy_(v)
            elif momentum < 1.0:
                t.mul_(momentum).add_(v, alpha=1.0 - momentum)

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """Parameters and buffers as CPU fp32 tensors (what a checkpoint carries)."""
        return {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`checkpoint_state`; keys and shapes must match exactly (CheckpointError otherwise)."""
        own = self.module.state_dict()
        missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or extra:
            raise CheckpointError(f"EMA teacher state does not match the model: missing {missing[:3]}, "
                                  f"unexpected {extra[:3]}")
        bad = [k for k, v in state.items() if tuple(v.shape) != tuple(own[k].shape)]
        if bad:
            raise CheckpointError(f"EMA teacher state has wrong shapes for {bad[:3]}")
        with torch.no_grad():
            for k, v in own.items():
                v.copy_(state[k].to(device=v.device, dtype=v.dtype))
