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

The engine: the same DeepSpeed config (``engine.deepspeed.ds_config``: ZeRO stage, precision, AdamW,
batch / micro-batch / accumulation) and ``set_hparams`` (lr x ``lr_scale``, wd x ``wd_scale`` per group)
as pre-training, built by ``engine.deepspeed.initialize`` with the layer-decay parameter groups.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch import nn

from .. import config as C
from .. import dist
from ..engine import deepspeed as ds
from ..engine.schedule import warmup_cosine
from ..errors import CheckpointError, ConfigError
from ..models.vit import VisionTransformer, build_vit
from .augment import FinetuneTransform, MixupCollate
from .layer_decay import layer_decay_groups
from .source import Source, first_shards, num_classes

log = logging.getLogger("mimscale.eval")

RECIPE_DIR = C.CONFIG_DIR / "finetune"   # beside, not among, the pre-training recipes
RECIPE_BY_ARCH = {"vit_base": "finetune_vit_b16", "vit_large": "finetune_vit_l16", "vit_huge": "finetune_vit_h14"}


@dataclass
class FinetuneKnobs:
    layer_decay: float = 0.75
    mixup: float = 0.8                       # Beta(alpha, alpha) mixing; 0 turns mixup off
    cutmix: float = 1.0                      # 0 turns cutmix off
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    smoothing: float = 0.1
    rand_aug: str = "rand-m9-mstd0.5-inc1"   # timm RandAugment string; "" turns it off
    reprob: float = 0.25                     # random-erasing probability
    crop_scale: tuple[float, float] = (0.08, 1.0)
    head_init_std: float = 2e-5
    num_classes: int | None = None           # default: the classes in the train manifest
    train_samples: int | None = None         # cap (whole shards) on the training set
    test_samples: int | None = None          # cap (whole shards) on the test set
    eval_batch_size: int = 256
    mean: tuple[float, ...] | None = None    # default: the pre-training run's normalisation
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
    m.arch, m.img_size, m.patch_size, m.in_chans, m.pos_embed = (source.arch, source.img_size, source.patch_size,
                                                                 source.in_chans, source.pos_embed)
    if not 0 < f.layer_decay <= 1:
        raise ConfigError(f"finetune.layer_decay={f.layer_decay} must be in (0, 1]")
    if not 0 <= m.drop_path < 1:
        raise ConfigError(f"model.drop_path={m.drop_path} must be in [0, 1)")
    if (f.mixup > 0 or f.cutmix > 0) and r.train.micro_batch_size % 2:
        raise ConfigError(f"train.micro_batch_size={r.train.micro_batch_size} must be even with mixup/cutmix on")
    if r.train.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"train.zero_stage={r.train.zero_stage} must be 0, 1, 2 or 3")
    return r


def build_classifier(source: Source, classes: int, drop_path: float, head_init_std: float) -> VisionTransformer:
    """A ``global_pool="avg"`` ViT with ``classes`` outputs holding the source encoder's weights."""
    model = build_vit(source.arch, source.img_size, source.patch_size, source.in_chans, pos_embed=source.pos_embed,
                      drop_path_rate=drop_path, num_classes=classes, global_pool="avg",
                      layer_scale_init=source.encoder.layer_scale_init)
    state = {k: v for k, v in source.state.items() if not k.startswith("norm.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) != {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}:
        raise CheckpointError(f"{source.weights}: encoder weights do not fit the classifier "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    nn.init.trunc_normal_(model.head.weight, std=head_init_std)
    nn.init.zeros_(model.head.bias)
    return model


class Classifier(nn.Module):
    """What the engine trains: ``forward(image [B, C, H, W], target [B, K] soft labels) -> loss`` (fp32)."""

    def __init__(self, model: VisionTransformer):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = self.model(image).float()
        return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()


@torch.no_grad()
def evaluate(model: nn.Module, loader, device) -> tuple[float, int]:
    """Top-1 (%) and sample count over an eval-mode loader, summed over ranks (padding excluded).

    Each rank scores its own share on ``device`` (nothing is gathered; one all-reduce of two counts)."""
    was = model.training
    model.eval()
    stats = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in loader:
        pred = model(batch["image"].to(device, non_blocking=True)).argmax(1)
        valid = batch["valid"].to(device)
        stats[0] += ((pred == batch["label"].to(device)) & valid).sum()
        stats[1] += valid.sum()
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        tdist.all_reduce(stats)
    model.train(was)
    return 100.0 * stats[0].item() / max(stats[1].item(), 1.0), int(stats[1].item())


def finetune(source: Source, train_dir: str, test_dir: str, recipe: FinetuneRecipe, out_dir: Path) -> dict:
    """Fine-tune under whatever launcher started this process; returns the result (rank 0 writes files)."""
    from ..data.loader import ShardLoader
    from ..data.transforms import EvalTransform
    from ..telemetry import MetricLogger

    d = dist.detect()
    dist.export(d)
    torch.set_num_threads(dist.configure_threads(d))
    accelerator = dist.accelerator_name()
    r, f, t = recipe, recipe.finetune, recipe.train
    r.data.train = train_dir
    mean, std = f.mean or source.mean, f.std or source.std
    if len(mean) != source.in_chans or len(std) != source.in_chans:
        raise ConfigError(f"finetune.mean/std need {source.in_chans} values")
    classes = num_classes(train_dir, f.num_classes)
    train_shards = first_shards(train_dir, f.train_samples)
    from ..engine.loop import count_samples

    cfg = C.Config(model=r.model, data=r.data, optim=r.optim, train=t, log=r.log)
    derived = C.derive(cfg, d.world_size, count_samples(train_shards, r.data.samples_per_epoch))
    derived.run_dir = str(out_dir)
    if d.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        doc = {**C.to_dict(r), "source": str(source.weights), "classes": classes, "derived": C.to_dict(derived)}
        import yaml

        (out_dir / "config.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))

    torch.manual_seed(t.seed)  # identical init (head) on every rank
    model = build_classifier(source, classes, r.model.drop_path, f.head_init_std)
    model.set_grad_checkpointing(r.model.grad_checkpointing)
    task = Classifier(model)
    groups = layer_decay_groups(model, r.optim.weight_decay, f.layer_decay, model.depth, model.no_weight_decay())
    engine = ds.initialize(task, cfg, derived, accelerator, groups=groups)
    device = torch.device(engine.device)

    loader = ShardLoader(train_shards, manifest=train_dir, batch_size=t.micro_batch_size, rank=d.rank,
                         world_size=d.world_size, seed=t.seed, num_workers=r.data.num_workers,
                         shuffle_buffer=r.data.shuffle_buffer, samples_per_epoch=derived.samples_per_epoch,
                         transform=FinetuneTransform(source.img_size, scale=f.crop_scale, hflip=r.data.hflip,
                                                     rand_aug=f.rand_aug, reprob=f.reprob, mean=mean, std=std,
                                                     in_chans=source.in_chans),
                         collate=MixupCollate(classes, f.mixup, f.cutmix, f.mixup_prob, f.mixup_switch_prob,
                                              f.smoothing), pin_memory=accelerator == "cuda")
    test_loader = ShardLoader(first_shards(test_dir, f.test_samples), manifest=test_dir,
                              batch_size=f.eval_batch_size, rank=d.rank, world_size=d.world_size,
                              num_workers=r.data.num_workers, mode="eval", shuffle=False,
                              transform=EvalTransform(source.img_size, mean=mean, std=std, in_chans=source.in_chans))
    logger = MetricLogger(out_dir, enabled=d.is_main, jsonl=r.log.jsonl, tensorboard=r.log.tensorboard,
                          wandb=r.log.wandb, project=r.log.project, run_name=r.log.run_name, config=C.to_dict(r))
    stop = min(derived.total_steps, t.max_steps or derived.total_steps)
    curve: list[list[float]] = []
    start, step, loss_sum, n_loss = time.time(), 0, torch.zeros((), device=device), 0
    batches = iter(())
    engine.train()
    while step < stop:
        lr = warmup_cosine(step, derived.total_steps, derived.warmup_steps, derived.lr, r.optim.min_lr)
        ds.set_hparams(engine, lr, r.optim.weight_decay)
        for _ in range(derived.grad_accum):
            batch = next(batches, None)
            if batch is None:
                batches = iter(loader)
                batch = next(batches)
            loss = engine(batch["image"].to(device), batch["target"].to(device))
            engine.backward(loss)
            engine.step()
            loss_sum += loss.detach().float()
            n_loss += 1
        step += 1
        if step % t.log_every == 0 or step == stop:
            mean_loss = ds.all_reduce_mean(loss_sum / max(n_loss, 1)).item()
            logger.log({"train/loss": mean_loss, "train/lr": lr, "train/epoch": step / derived.steps_per_epoch,
                        "time/elapsed_s": time.time() - start}, step=step)
            loss_sum.zero_()
            n_loss = 0
        if step % derived.steps_per_epoch == 0 or step == stop:
            acc, n_test = evaluate(engine.module.model, test_loader, device)
            curve.append([round(step / derived.steps_per_epoch, 4), acc])
            logger.log({"eval/finetune_top1": acc}, step=step)
            if d.is_main:
                log.info("fine-tune step %d/%d (epoch %.2f): test top-1 %.2f%%", step, stop,
                         step / derived.steps_per_epoch, acc)
    sd = ds.full_state_dict(engine, engine.module.model)
    if d.is_main:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(out_dir / "model.safetensors"))
    logger.close()
    result = {"lr_scales": sorted({round(g.get("lr_scale", 1.0), 10) for g in engine.optimizer.param_groups}),
              "top1": curve[-1][1], "best_top1": max(a for _, a in curve), "curve": curve, "classes": classes,
              "steps": step, "total_steps": derived.total_steps, "world_size": d.world_size,
              "train_seconds": time.time() - start, "lr": derived.lr, "layer_decay": f.layer_decay,
              "test_samples": n_test, "model": str(out_dir / "model.safetensors"), "rank": d.rank}
    if d.is_main:
        (out_dir / "result.json").write_text(json.dumps(result, indent=2))
    return result
