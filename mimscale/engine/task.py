"""What a :class:`~mimscale.engine.trainer.Trainer` trains: a ``Task`` builds the module, its data and its
evaluation; the Trainer owns everything else (engine, schedule, flags, checkpoints, logging, the clock).
Pre-training (:mod:`mimscale.pretrain`) and fine-tuning (:mod:`mimscale.eval.finetune`) are the two tasks.

The trained module is what DeepSpeed wraps. ``forward(batch) -> LossOutput`` (``.loss`` scalar,
``.metrics`` dict of scalar tensors, the same keys on every rank) and the step hooks of
:class:`mimscale.objectives.Objective` (``before_step``, ``after_optimizer_step``, ``checkpoint_state``,
``load_checkpoint_state``, ``flops_per_sample``; ``frozen_modules``/``private_modules`` optional).
:class:`TaskModule` gives a module the no-op hooks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from .. import config as C
from .. import dist


class TaskModule(nn.Module):
    """Base of a trained module that needs none of the objective hooks (e.g. a fine-tuned classifier)."""

    def before_step(self, ctx) -> None:
        pass

    def after_optimizer_step(self, ctx) -> None:
        pass

    def checkpoint_state(self) -> dict[str, Any]:
        return {}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        pass

    def flops_per_sample(self) -> float:
        return 0.0


@dataclass
class Evaluation:
    """A periodic evaluation: ``run(module, device) -> metrics`` (``key`` is the headline metric; its value
    also goes into the summary as ``<summary_prefix>_<tag>``)."""

    run: Callable[[nn.Module, torch.device], dict[str, float]]
    key: str
    summary_prefix: str
    every_steps: int = 0
    every_minutes: float | None = None
    at_start: bool = False


class StepHooks(Protocol):
    """The hooks the Trainer calls on the trained module besides ``forward`` (an Objective or a TaskModule)."""

    def before_step(self, ctx) -> None: ...

    def after_optimizer_step(self, ctx) -> None: ...

    def checkpoint_state(self) -> dict[str, Any]: ...

    def load_checkpoint_state(self, state: dict[str, Any]) -> None: ...

    def flops_per_sample(self) -> float: ...


class Task(Protocol):
    name: str

    def samples_per_epoch(self) -> int: ...

    def identity(self) -> dict: ...

    def write_config(self, derived: C.Derived, run_dir: Path) -> None: ...

    def build(self) -> nn.Module: ...

    def param_groups(self, module: nn.Module) -> list[dict] | None: ...

    def loader(self, module: nn.Module, derived: C.Derived, d: dist.DistEnv, accelerator: str): ...

    def evaluation(self, d: dist.DistEnv, derived: C.Derived) -> Evaluation | None: ...

    def summary(self) -> dict[str, Any]: ...

    def export(self, engine, run_dir: Path, is_main: bool) -> None: ...

    # optional: ``write_report(run_dir)``, called on rank 0 after every evaluation and at the end (pre-training's
    # live report.html); the engine never imports the report package itself
