"""The objective (loss plugin) contract and its registry.

An objective is one ``nn.Module`` in one file that owns everything specific to it (decoder, heads,
teachers, mask policy, targets, loss). The engine wraps that one module and never branches on its name.
Third-party packages register more through the entry-point group ``mimscale.objectives``.
"""

from __future__ import annotations

import abc
import dataclasses
import difflib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from ..errors import ConfigError
from ..masking import MaskGenerator, MaskSpec
from ..models.vit import VisionTransformer

ENTRY_POINT_GROUP = "mimscale.objectives"
_REGISTRY: dict[str, type[Objective]] = {}


class LossOutput(NamedTuple):
    loss: torch.Tensor  # scalar, fp32, what backward() is called on
    metrics: dict[str, torch.Tensor]  # named scalars logged under train/


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _own_params(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    for n, p in module.named_parameters():
        yield n, p.detach().float()


@dataclass
class StepContext:
    """What the engine tells an objective's step hooks. ``step`` counts optimizer steps: in
    ``before_step`` the step about to run (0-based), in ``after_optimizer_step`` the steps done (1-based).

    ``master_params(module)`` yields ``(name, fp32 tensor)`` for every trainable parameter of ``module`` (a
    submodule of the objective) with the FULL fp32 master value, at any ZeRO stage and precision; under
    ZeRO-3 it is a collective, so every rank must call it. ``master_shards(module)`` (ZeRO-3 only, else ``None``
    or unset) gives each rank's own fp32 master partition per parameter instead, without a collective (see
    :mod:`mimscale.teachers.ema`). ``master_fragments(module)`` (ZeRO 1-2 and DeepSpeed's bf16 optimizer, whose
    fp32 masters are partitioned across ranks; else ``None`` or unset) gives, per parameter, ``(name, start,
    fp32 piece)``: this rank's elements ``[start, start + len)`` of the flattened master, without a collective.
    ``all_reduce_mean(t)`` averages ``t`` across
    data-parallel ranks in place and returns it (identity on one rank).

    ``loss_scale``: the factor the engine multiplies the loss by before ``backward`` in this step's micro-batches
    (fp16 dynamic loss scaling: the engine's current scale, read before the step; it only changes in
    ``engine.step()``). Gradients an objective reads in its own hooks are that many times too large; 1.0 for
    bf16 and fp32.
    """

    step: int = 0
    total_steps: int = 1
    epoch: float = 0.0
    lr: float = 0.0  # this step's main lr
    lr_factor: float = 1.0  # lr / peak lr: the warmup+cosine shape, for objectives' own optimizers
    rank: int = 0
    world_size: int = 1
    grad_accum: int = 1
    master_params: Callable[[nn.Module], Iterator[tuple[str, torch.Tensor]]] = _own_params
    master_shards: Callable[[nn.Module], list[tuple[str, torch.Tensor]] | None] | None = None
    master_fragments: Callable[[nn.Module], list[tuple[str, int, torch.Tensor]] | None] | None = None
    all_reduce_mean: Callable[[torch.Tensor], torch.Tensor] = _identity
    loss_scale: float = 1.0


class Objective(nn.Module, metaclass=abc.ABCMeta):
    """Base class. Subclasses set ``name`` and ``Config`` (a dataclass of the method's knobs) and implement
    ``forward`` and ``flops_per_sample`` (abstract: a missing one fails at construction, before any engine);
    the other hooks have working defaults. docs/objectives/template.py is a complete, tested example.

    ``forward(batch)`` gets the collated batch: ``image float [B, C, H, W]`` (fp32, normalised),
    ``label long [B]`` and whatever ``mask_spec()`` asked the collate for (e.g. ``mask bool [B, N]``).
    """

    name: ClassVar[str]
    Config: ClassVar[type]
    #: where the method's defaults come from, shown by `mimscale objectives` (official code, or why not)
    reference: ClassVar[str] = ""
    #: trains on smaller grids early on (``train.resolution_schedule``): ``forward`` follows the batch's grid
    #: (``image`` of a smaller multiple of the patch size, masks of :meth:`mask_spec_at`) and
    #: :meth:`flops_per_sample_at` counts it; objectives without it refuse the schedule in one line
    supports_resolution_schedule: ClassVar[bool] = False

    def __init__(self, encoder: VisionTransformer, cfg):
        super().__init__()
        self.encoder = encoder
        self.cfg = cfg

    def mask_spec(self) -> MaskGenerator:
        """What the collate generates per batch: a ``MaskSpec`` or any picklable object with
        ``generate(batch: int, generator) -> dict[str, Tensor]`` (runs in loader workers, on CPU)."""
        return MaskSpec("none", self.encoder.num_patches)

    def mask_spec_at(self, img_size: int) -> MaskGenerator:
        """The masks for ``img_size`` images (progressive resolution; only with ``supports_resolution_schedule``)."""
        if img_size != self.encoder.img_size:
            raise NotImplementedError(f"{type(self).__name__} trains only at model.img_size={self.encoder.img_size}")
        return self.mask_spec()

    def flops_per_sample_at(self, img_size: int) -> float:
        """Training FLOPs per image of ``img_size`` pixels (progressive resolution)."""
        if img_size != self.encoder.img_size:
            raise NotImplementedError(f"{type(self).__name__} trains only at model.img_size={self.encoder.img_size}")
        return self.flops_per_sample()

    def train_transform(self, default: Callable) -> Callable:
        """The per-sample training transform ``(PIL image, generator) -> Tensor | dict[str, Tensor]``.

        ``default`` is the recipe's RandomResizedCrop+flip+normalise (``data.*``). Return it, or a picklable
        transform of your own (multi-crop, two views sharing geometry, ...). A dict must hold ``image``;
        its other entries become batch keys (stacked)."""
        return default

    @abc.abstractmethod
    def forward(self, batch: dict) -> LossOutput:
        """The loss of one micro-batch (fp32 scalar) and named scalars to log (same keys on every rank)."""

    @classmethod
    def tiny_config(cls):
        """Knobs for a tiny model (a ``vit_micro`` cut to 2 blocks, 16 px images, patch 4 -> 16 tokens) that
        tests and the contract test (tests/objectives/test_contract.py) build in milliseconds. Default: the
        default ``Config`` with every int knob whose name holds ``heads``/``depth``/``dim`` shrunk to at most
        4/1/48 (48 is divisible by every head count up to 16 and by 4 for 2-D sin-cos tables). Override it when
        a knob cannot be shrunk that way (a width that must match a teacher)."""
        changes = {}
        for f in dataclasses.fields(cls.Config):
            default = (
                f.default
                if f.default is not dataclasses.MISSING
                else (f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            )
            if type(default) is not int:
                continue
            for word, small in (("heads", 4), ("depth", 1), ("dim", 48)):
                if word in f.name.lower():
                    changes[f.name] = min(default, small)
                    break
        return dataclasses.replace(cls.Config(), **changes)

    def cached_targets(self) -> dict | None:
        """Per-sample targets this objective reads from the shards, for the loader to check against the
        manifest (:func:`mimscale.data.targets.check_targets`, called before the loader starts: field names, image
        size, crop rule); None: none."""
        return None

    def train(self, mode: bool = True):
        """``nn.Module.train`` that leaves frozen teachers in eval mode (``engine.train()`` recurses)."""
        super().train(mode)
        for m in self.frozen_modules():
            m.eval()
        return self

    def frozen_modules(self) -> list[nn.Module]:
        """Teachers: not optimised, not ZeRO-partitioned, not saved in checkpoints. The engine sets them
        ``eval()`` and ``requires_grad_(False)``, moves them to the device and takes them out of the wrapped
        module's tree (they stay reachable as attributes), so ZeRO-3, ``state_dict`` and dtype casts skip them."""
        return []

    def private_modules(self) -> list[nn.Module]:
        """Modules the objective manages itself, outside DeepSpeed (EMA teachers, adversarial parameters
        with their own optimizer): not partitioned, not in the engine's optimizer or grad clipping, kept in
        fp32, moved to the device, mode and ``requires_grad`` untouched, taken out of the wrapped module's
        tree like frozen modules (or never put in it: ``teachers.ema.hold_outside``). Persist them via
        ``checkpoint_state``."""
        return []

    def checkpoint_state(self) -> dict[str, Any]:
        """State outside DeepSpeed that a checkpoint must carry (EMA teacher, adversarial params and their
        optimizer). Replicated on every rank; rank 0's copy is saved. Tensors, numbers, dicts, lists only."""
        return {}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        """Inverse of ``checkpoint_state`` (called on every rank after the engine state is loaded)."""
        if state:
            raise ValueError(f"{type(self).__name__} got checkpoint state {sorted(state)} it does not use")

    def before_step(self, ctx: StepContext) -> None:
        """Called once before every optimizer step (before its micro-batches): schedules inside the objective
        (``ctx.epoch``, ``ctx.lr_factor``)."""

    def after_optimizer_step(self, ctx: StepContext) -> None:
        """Called once after every optimizer step (EMA updates, adversarial ascent, projections)."""

    @abc.abstractmethod
    def flops_per_sample(self) -> float:
        """Training FLOPs per image (3x forward of trained modules + 1x forward of frozen ones)."""

    def no_weight_decay(self) -> set[str]:
        """Parameter names (as in ``named_parameters()``) excluded from weight decay besides 1-D ones."""
        return {f"encoder.{n}" for n in self.encoder.no_weight_decay()}


def init_encoder(encoder: VisionTransformer, scheme: str) -> None:
    """Re-initialise ``encoder`` with ``scheme`` (the objective's ``init`` knob, see
    :meth:`VisionTransformer.init_weights`) unless it was last initialised with that scheme (then it is
    left as built: no second draw). Objectives call this first in ``__init__``, before copying the encoder
    (EMA teachers), so the copy starts from the same weights."""
    from ..models.vit import INIT_SCHEMES

    if scheme not in INIT_SCHEMES:
        raise ConfigError(f"objective.init={scheme!r} is not one of {', '.join(INIT_SCHEMES)}")
    if getattr(encoder, "init_scheme", None) != scheme:
        encoder.init_weights(scheme)


def token_no_decay(objective: Objective, mask_tokens: set[str]) -> set[str]:
    """``no_weight_decay()`` names under the objective's ``wd_cls_token`` / ``wd_mask_token`` knobs.

    Starts from the encoder's list (``encoder.cls_token``, a learned ``encoder.pos_embed``); with
    ``wd_cls_token`` the cls token is decayed (it is a 3-D tensor, so the 1-D rule never spares it); without
    ``wd_mask_token`` the objective's ``mask_tokens`` (its 3-D mask / auxiliary tokens) are spared."""
    names = {f"encoder.{n}" for n in objective.encoder.no_weight_decay()}
    if getattr(objective.cfg, "wd_cls_token", False):
        names.discard("encoder.cls_token")
    if not getattr(objective.cfg, "wd_mask_token", False):
        names |= set(mask_tokens)
    return names


def require_absolute_pos(encoder: VisionTransformer, name: str) -> None:
    """ConfigError for ``model.pos_embed=relative`` in objectives that add absolute positions themselves."""
    if encoder.pos_embed is None:
        raise ConfigError(
            f"objective {name} needs an absolute position embedding: set model.pos_embed=sincos "
            "(or learned); model.pos_embed=relative is for mae, conmim and dtm"
        )


def register(cls: type[Objective]) -> type[Objective]:
    """Make ``cls`` available under ``cls.name``. Objectives are registered by their ``mimscale.objectives``
    entry point (built-ins in mimscale's own pyproject.toml, plugins in theirs); this is what loads them."""
    if not getattr(cls, "name", None):
        raise TypeError(f"{cls.__name__} needs a class attribute 'name'")
    if not dataclasses.is_dataclass(getattr(cls, "Config", None)):
        raise TypeError(f"{cls.__name__} needs a dataclass 'Config' of its knobs")
    other = _REGISTRY.get(cls.name)
    if other is not None and other is not cls:
        raise TypeError(f"objective '{cls.name}' is registered twice ({other.__module__}, {cls.__module__})")
    _REGISTRY[cls.name] = cls
    return cls


def _load_entry_points() -> None:
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _REGISTRY:
            continue
        cls = ep.load()
        if not (isinstance(cls, type) and issubclass(cls, Objective)):
            raise ConfigError(f"entry point '{ep.name}' ({ep.value}) is not an Objective subclass")
        if getattr(cls, "name", None) != ep.name:
            raise ConfigError(f"entry point '{ep.name}' names class {cls.__name__} whose name is '{cls.name}'")
        register(cls)


def available() -> dict[str, type[Objective]]:
    """All objectives: built-in and from installed packages' entry points."""
    _load_entry_points()
    return dict(sorted(_REGISTRY.items()))


def objective_class(name: str) -> type[Objective]:
    if name not in _REGISTRY:
        _load_entry_points()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown objective.name '{name}'{hint}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def build_objective(name: str, encoder: VisionTransformer, knobs) -> Objective:
    return objective_class(name)(encoder, knobs)
