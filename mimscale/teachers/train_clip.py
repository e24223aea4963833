"""Train a small real CLIP (open_clip model + open_clip's contrastive loss) on Fashion-MNIST captions.

Every training image is paired with a caption of its class drawn from :data:`TEMPLATES` ("a photo of a
sneaker.", ...), tokenised with open_clip's BPE tokenizer. Zero-shot evaluation on the test split: the
class embedding is the normalised mean of the normalised text embeddings of all templates; the prediction
is the class with the highest cosine similarity to the image embedding. The checkpoint is a mimscale CLIP
file (:func:`mimscale.teachers.clip.save_clip`); the result goes beside it as ``<OUT stem>.json``.

Images go through the project's own pipeline (``ShardLoader`` + ``TrainTransform``/``EvalTransform``) at
32 px with the ``tiny_cpu`` recipe's normalisation, so the teacher sees exactly what a ``tiny_cpu``
student sees (DTM's default ``teacher_norm = "student"``).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F

from ..data.loader import ShardLoader
from ..data.shards import read_manifest
from ..data.transforms import EvalTransform, TrainTransform
from ..errors import ConfigError, DataError
from ..telemetry.progress import Progress
from .clip import TINY_CLIP_ARCH, TINY_CLIP_CFG, build_clip, file_sha256, save_clip

log = logging.getLogger("mimscale.teachers")


def caption_names(classes: list[str]) -> tuple[str, ...]:
    """Class names for captions: Fashion-MNIST's written out (``t-shirt``), any other data set's manifest
    names lower-cased (MNIST: ``0`` .. ``9``); no manifest names: Fashion-MNIST's."""
    if not classes or len(classes) == len(FASHION_MNIST_PROMPT_NAMES) and classes[1].lower() == "trouser":
        return FASHION_MNIST_PROMPT_NAMES
    return tuple(c.lower() for c in classes)


#: Fashion-MNIST class names as they are written in captions (label order of the data set).
FASHION_MNIST_PROMPT_NAMES = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
TEMPLATES = (
    "a photo of a {}.",
    "a picture of a {}.",
    "a grayscale photo of a {}.",
    "a low resolution photo of a {}.",
    "a photo of the {}.",
    "a product photo of a {}.",
    "an image of a {}.",
    "a black and white photo of a {}.",
)
#: ``tiny_cpu`` recipe normalisation (Fashion-MNIST grey level statistics, replicated to RGB).
TINY_MEAN = (0.286, 0.286, 0.286)
TINY_STD = (0.353, 0.353, 0.353)


@dataclass
class TrainCLIPConfig:
    samples: int = 60000  # training images seen (60000 = one Fashion-MNIST epoch)
    batch_size: int = 128
    lr: float = 3e-3
    warmup_frac: float = 0.05
    weight_decay: float = 0.1
    crop_scale: tuple[float, float] = (0.6, 1.0)
    seed: int = 0
    num_workers: int = 1
    test_samples: int | None = None  # None: the whole test split
    mean: tuple[float, ...] = TINY_MEAN
    std: tuple[float, ...] = TINY_STD
    class_names: tuple[str, ...] = ()  # empty: from the train manifest (Fashion-MNIST: the names above)
    templates: tuple[str, ...] = TEMPLATES
    model_cfg: dict = field(default_factory=lambda: json.loads(json.dumps(TINY_CLIP_CFG)))


def _tokens(cfg: TrainCLIPConfig) -> torch.Tensor:
    """``[num_classes, num_templates, context_length]`` int64 caption tokens."""
    import open_clip

    tok = open_clip.SimpleTokenizer(context_length=int(cfg.model_cfg["text_cfg"]["context_length"]))
    names = cfg.class_names or FASHION_MNIST_PROMPT_NAMES  # empty: the default data set's
    texts = [t.format(c) for c in names for t in cfg.templates]
    return tok(texts).view(len(names), len(cfg.templates), -1)


@torch.no_grad()
def class_embeddings(model, tokens: torch.Tensor) -> torch.Tensor:
    """Zero-shot classifier ``[num_classes, embed_dim]``: normalised mean of normalised template embeddings."""
    c, t, L = tokens.shape
    feats = F.normalize(model.encode_text(tokens.view(c * t, L)).float(), dim=-1).view(c, t, -1)
    return F.normalize(feats.mean(1), dim=-1)


@torch.no_grad()
def zero_shot_top1(
    model, tokens: torch.Tensor, test_src: str, cfg: TrainCLIPConfig, batch_size: int = 500
) -> tuple[float, int]:
    """Zero-shot top-1 (%) and number of images on ``test_src`` (every sample once)."""
    model.eval()
    classes = class_embeddings(model, tokens)
    size = int(cfg.model_cfg["vision_cfg"]["image_size"])
    loader = ShardLoader(
        test_src,
        batch_size=batch_size,
        mode="eval",
        num_workers=cfg.num_workers,
        transform=EvalTransform(size, mean=cfg.mean, std=cfg.std, in_chans=3),
        samples_per_epoch=cfg.test_samples,
    )
    correct = total = 0
    for batch in loader:
        valid = batch["valid"]
        img = F.normalize(model.encode_image(batch["image"]).float(), dim=-1)
        pred = (img @ classes.T).argmax(-1)
        correct += int(((pred == batch["label"]) & valid).sum())
        total += int(valid.sum())
    if total == 0:
        raise DataError(f"no test images in {test_src}")
    return 100.0 * correct / total, total


def _param_groups(model, weight_decay: float) -> list[dict]:
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        skip = p.ndim < 2 or "embedding" in name or "logit_scale" in name
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train_clip(
    out: str | Path, train_src: str, test_src: str, cfg: TrainCLIPConfig | None = None, progress: bool = True
) -> dict:
    """Train, evaluate zero-shot, save ``out`` (mimscale CLIP file) and ``out.with_suffix('.json')``.

    Returns the result dict (also written as JSON): ``zero_shot_top1`` (%), ``chance`` (%), timings, ...
    """
    import open_clip

    cfg = cfg or TrainCLIPConfig()
    out = Path(out)
    if cfg.samples < cfg.batch_size or cfg.batch_size < 2:
        raise ConfigError(f"need samples >= batch_size >= 2, got samples={cfg.samples}, batch_size={cfg.batch_size}")
    classes = read_manifest(train_src).get("classes") or []
    if not cfg.class_names:
        cfg = replace(cfg, class_names=caption_names(classes))
    if classes and len(classes) != len(cfg.class_names):
        raise DataError(f"{train_src} has {len(classes)} classes but {len(cfg.class_names)} class names were given")
    torch.manual_seed(cfg.seed)
    model = build_clip(cfg.model_cfg)
    tokens = _tokens(cfg)
    size = int(cfg.model_cfg["vision_cfg"]["image_size"])
    loader = ShardLoader(
        train_src,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        seed=cfg.seed,
        transform=TrainTransform(size, scale=cfg.crop_scale, hflip=True, mean=cfg.mean, std=cfg.std, in_chans=3),
    )
    steps = cfg.samples // cfg.batch_size
    warmup = max(1, int(cfg.warmup_frac * steps))
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup)))
        ),
    )
    loss_fn = open_clip.ClipLoss()
    gen = torch.Generator().manual_seed(cfg.seed)
    bar = Progress(steps, images_per_step=cfg.batch_size, enabled=progress, desc="train-clip", plain_interval=10.0)
    t0 = time.time()
    step, losses = 0, []
    model.train()
    while step < steps:
        for batch in loader:
            labels = batch["label"]
            which = torch.randint(len(cfg.templates), (labels.shape[0],), generator=gen)
            img_f, txt_f, scale = model(batch["image"], tokens[labels, which])
            loss = loss_fn(img_f, txt_f, scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                cast(torch.Tensor, model.logit_scale).clamp_(0, math.log(100))  # (open_clip's nn.Parameter)
            step += 1
            losses.append(float(loss.detach()))
            bar.update(step, loss=losses[-1], lr=sched.get_last_lr()[0])
            if step >= steps:
                break
    bar.close()
    train_s = time.time() - t0
    t1 = time.time()
    top1, n_test = zero_shot_top1(model, tokens, test_src, cfg)
    eval_s = time.time() - t1
    result = {
        "zero_shot_top1": round(top1, 2),
        "chance": round(100.0 / len(cfg.class_names), 2),
        "test_samples": n_test,
        "train_samples": steps * cfg.batch_size,
        "steps": steps,
        "train_seconds": round(train_s, 1),
        "eval_seconds": round(eval_s, 1),
        "final_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4),
        "arch": TINY_CLIP_ARCH,
        "train_src": str(train_src),
        "test_src": str(test_src),
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
    }
    save_clip(
        model,
        cfg.model_cfg,
        out,
        mean=cfg.mean,
        std=cfg.std,
        arch=TINY_CLIP_ARCH,
        meta={
            "zero_shot_top1": result["zero_shot_top1"],
            "classes": list(cfg.class_names),
            "templates": list(cfg.templates),
        },
    )
    result.update(checkpoint=str(out.resolve()), sha256=file_sha256(out))
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def class_prompts(names: Sequence[str], templates: Sequence[str] = TEMPLATES) -> list[list[str]]:
    """``[[template.format(name) for template], ...]`` per class (what the zero-shot classifier averages)."""
    return [[t.format(n) for t in templates] for n in names]
