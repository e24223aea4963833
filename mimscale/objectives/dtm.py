"""DTM: masked image modeling with dynamic token morphing of teacher targets (docs/objectives/dtm.md).

Data flow (shapes for ViT-B/16 at 224 px: N = 196, D = 768, teacher dim Dt = 512):

* masking (collate, CPU): BEiT block-wise masks with an exact count, ``mask bool [B, N]``
  (``round(0.383 N)`` = 75 of 196 by default; ``MaskSpec("block")``);
* student: the encoder on ALL N patch tokens with a learned mask token in place of the patch embedding
  at masked slots (before the position embedding), cls prepended, final norm, cls dropped, a linear head
  D -> Dt on every token: ``u [B, N, Dt]``;
* teacher targets ``v [B, N, Dt]`` (fp32, no gradient): ``target_source: online`` runs the frozen CLIP
  image tower (a ``frozen_modules()`` entry) on the same normalised tensor as the student (official
  behaviour; ``teacher_norm: clip`` re-normalises with CLIP's statistics); ``target_source: shards`` reads
  the per-sample cache ``batch["clip.npy"]`` written by ``mimscale data add-targets`` - the train
  transform is then the deterministic centre crop the cache was built on plus the photometric jitter;
* dynamic schedule (drawn per micro-batch, i.e. per loader iteration as in the official code, from a
  generator seeded by (schedule_seed, rank, step, micro-batch index)): for each of L levels a total merge
  count ``n ~ U{0..max_merges}`` and iterations ``k ~ U{1..max_iters}``;
* token morphing (per level, no gradient): ToMe-style bipartite matching on the teacher features only
  (:func:`morph_groups`), giving every original token a group; both ``u`` and ``v`` are replaced token-wise
  by their group mean (:func:`group_mean`, fp32);
* loss: smooth-L1 (beta = 2) over all tokens (visible and masked), channels and batch, averaged over levels.
  ``normalize_target`` standardises each AGGREGATED (morphed) target token over its channels with the
  unbiased variance, ``(t - mean) / sqrt(var + 1e-6)``, per level (official code); the matching always uses
  the raw teacher features.

Position embedding: the official student is a BEiT encoder with a shared relative position bias and no
absolute position embedding; the recipes set ``model.pos_embed=relative`` for that (``sincos`` is a knob).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..data.photometric import ColorJitter, JitterThen
from ..errors import ConfigError, DataError
from ..masking import MaskSpec
from ..models.vit import VisionTransformer, init_linear_, init_token_
from ..ranges import num
from ..telemetry.flops import linear_flops, transformer_forward_flops
from .base import LossOutput, Objective, StepContext, init_encoder, token_no_decay

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ----------------------------------------------------------------------------- data side (CPU workers)


# ----------------------------------------------------------------------------- schedule and morphing


def merges_per_iteration(total: int, iters: int, num_tokens: int) -> int:
    """``r = ceil(n / k)``, or ``floor(n / k)`` when ``ceil(n / k) * k`` would exceed the token count."""
    r = -(-total // iters)
    return total // iters if r * iters > num_tokens else r


def draw_schedule(
    generator: torch.Generator, num_levels: int, max_merges: int, max_iters: int, num_tokens: int
) -> list[tuple[int, int]]:
    """One step's schedule: per level ``(r, k)`` = (merges per iteration, iterations), from
    ``n ~ U{0..max_merges}`` and ``k ~ U{1..max_iters}``."""
    out = []
    for _ in range(num_levels):
        n = int(torch.randint(0, max_merges + 1, (), generator=generator))
        k = int(torch.randint(1, max_iters + 1, (), generator=generator))
        out.append((merges_per_iteration(n, k, num_tokens), k))
    return out


def step_generator(seed: int, rank: int, step: int, micro: int = 0) -> torch.Generator:
    """A CPU generator for one (seed, rank, step, micro-batch): reproducible, different per rank, no global RNG."""
    mixed = (seed * 0x9E3779B1 + rank * 0x85EBCA77 + step * 0xC2B2AE3D + micro * 0x165667B1 + 0x27D4EB2F) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)


def standardize_tokens(t: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per token over channels, fp32: ``(t - mean) / sqrt(var_unbiased + eps)``; ``t [B, N, D] -> [B, N, D]``."""
    t = t.float()
    return (t - t.mean(dim=-1, keepdim=True)) / (t.var(dim=-1, keepdim=True, unbiased=True) + eps).sqrt()


def group_sums(x: torch.Tensor, assign: torch.Tensor, num_groups: int) -> torch.Tensor:
    """``x [B, N, D]``, ``assign long [B, N]`` (group of each token) -> per-group sums ``[B, T, D]``
    (``S . X`` with the membership matrix S of ``assign``)."""
    out = x.new_zeros(x.shape[0], num_groups, x.shape[-1])
    return out.scatter_add(1, assign.unsqueeze(-1).expand_as(x), x)


def group_mean(x: torch.Tensor, assign: torch.Tensor, num_groups: int, eps: float = 1e-6) -> torch.Tensor:
    """Every token replaced by its group's mean: ``S^T (S X / (rowsum(S) + eps))``, in fp32.

    ``x [B, N, D]`` (any float dtype; differentiable), ``assign long [B, N]`` -> ``[B, N, D]`` fp32.
    """
    x = x.float()
    sizes = group_sums(torch.ones_like(x[..., :1]), assign, num_groups)  # [B, T, 1]
    means = group_sums(x, assign, num_groups) / (sizes + eps)  # [B, T, D]
    return means.gather(1, assign.unsqueeze(-1).expand_as(x))


def membership(assign: torch.Tensor, num_groups: int) -> torch.Tensor:
    """The binary membership matrix ``S [B, T, N]``: ``S[b, g, i] = 1`` iff token i is in group g."""
    return F.one_hot(assign, num_groups).transpose(1, 2).float()


@torch.no_grad()
def morph_groups(
    feats: torch.Tensor, merges: int, iters: int, protect_first: bool = True, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, int]:
    """Bipartite token merging on teacher features: ``feats [B, N, Dt]`` -> ``(assign long [B, N], T)``.

    Starts from N singleton groups. Each of ``iters`` iterations: the current group features (size-weighted
    means of the members, i.e. group means of ``feats``) are L2-normalised; the current sequence is split
    into A (even positions) and B (odd positions) - with ``generator`` given, the positions are first
    shuffled (a "random" split; a protected first token stays first); every A-group picks its most
    cosine-similar B-group and the ``r = min(merges, floor((T - protected) / 2))`` A-groups with the
    highest best-similarity join their partner. The next sequence is the unmerged A-groups in order, then
    the B-groups, so a protected first token stays first and a singleton. ``assign[b, i]`` is the final
    group of original token i; ``T`` the final group count (N minus the merges done). No gradient.
    """
    b, n, _ = feats.shape
    dev = feats.device
    v = feats.float()
    assign = torch.arange(n, device=dev).expand(b, n).clone()
    t, protect = n, int(protect_first)
    for _ in range(iters):
        r = min(merges, (t - protect) // 2)
        if r <= 0:
            break
        x = F.normalize(group_sums(v, assign, t), dim=-1)  # [B, T, Dt] (sums ~ means)
        perm = None
        if generator is not None:
            rest = torch.randperm(t - protect, generator=generator) + protect  # CPU generator: reproducible
            perm = torch.cat([torch.arange(protect), rest]).to(dev, non_blocking=True)  # no stream sync
            x = x[:, perm]
        a, bb = x[:, 0::2], x[:, 1::2]  # [B, Ta, Dt], [B, Tb, Dt]
        scores = a @ bb.transpose(1, 2)  # [B, Ta, Tb]
        if protect:
            scores[:, 0] = -math.inf
        best, partner = scores.max(dim=-1)  # [B, Ta]
        order = best.argsort(dim=-1, descending=True, stable=True)
        src, unm = order[:, :r], order[:, r:].sort(dim=-1).values
        n_unm, ta, tb = unm.shape[1], a.shape[1], bb.shape[1]
        new_a = torch.empty(b, ta, dtype=torch.long, device=dev)
        new_a.scatter_(1, unm, torch.arange(n_unm, device=dev).expand(b, n_unm))
        new_a.scatter_(1, src, n_unm + partner.gather(1, src))
        new_pos = torch.empty(b, t, dtype=torch.long, device=dev)  # new group of each position
        new_pos[:, 0::2] = new_a
        new_pos[:, 1::2] = n_unm + torch.arange(tb, device=dev)
        remap = new_pos if perm is None else torch.empty_like(new_pos).index_copy_(1, perm, new_pos)
        assign = remap.gather(1, assign)
        t -= r
    return assign, t


def smooth_l1(pred: torch.Tensor, target: torch.Tensor, beta: float) -> torch.Tensor:
    """Mean of ``0.5 d^2 / beta if |d| < beta else |d| - 0.5 beta`` over all elements, fp32."""
    return F.smooth_l1_loss(pred.float(), target.float(), beta=beta)


def morphed_loss(
    u: torch.Tensor,
    v: torch.Tensor,
    schedule: list[tuple[int, int]],
    criterion=None,
    protect_first: bool = True,
    generator: torch.Generator | None = None,
    normalize_target: bool = False,
) -> tuple[torch.Tensor, list[int]]:
    """The DTM loss of student ``u [B, N, Dt]`` against teacher ``v [B, N, Dt]``: for each level ``(r, k)``
    of ``schedule`` the groups come from ``v`` alone (:func:`morph_groups`), both sides are replaced by
    their group means (fp32) and compared with ``criterion`` (default: smooth-L1, beta = 2) over all
    tokens; the mean over levels is returned with each level's group count. ``normalize_target``
    standardises the morphed targets per token (:func:`standardize_tokens`) AFTER the group means."""
    criterion = criterion or (lambda a, b: smooth_l1(a, b, 2.0))
    losses, groups = [], []
    for r, k in schedule:
        assign, t = morph_groups(v, r, k, protect_first, generator)
        if t == v.shape[1]:  # no merge happened: S = I
            pred, target = u.float(), v.float()
        else:
            pred, target = group_mean(u, assign, t), group_mean(v, assign, t)
        if normalize_target:
            target = standardize_tokens(target)
        losses.append(criterion(pred, target))
        groups.append(t)
    return torch.stack(losses).mean(), groups


# ----------------------------------------------------------------------------- teacher


def build_teacher(spec: str, arch: str | None = None, resize: str = "input", dtype: str = "fp32") -> nn.Module:
    """The frozen CLIP image tower named by ``objective.teacher`` (:class:`mimscale.teachers.clip.CLIPTeacher`):
    ``forward(images [B, C, H, W], grid) -> [B, gh*gw, Dt]`` patch features after ``ln_post`` and the
    visual projection. ``spec`` is a local checkpoint file (a mimscale CLIP file, or a plain open_clip
    checkpoint whose architecture ``arch`` names, e.g. ``ViT-B-16``), or - FOR TESTS ONLY -
    ``random:<arch>``: a random-init tower of that open_clip architecture (or ``mimscale-tiny-clip``),
    seeded, without touching the global RNG."""
    if not spec or spec == "???":
        raise ConfigError(
            "objective.teacher must be set: a local CLIP checkpoint file (e.g. OpenAI CLIP "
            "ViT-B/16 with objective.teacher_arch=ViT-B-16), or use objective.target_source=shards"
        )
    from ..teachers import clip

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    if not spec.startswith("random:"):
        return clip.CLIPTeacher(spec, arch=arch, resize=resize, dtype=torch_dtype)
    import tempfile

    name = spec.split(":", 1)[1]
    if name == clip.TINY_CLIP_ARCH:
        model_cfg = clip.TINY_CLIP_CFG
    else:
        import open_clip

        model_cfg = open_clip.get_model_config(name)
        if model_cfg is None:
            raise ConfigError(f"objective.teacher={spec}: '{name}' is not an open_clip architecture")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = clip.build_clip(model_cfg)
    with tempfile.TemporaryDirectory(prefix="mimscale-dtm-") as tmp:
        path = clip.save_clip(model, model_cfg, f"{tmp}/random.pt", mean=CLIP_MEAN, std=CLIP_STD, arch=name)
        return clip.CLIPTeacher(path, resize=resize, dtype=torch_dtype)


# ----------------------------------------------------------------------------- objective


class DTM(Objective):
    """DTM: token-morphed feature distillation from a frozen CLIP teacher (block masks, all tokens)."""

    name = "dtm"
    reference = "official code: naver-ai/dtm (docs/objectives/dtm.md)"

    @dataclass
    class Config:
        target_source: Literal["online", "shards"] = "online"
        teacher: str = "???"  # CLIP checkpoint file (online); "random:<arch>": tests only
        teacher_arch: str | None = None  # open_clip arch of a plain open_clip checkpoint, e.g. ViT-B-16
        teacher_proj: bool = True  # CLIP's visual projection (768 -> 512 for B/16); always on
        teacher_resize: Literal["input", "features"] = "input"  # when the teacher grid differs (H/14)
        teacher_dtype: Literal["fp32", "bf16"] = "fp32"
        teacher_norm: Literal["student", "clip"] = "student"  # official: the student's normalised tensor
        target_key: str = "clip.npy"  # batch key of cached targets (target_source: shards)
        crop_pct: float = num(1.0, "(0, 1]")  # shards: the centre crop the cache was computed on (add-targets)
        num_levels: int = num(2, ">= 1")
        max_merges: int | None = num(None, ">= 0")  # per level; None: N (196 for ViT-B/16)
        max_iters: int = num(14, ">= 1")
        loss: Literal["smooth_l1", "mse"] = "smooth_l1"
        smooth_l1_beta: float = num(2.0, "> 0")
        w_dtm: float = num(1.0, ">= 0")
        normalize_target: bool = False  # standardise the morphed targets per token [code: off by default]
        protect_first_token: bool = True  # compat with the reference (ToMe's class-token option)
        split: Literal["alternate", "random"] = "alternate"
        mask_ratio: float = num(0.383, "[0, 1]")  # num_masked = round(mask_ratio * N) when num_masked is unset
        num_masked: int | None = num(None, ">= 0")  # None: round(0.383 N) = 75 of 196
        min_block: int = num(16, ">= 1")
        head_dim: int = num(512, ">= 1")
        color_jitter: float = num(0.4, ">= 0")  # ColorJitter(0.4, 0.4, 0.4) before the crop
        schedule_seed: int = num(0, "[0, 4294967295]")  # schedule generator: (seed, rank, step, micro-batch)
        init: Literal["mae", "beit", "timm"] = "beit"  # encoder and mask token [code: BEiT's]
        wd_cls_token: bool = False  # [code: no_weight_decay = {pos_embed, cls_token}]
        wd_mask_token: bool = True  # [code: the 3-D mask token is decayed]

    @classmethod
    def tiny_config(cls) -> DTM.Config:
        """For tests only: a random-init tiny CLIP teacher (64-d, patch 4), no checkpoint file needed."""
        return cls.Config(teacher="random:mimscale-tiny-clip", head_dim=64)

    def __init__(self, encoder: VisionTransformer, cfg: DTM.Config, teacher: nn.Module | None = None):
        super().__init__(encoder, cfg)
        n = encoder.num_patches
        self.num_masked = round(cfg.mask_ratio * n) if cfg.num_masked is None else cfg.num_masked
        if not 0 <= self.num_masked <= n:
            raise ConfigError(f"objective.num_masked={self.num_masked} must be in [0, {n}]")
        self.max_merges = n if cfg.max_merges is None else cfg.max_merges
        if not 0 <= self.max_merges <= n or cfg.max_iters < 1 or cfg.num_levels < 1:
            raise ConfigError(
                f"objective.max_merges={cfg.max_merges} must be in [0, {n}], objective.max_iters="
                f"{cfg.max_iters} and objective.num_levels={cfg.num_levels} >= 1"
            )
        if not 0.0 < cfg.crop_pct <= 1.0:
            raise ConfigError(f"objective.crop_pct={cfg.crop_pct} must be in (0, 1]")
        if cfg.smooth_l1_beta <= 0 or cfg.head_dim < 1:
            raise ConfigError(
                f"objective.smooth_l1_beta={cfg.smooth_l1_beta} and objective.head_dim={cfg.head_dim} must be positive"
            )
        init_encoder(encoder, cfg.init)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, encoder.embed_dim))
        init_token_(self.mask_token, cfg.init)
        self.head = nn.Linear(encoder.embed_dim, cfg.head_dim)
        init_linear_(self.head, "beit")  # the code's lm_head init
        self.teacher: nn.Module | None = None
        if cfg.target_source == "online":
            if not cfg.teacher_proj:
                raise ConfigError(
                    "objective.teacher_proj=false is not supported: the CLIP teacher always "
                    "applies its visual projection"
                )
            self.teacher = (
                teacher
                if teacher is not None
                else build_teacher(cfg.teacher, cfg.teacher_arch, cfg.teacher_resize, cfg.teacher_dtype)
            )
            self.teacher.eval().requires_grad_(False)
        self._student_norm: tuple[tuple[float, ...], tuple[float, ...]] | None = None
        self._schedule: list[tuple[int, int]] | None = None
        self._split_gen: torch.Generator | None = None
        self._draw = (0, 0, 0)  # (rank, step, micro-batch) of the next schedule draw
        self._fixed = False
        self._teacher_flops: float | None = None

    # ------------------------------------------------------------------ data side

    def mask_spec(self) -> MaskSpec:
        return MaskSpec("block", self.encoder.num_patches, num_masked=self.num_masked, min_block=self.cfg.min_block)

    def train_transform(self, default):
        """Online targets: colour jitter, then the recipe's crop + flip + normalise. Cached targets: colour
        jitter, then exactly the deterministic centre crop ``mimscale data add-targets`` computed the cache
        on (:func:`mimscale.data.targets.target_view`; no random crop, no flip)."""
        from ..data.targets import target_view

        self._student_norm = (tuple(default.mean), tuple(default.std))
        jitter = ColorJitter(self.cfg.color_jitter)
        if self.cfg.target_source == "online":
            return JitterThen(jitter, default)
        return JitterThen(
            jitter, target_view(default.size[0], default.mean, default.std, default.in_chans, self.cfg.crop_pct)
        )

    def cached_targets(self) -> dict | None:
        """What the train loader must check in the shards' manifest (:func:`mimscale.data.targets.check_targets`): the
        cached field, the image size and the crop rule it was computed on; ``None`` for online targets."""
        if self.cfg.target_source == "online":
            return None
        return {"names": [self.cfg.target_key], "image_size": self.encoder.img_size, "crop_pct": self.cfg.crop_pct}

    # ------------------------------------------------------------------ schedule

    def before_step(self, ctx: StepContext) -> None:
        """Start optimizer step ``ctx.step``: its first micro-batch's schedule is drawn now, every later
        micro-batch (forward) draws its own, as the official code draws one per loader iteration."""
        self._fixed = False
        self._draw_schedule(ctx.rank, ctx.step, 0)

    def _draw_schedule(self, rank: int, step: int, micro: int) -> None:
        gen = step_generator(self.cfg.schedule_seed, rank, step, micro)
        self._schedule = draw_schedule(
            gen, self.cfg.num_levels, self.max_merges, self.cfg.max_iters, self.encoder.num_patches
        )
        self._split_gen = gen if self.cfg.split == "random" else None
        self._draw = (rank, step, micro)

    def _advance_schedule(self) -> None:
        """After a forward: the next micro-batch of the same step gets the next draw (unless fixed)."""
        if not self._fixed:
            rank, step, micro = self._draw
            self._draw_schedule(rank, step, micro + 1)

    def set_schedule(self, schedule: list[tuple[int, int]]) -> None:
        """Fix the per-level ``(merges per iteration, iterations)`` for every forward until the next
        ``before_step``."""
        self._schedule = [(int(r), int(k)) for r, k in schedule]
        self._fixed = True

    @property
    def schedule(self) -> list[tuple[int, int]]:
        """The schedule the next forward uses."""
        if self._schedule is None:  # forward without before_step: step 0's first draw
            self.before_step(StepContext())
        assert self._schedule is not None  # before_step draws it
        return self._schedule

    # ------------------------------------------------------------------ model

    def student(self, img: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``img [B, C, H, W]``, ``mask bool [B, N]`` -> ``u [B, N, head_dim]`` (encoder dtype)."""
        e = self.encoder
        x = e.patch_embed(img.to(e.patch_embed.proj.weight.dtype))  # [B, N, D]
        x = torch.where(mask.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        z = e.encode(e.add_cls(e.add_pos(x)))[:, 1:]  # final norm, cls dropped
        return self.head(z)

    @torch.no_grad()
    def targets(self, batch: dict) -> torch.Tensor:
        """Teacher features ``v [B, N, Dt]`` fp32: cached (``batch[target_key]``) or from the frozen teacher."""
        n, dt = self.encoder.num_patches, self.cfg.head_dim
        if self.cfg.target_source == "shards":
            key = self.cfg.target_key
            if key not in batch:
                raise DataError(
                    f"objective.target_source=shards but the batch has no '{key}': add the targets "
                    "to the shards with `mimscale data add-targets`"
                )
            v = batch[key]
            if not torch.is_tensor(v) or v.ndim != 3 or v.shape[1:] != (n, dt):
                shape = tuple(v.shape) if torch.is_tensor(v) else type(v).__name__
                raise DataError(
                    f"cached targets '{key}' must be [B, {n}, {dt}] (N patches, objective.head_dim), got {shape}"
                )
            return v.float()
        assert self.teacher is not None  # target_source=online: built in __init__
        img = batch["image"].float()
        if self.cfg.teacher_norm == "clip":
            if self._student_norm is None:
                raise ConfigError(
                    "objective.teacher_norm=clip needs the student's mean/std: call train_transform() before training"
                )
            img = self._renormalize(img, *self._student_norm)
        if _takes_grid(self.teacher):
            g = self.encoder.grid_size
            v = self.teacher(img, grid=(g, g)).float()
        else:
            size = getattr(self.teacher, "img_size", None)
            if size is not None and tuple(img.shape[-2:]) != _pair(size):
                img = F.interpolate(img, size=_pair(size), mode="bicubic", align_corners=False)
            v = self.teacher(img).float()
        if v.ndim != 3 or v.shape[1:] != (n, dt):
            raise ConfigError(
                f"the teacher gives {tuple(v.shape[1:])} features per image but the student has "
                f"{n} patches and objective.head_dim={dt}; use a teacher with the same token grid "
                "and set head_dim to its width"
            )
        return v

    def _renormalize(self, img: torch.Tensor, mean, std) -> torch.Tensor:
        """Student-normalised ``img`` -> the teacher's own statistics (CLIP's unless the teacher says)."""
        if hasattr(self.teacher, "renormalize"):
            return cast(Any, self.teacher).renormalize(img, mean, std)  # a teacher's own hook
        m, s, cm, cs = _stats(img.device, (mean, std, CLIP_MEAN, CLIP_STD))
        return (img * s + m - cm) / cs

    def forward(self, batch: dict) -> LossOutput:
        """``batch["image"] [B, C, H, W]``, ``batch["mask"] bool [B, N]`` (+ ``batch["clip.npy"]`` if cached)."""
        u = self.student(batch["image"], batch["mask"])  # [B, N, Dt]
        v = self.targets(batch)  # [B, N, Dt] fp32
        loss_dtm, groups = morphed_loss(
            u,
            v,
            self.schedule,
            self._criterion,
            self.cfg.protect_first_token,
            self._split_gen,
            self.cfg.normalize_target,
        )
        self._advance_schedule()
        loss = self.cfg.w_dtm * loss_dtm
        metrics = {
            "loss": loss.detach(),
            "loss_dtm": loss_dtm.detach(),
            "groups": torch.full((), sum(groups) / len(groups), device=loss.device),  # mean over levels (a fill)
        }
        return LossOutput(loss, metrics)

    def _criterion(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.cfg.loss == "smooth_l1":
            return smooth_l1(pred, target, self.cfg.smooth_l1_beta)
        return F.mse_loss(pred.float(), target.float())

    # ------------------------------------------------------------------ accounting

    def frozen_modules(self) -> list[nn.Module]:
        return [] if self.teacher is None else [self.teacher]

    def flops_per_sample(self) -> float:
        """3 x student forward (patch embedding, encoder on 1 + N tokens, head) + 1 x teacher forward
        (counted once by torch's FLOP counter on one image: matmuls, convolutions, attention). Cached targets: no teacher forward per step
        (its cost was paid once by ``mimscale data add-targets``)."""
        e = self.encoder
        p = e.patch_size
        student = (
            linear_flops(e.num_patches, p * p * e.in_chans, e.embed_dim)
            + transformer_forward_flops(1 + e.num_patches, e.embed_dim, e.depth, e.mlp_ratio)
            + linear_flops(e.num_patches, e.embed_dim, self.cfg.head_dim)
        )
        return 3.0 * student + self._measure_teacher_flops()

    def _measure_teacher_flops(self) -> float:
        if self.teacher is None:
            return 0.0
        if self._teacher_flops is None:
            g = self.encoder.grid_size
            if hasattr(self.teacher, "flops_per_image"):
                self._teacher_flops = float(cast(Any, self.teacher).flops_per_image((g, g)))  # a teacher's own hook
            else:
                self._teacher_flops = _counted_flops(self.teacher, self.encoder)
        return self._teacher_flops

    def no_weight_decay(self) -> set[str]:
        return token_no_decay(self, {"mask_token"})


_STATS: dict[tuple, tuple[torch.Tensor, ...]] = {}


def _stats(device: torch.device, values: tuple) -> tuple[torch.Tensor, ...]:
    """Per-channel constants ``float32 [1, C, 1, 1]`` on ``device``, made once per (device, values): a
    ``torch.tensor(..., device=)`` per step would be a blocking host-to-device copy."""
    key = (str(device), tuple(tuple(float(x) for x in v) for v in values))
    if key not in _STATS:
        _STATS[key] = tuple(torch.tensor(v, dtype=torch.float32, device=device).view(1, -1, 1, 1) for v in key[1])
    return _STATS[key]


def _takes_grid(teacher: nn.Module) -> bool:
    import inspect

    return "grid" in inspect.signature(teacher.forward).parameters


def _counted_flops(teacher: nn.Module, encoder: VisionTransformer) -> float:
    """Forward FLOPs of any teacher module on one image, counted by torch (matmuls, convolutions and
    attention; the math attention backend, as the fused CPU kernel is invisible to the counter)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    size = _pair(getattr(teacher, "img_size", encoder.img_size))
    dev = next(iter(teacher.parameters()), torch.empty(0)).device
    x = torch.zeros(1, encoder.in_chans, *size, device=dev)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        teacher(x)
    return float(counter.get_total_flops())


def _pair(size) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
