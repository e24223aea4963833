"""End-to-end fine-tuning (MAE's recipe) of a pre-trained encoder, through the DeepSpeed engine.

Model: the encoder's weights in a timm-layout ViT with ``global_pool="avg"`` (mean of the patch tokens;
the final ``norm`` becomes Identity and ``fc_norm`` (LayerNorm) normalises the pooled vector, as timm
does) + a ``Linear(D, C)`` head (trunc-N(0, 2e-5) weight, bias 0), drop path linear in depth up to
``model.drop_path``. The pre-trained ``norm`` is dropped and ``fc_norm``/``head`` start fresh; the saved
``model.safetensors`` loads strictly into timm's ``VisionTransformer(global_pool="avg", fc_norm=True)``.
The position embedding stays what the encoder had (MAE-style fixed sin-cos buffer by default).

Recipe (``configs/finetune/finetune_vit_{b16,l16,h14}.yaml``; sections model/data/optim/train/log as in
pre-training plus ``finetune:``): AdamW with layer-wise lr decay groups (:mod:`.layer_decay`),
lr = blr * batch / 256 with linear warmup and per-step half-cycle cosine to ``optim.min_lr``; the batch
transform is RandomResizedCrop + flip + RandAugment + random erasing, then Mixup/CutMix with label
smoothing, and the loss soft-target cross-entropy (:mod:`.augment`). Top-1 on the test shards after
every epoch (centre crop, no augmentation).

The loop is pre-training's :class:`~mimscale.engine.trainer.Trainer` (this module is its fine-tuning
:class:`~mimscale.engine.task.Task`): the same DeepSpeed config, schedule, one-collective step flags,
checkpoints in ``OUT_DIR/checkpoints`` with exact resume (``train.resume=auto``), save-on-signal (exit 42,
requeue), the non-finite policy and the time limit. The layer-decay parameter groups go to the engine.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as tdist
import torch.nn.functional as F
import yaml
from torch import nn

from .. import config as C
from .. import dist
from ..data.epoch import capped_eval_loader, count_samples, first_shards
from ..data.loader import ShardLoader
from ..data.transforms import EvalTransform
from ..engine import deepspeed as ds
from ..engine.task import Evaluation, TaskModule
from ..engine.trainer import Trainer
from ..errors import ConfigError
from ..models.vit import VisionTransformer, build_vit
from ..objectives.base import LossOutput
from .augment import FinetuneTransform, MixupCollate
from .layer_decay import layer_decay_groups
from .source import Source, num_classes

log = logging.getLogger("mimscale.eval")

RECIPE_DIR = C.CONFIG_DIR / "finetune"  # beside, not among, the pre-training recipes
RECIPE_BY_ARCH = {
    "vit_micro": "finetune_vit_small",
    "vit_tiny": "finetune_vit_small",
    "vit_small": "finetune_vit_small",
    "vit_base": "finetune_vit_b16",
    "vit_large": "finetune_vit_l16",
    "vit_huge": "finetune_vit_h14",
}


@dataclass
class FinetuneKnobs:
    layer_decay: float = 0.75
    mixup: float = 0.8  # Beta(alpha, alpha) mixing; 0 turns mixup off
    cutmix: float = 1.0  # 0 turns cutmix off
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    smoothing: float = 0.1
    rand_aug: str = "rand-m9-mstd0.5-inc1"  # timm RandAugment string; "" turns it off
    reprob: float = 0.25  # random-erasing probability
    crop_scale: tuple[float, float] = (0.08, 1.0)
    head_init_std: float = 2e-5
    num_classes: int | None = None  # default: the classes in the train manifest
    train_samples: int | None = None  # cap (whole shards) on the training set
    test_samples: int | None = None  # cap (whole shards) on the test set
    eval_batch_size: int = 256
    mean: tuple[float, ...] | None = None  # default: the pre-training run's normalisation
    std: tuple[float, ...] | None = None


@dataclass
class FinetuneRecipe:
    """Geometry (arch, img/patch size, channels, pos-emb type) always comes from SOURCE."""

    model: C.ModelConfig = field(default_factory=C.ModelConfig)
    data: C.DataConfig = field(default_factory=C.DataConfig)
    optim: C.OptimConfig = field(default_factory=C.OptimConfig)
    train: C.TrainConfig = field(default_factory=C.TrainConfig)
    finetune: FinetuneKnobs = field(default_factory=FinetuneKnobs)
    log: C.LogConfig = field(default_factory=C.LogConfig)


def load_recipe(recipe: str | None, overrides: list[str], source: Source) -> FinetuneRecipe:
    """Read a fine-tune recipe (default: by the source's arch) with overrides; geometry from ``source``."""
    name = recipe or RECIPE_BY_ARCH.get(source.arch, "finetune_vit_b16")
    if (RECIPE_DIR / f"{name}.yaml").is_file():
        name = str(RECIPE_DIR / f"{name}.yaml")
    elif not name.endswith((".yaml", ".yml")):
        known = ", ".join(sorted(p.stem for p in RECIPE_DIR.glob("*.yaml")))
        raise ConfigError(f"no fine-tune recipe named '{name}' (recipes: {known}); or pass a YAML path")
    r = C.from_dict(FinetuneRecipe, C.load_raw(name, overrides))
    m, f = r.model, r.finetune
    # model.img_size=N on the command line fine-tunes at another resolution (position embeddings resampled)
    size_given = any(o.split("=", 1)[0].strip() == "model.img_size" for o in overrides)
    m.arch, m.img_size, m.patch_size, m.in_chans, m.pos_embed = (
        source.arch,
        m.img_size if size_given else source.img_size,
        source.patch_size,
        source.in_chans,
        source.pos_embed,
    )
    if m.img_size % m.patch_size:
        raise ConfigError(f"model.img_size={m.img_size} must be a multiple of the source's patch size {m.patch_size}")
    if m.img_size != source.img_size:
        log.info(
            "fine-tuning at %d px (%dx%d patches); the source was trained at %d px: position embeddings resampled",
            m.img_size,
            m.img_size // m.patch_size,
            m.img_size // m.patch_size,
            source.img_size,
        )
    if not 0 < f.layer_decay <= 1:
        raise ConfigError(f"finetune.layer_decay={f.layer_decay} must be in (0, 1]")
    if not 0 <= m.drop_path < 1:
        raise ConfigError(f"model.drop_path={m.drop_path} must be in [0, 1)")
    if (f.mixup > 0 or f.cutmix > 0) and r.train.micro_batch_size % 2:
        raise ConfigError(f"train.micro_batch_size={r.train.micro_batch_size} must be even with mixup/cutmix on")
    if r.train.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"train.zero_stage={r.train.zero_stage} must be 0, 1, 2 or 3")
    return r


def fit_batch(recipe: FinetuneRecipe, train_dir: str, explicit: bool, world: int) -> str | None:
    """Fit ``train.batch_size`` to a small training set before any work: a given batch larger than an epoch is a
    one-line ConfigError; the recipe's is halved (and the micro-batch with it) until an epoch holds >= 4 steps.
    Returns the line that says so (None: unchanged)."""
    from ..data.epoch import count_samples

    t, f = recipe.train, recipe.finetune
    n = count_samples(first_shards(train_dir, f.train_samples), recipe.data.samples_per_epoch)
    if t.batch_size <= n and (explicit or t.batch_size <= max(n // 4, 1)):
        return None
    if explicit:
        raise ConfigError(
            f"train.batch_size={t.batch_size} is larger than an epoch ({n} training samples in {train_dir}); "
            "pass train.batch_size=N with N <= the samples, or leave it to the recipe (it then fits itself)"
        )
    old, even = t.batch_size, f.mixup > 0 or f.cutmix > 0
    while t.batch_size > max(n // 4, 1) and t.batch_size // 2 >= world * (2 if even else 1):
        t.batch_size //= 2
    t.micro_batch_size = min(t.micro_batch_size, t.batch_size // world)
    while t.batch_size % (t.micro_batch_size * world):
        t.micro_batch_size -= 1
    if even and t.micro_batch_size % 2:
        raise ConfigError(
            f"{n} training samples are too few for mixup/cutmix batches on {world} processes; "
            "pass finetune.mixup=0 finetune.cutmix=0 or add data"
        )
    return (
        f"finetune: train.batch_size={t.batch_size} (the recipe's {old} fitted to {n} training samples; "
        "train.batch_size=N sets it), micro-batch " + str(t.micro_batch_size)
    )


def build_classifier(
    source: Source, classes: int, drop_path: float, head_init_std: float, img_size: int | None = None
) -> VisionTransformer:
    """A ``global_pool="avg"`` ViT with ``classes`` outputs holding the source encoder's weights, at ``img_size``
    (default: the source's; another size resamples the position embeddings). The pre-trained ``norm``, a
    head and ``fc_norm`` in the file are not used: ``fc_norm`` and ``head`` start fresh (MAE's recipe)."""
    from ..models.init import Weights, load_encoder

    model = build_vit(
        source.arch,
        img_size or source.img_size,
        source.patch_size,
        source.in_chans,
        pos_embed=source.pos_embed,
        drop_path_rate=drop_path,
        num_classes=classes,
        global_pool="avg",
        layer_scale_init=source.encoder.layer_scale_init,
    )
    state = {k: v for k, v in source.state.items() if not k.startswith("norm.")}
    load_encoder(model, Weights(source.format, source.weights, state), keep_head=False)
    head = cast(nn.Linear, model.head)  # (classes >= 1)
    nn.init.trunc_normal_(head.weight, std=head_init_std)
    nn.init.zeros_(head.bias)
    return model


class Classifier(TaskModule):
    """What the engine trains: ``forward({"image": [B, C, H, W], "target": [B, K] soft labels}) -> LossOutput``
    with the soft-target cross-entropy in fp32."""

    def __init__(self, model: VisionTransformer):
        super().__init__()
        self.model = model

    def loss(self, image: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = self.model(image).float()
        return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()

    def forward(self, batch: dict) -> LossOutput:
        loss = self.loss(batch["image"], batch["target"])
        return LossOutput(loss, {"loss": loss.detach()})


@torch.no_grad()
def evaluate(model: nn.Module, loader, device) -> tuple[float, int]:
    """Top-1 (%) and sample count over an eval-mode loader, summed over ranks (padding excluded).

    Each rank scores its own share on ``device`` (nothing is gathered; one all-reduce of two counts)."""
    was = model.training
    model.eval()
    stats = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in loader:
        pred = model(batch["image"].to(device, non_blocking=True)).argmax(1)
        valid = batch["valid"].to(device, non_blocking=True)
        stats[0] += ((pred == batch["label"].to(device, non_blocking=True)) & valid).sum()
        stats[1] += valid.sum()
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        tdist.all_reduce(stats)
    model.train(was)
    return 100.0 * stats[0].item() / max(stats[1].item(), 1.0), int(stats[1].item())


class FinetuneTask:
    """Fine-tuning ``source`` on ``train_dir`` (top-1 on ``test_dir`` after every epoch) as a Trainer task."""

    name = "finetune"

    def __init__(self, source: Source, train_dir: str, test_dir: str, recipe: FinetuneRecipe, out_dir: Path):
        r, f = recipe, recipe.finetune
        self.source, self.recipe, self.test_dir, self.out_dir = source, recipe, test_dir, out_dir
        self.mean, self.std = f.mean or source.mean, f.std or source.std
        if len(self.mean) != source.in_chans or len(self.std) != source.in_chans:
            raise ConfigError(f"finetune.mean/std need {source.in_chans} values")
        r.data.train = train_dir
        r.train.run_dir = str(out_dir)
        self.classes = num_classes(train_dir, f.num_classes)
        self.train_shards = first_shards(train_dir, f.train_samples)
        self.cfg = C.Config(model=r.model, data=r.data, optim=r.optim, train=r.train, log=r.log)

    def samples_per_epoch(self) -> int:
        return count_samples(self.train_shards, self.recipe.data.samples_per_epoch)

    def identity(self) -> dict:
        s = self.source
        return {
            "task": "finetune",
            "arch": s.arch,
            "img_size": self.recipe.model.img_size,
            "patch_size": s.patch_size,
            "in_chans": s.in_chans,
            "classes": self.classes,
            "source": str(s.weights),
        }

    def write_config(self, derived: C.Derived, run_dir: Path) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        doc = {
            **C.to_dict(self.recipe),
            "source": str(self.source.weights),
            "classes": self.classes,
            "derived": C.to_dict(derived),
        }
        (run_dir / "config.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))

    def build(self) -> nn.Module:
        r = self.recipe
        model = build_classifier(
            self.source, self.classes, r.model.drop_path, r.finetune.head_init_std, r.model.img_size
        )
        model.set_grad_checkpointing(r.model.grad_checkpointing)
        return Classifier(model)

    def param_groups(self, module: nn.Module) -> list[dict] | None:
        m = cast(Classifier, module).model
        return layer_decay_groups(
            m, self.recipe.optim.weight_decay, self.recipe.finetune.layer_decay, m.depth, m.no_weight_decay()
        )

    def loader(self, module: nn.Module, derived: C.Derived, d: dist.DistEnv, accelerator: str) -> ShardLoader:
        r, f, t, s = self.recipe, self.recipe.finetune, self.recipe.train, self.source
        return ShardLoader(
            self.train_shards,
            manifest=r.data.train,
            batch_size=t.micro_batch_size,
            rank=d.rank,
            world_size=d.world_size,
            seed=t.seed,
            num_workers=r.data.num_workers,
            shuffle_buffer=r.data.shuffle_buffer,
            samples_per_epoch=derived.samples_per_epoch,
            transform=FinetuneTransform(
                r.model.img_size,
                scale=f.crop_scale,
                hflip=r.data.hflip,
                rand_aug=f.rand_aug,
                reprob=f.reprob,
                mean=self.mean,
                std=self.std,
                in_chans=s.in_chans,
            ),
            collate=MixupCollate(self.classes, f.mixup, f.cutmix, f.mixup_prob, f.mixup_switch_prob, f.smoothing),
            pin_memory=accelerator == "cuda",
        )

    def evaluation(self, d: dist.DistEnv, derived: C.Derived) -> Evaluation:
        r, s = self.recipe, self.source
        test = capped_eval_loader(
            self.test_dir,
            r.finetune.test_samples,
            batch_size=r.finetune.eval_batch_size,
            transform=EvalTransform(r.model.img_size, mean=self.mean, std=self.std, in_chans=s.in_chans),
            rank=d.rank,
            world_size=d.world_size,
            num_workers=r.data.num_workers,
        )

        def run(module: nn.Module, device: torch.device) -> dict[str, float]:
            acc, n = evaluate(cast(Classifier, module).model, test, device)
            return {"eval/finetune_top1": acc, "eval/finetune_test_samples": float(n)}

        return Evaluation(
            run, key="eval/finetune_top1", summary_prefix="finetune_top1", every_steps=derived.steps_per_epoch
        )

    def summary(self) -> dict[str, Any]:
        return {"task": "finetune", "arch": self.source.arch, "classes": self.classes}

    def export(self, engine, run_dir: Path, is_main: bool) -> None:
        sd = ds.full_state_dict(engine, engine.module.model)
        if is_main:
            from safetensors.torch import save_file

            from ..models.describe import metadata, timm_call

            model, out = engine.module.model, run_dir / "model.safetensors"
            meta = {**metadata(model, "finetune", run_dir.name), "source": str(self.source.weights)}
            meta["timm_call"] = timm_call(model, out)  # global_pool='avg', fc_norm=True, num_classes=C
            run_dir.mkdir(parents=True, exist_ok=True)
            sd = model.export_state_dict(sd)  # timm's layout (Beit's per-block tables for pos_embed=relative)
            save_file({k: v.contiguous() for k, v in sd.items()}, str(out), metadata=meta)


def finetune(
    source: Source, train_dir: str, test_dir: str, recipe: FinetuneRecipe, out_dir: Path, **trainer_kw
) -> dict:
    """Fine-tune under whatever launcher started this process; returns the result (rank 0 writes files).
    A run saved on SIGUSR1/SIGTERM returns ``exit_code`` (42: requeue me)."""
    task = FinetuneTask(source, train_dir, test_dir, recipe, out_dir)
    trainer = Trainer(task.cfg, task, **trainer_kw)
    s = trainer.fit()
    spe = trainer.derived.steps_per_epoch
    if "exit_code" in s:
        return {"exit_code": s["exit_code"], "steps": s["steps"], "rank": trainer.d.rank}
    curve = sorted(
        [int(k[len("finetune_top1_step") :]) / spe, v] for k, v in s.items() if k.startswith("finetune_top1_step")
    )
    if "finetune_top1_final" in s:
        curve.append([s["steps"] / spe, s["finetune_top1_final"]])
    curve = [[round(e, 4), a] for e, a in curve]
    result = {
        "lr_scales": sorted({round(g.get("lr_scale", 1.0), 10) for g in trainer.engine.optimizer.param_groups}),
        "top1": curve[-1][1],
        "best_top1": max(a for _, a in curve),
        "curve": curve,
        "classes": task.classes,
        "steps": s["steps"],
        "total_steps": trainer.derived.total_steps,
        "world_size": trainer.d.world_size,
        "train_seconds": s["train_seconds"],
        "lr": trainer.derived.lr,
        "layer_decay": recipe.finetune.layer_decay,
        "test_samples": int(trainer.last_eval.get("eval/finetune_test_samples", 0)),
        "model": str(out_dir / "model.safetensors"),
        "rank": trainer.d.rank,
    }
    if trainer.d.is_main:
        (out_dir / "result.json").write_text(json.dumps(result, indent=2))
    return result
