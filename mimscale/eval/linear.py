"""Linear probe of a frozen encoder (MAE protocol), run through ``accelerate`` on 1..N processes.

Model: the frozen encoder (eval mode, no grad) -> pooled feature ``[B, D]`` (``pool=cls``: the cls token
after the final norm, as MAE; ``pool=mean``: mean of the patch tokens) -> ``BatchNorm1d(D, affine=False,
eps=1e-6)`` (parameter-free, MAE's trick against badly scaled features) -> ``Linear(D, C)`` (weight
trunc-N(0, 0.01), bias 0). Loss: cross-entropy.

Optimizer (``optimizer=``): ``lars`` (MAE's choice: SGD + momentum 0.9 whose update of each >= 2-D
parameter is rescaled by the trust ratio ``0.001 ||w|| / ||g + wd w||``; biases get plain momentum SGD
and no decay) or ``sgd`` (momentum SGD, decay on the weight only). lr = ``blr * batch_size / 256`` with
linear warmup then half-cycle cosine, per step. MAE's defaults: 90 epochs (50 for L/H), batch 16384,
blr 0.1, wd 0, 10 warmup epochs. LARS' trust ratio makes each step move a weight by ~``0.001 lr`` of its
norm, which suits those huge batches; for a small-batch run on a laptop use ``optimizer=sgd``.

Two paths:

* ``augment=false`` (fast path, default): the encoder is frozen and the input is not augmented, so every
  epoch would see the same features. They are extracted once and stay SHARDED on the devices: each
  process encodes its share of the shards and keeps only those ``~N/world x D`` floats on its device
  (nothing is gathered). Each step every process draws ``batch_size / world`` rows of its own shard (a
  fresh permutation per epoch from ``(seed, epoch, rank)``), so the global batch is ``batch_size`` rows
  drawn without replacement from the whole set, as with one process. An epoch costs a few matrix
  products instead of a pass of the encoder.
* ``augment=true`` (MAE's protocol: RandomResizedCrop scale (0.08, 1) + flip): the encoder runs on every
  training batch (still frozen, under ``no_grad``), read by a train-mode ShardLoader split by process.

Distribution: ``Accelerator(split_batches=True)``: ``batch_size`` is the global batch; each process
takes its slice and the head's gradients are averaged (DDP), so 1 and N processes take the same steps
up to the BatchNorm statistics, which each process computes on its slice (not synchronised, as in
MAE) and the sampling (per shard, see above). The test accuracy: each process scores its own share of
the test features on its device; the correct counts are summed over processes.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.schedule import warmup_cosine
from .knn import eval_autocast, extract_features

log = logging.getLogger("mimscale.eval")


@dataclass
class LinearConfig:
    pool: Literal["cls", "mean"] = "cls"
    epochs: float = 90.0
    batch_size: int | None = None  # global batch (split over processes); None: 16384, or less for small data
    blr: float = 0.1  # lr = blr * batch_size / 256
    warmup_epochs: float = 10.0
    weight_decay: float = 0.0
    momentum: float = 0.9
    optimizer: Literal["lars", "sgd"] = "lars"
    augment: bool = False  # false: cached features (fast path); true: RRC + flip every step
    num_classes: int | None = None  # default: the classes in the train manifest
    train_samples: int | None = None  # cap (whole shards) on the training set
    test_samples: int | None = None  # cap (whole shards) on the test set
    feature_batch_size: int = 256  # encoder batch per process while extracting features
    num_workers: int = 2
    seed: int = 0
    mean: tuple[float, ...] | None = None  # default: the run's data.mean / data.std (ImageNet for a file)
    std: tuple[float, ...] | None = None
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # encoder autocast: auto = bf16 on CUDA, else fp32


class LinearHead(nn.Module):
    """``BatchNorm1d(D, affine=False)`` + ``Linear(D, C)``: ``[B, D] -> [B, C]``."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.fc = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(x))


class LARS(torch.optim.Optimizer):
    """Momentum SGD with a layer-wise trust ratio for >= 2-D parameters (1-D ones: no decay, no ratio).

    For a weight ``w`` with gradient ``g``: ``d = g + wd w``; ``d *= eta ||w|| / ||d||`` (when both norms are
    positive); ``mu = m mu + d``; ``w -= lr mu``.
    """

    def __init__(
        self,
        params,
        lr: float = 0.0,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        trust_coefficient: float = 0.001,
    ):
        super().__init__(
            params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient)
        )

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim > 1:
                    d = d.add(p, alpha=g["weight_decay"])
                    pn, dn = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    d = d * torch.where((pn > 0) & (dn > 0), g["trust_coefficient"] * pn / dn, torch.ones_like(pn))
                mu = self.state[p].get("mu")
                if mu is None:
                    mu = self.state[p]["mu"] = torch.zeros_like(p)
                mu.mul_(g["momentum"]).add_(d)
                p.add_(mu, alpha=-g["lr"])


def make_optimizer(head: LinearHead, cfg: LinearConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "lars":
        return LARS(head.parameters(), weight_decay=cfg.weight_decay, momentum=cfg.momentum)
    return torch.optim.SGD(
        [
            {"params": [head.fc.weight], "weight_decay": cfg.weight_decay},
            {"params": [head.fc.bias], "weight_decay": 0.0},
        ],
        lr=0.0,
        momentum=cfg.momentum,
    )


def top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * (logits.argmax(1) == labels).float().mean().item() if len(labels) else float("nan")


DEFAULT_BATCH = 16384  # MAE's linear probe


def fit_batch_size(given: int | None, train_dir: str, cap: int | None, world: int, say: bool) -> int:
    """The probe's global batch: ``given`` if it fits the training samples (else a one-line ConfigError, before
    any work), or MAE's 16384 capped at a power of two <= a quarter of the samples (>= 4 steps per epoch)."""
    from ..data.epoch import count_samples, first_shards
    from ..errors import ConfigError

    n = count_samples(first_shards(train_dir, cap), None)
    if given is not None:
        if given > n:
            raise ConfigError(
                f"batch_size={given} is larger than the {n} training samples of {train_dir}; pass batch_size=N "
                "(N <= the samples) or leave it unset to have one chosen"
            )
        return given
    bs = DEFAULT_BATCH
    while bs > max(n // 4, 1) and bs > world:
        bs //= 2
    bs = max(bs - bs % world, world)
    if bs != DEFAULT_BATCH and say:
        log.info("linear: batch_size=%d (16384 capped for %d training samples; batch_size=N sets it)", bs, n)
    return bs


def linear_probe(
    encoder, train_dir: str, test_dir: str, cfg: LinearConfig, accelerator, *, img_size: int, in_chans: int, mean, std
) -> dict:
    """Train the probe and return ``{"top1": final %, "best_top1": %, "curve": [[epoch, %], ...], ...}``."""

    from ..data.epoch import capped_eval_loader, first_shards
    from ..data.loader import ShardLoader
    from ..data.transforms import EvalTransform, TrainTransform
    from ..errors import ConfigError
    from .source import num_classes

    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    cfg.batch_size = fit_batch_size(cfg.batch_size, train_dir, cfg.train_samples, world, rank == 0)
    if cfg.batch_size % world:
        raise ConfigError(f"batch_size={cfg.batch_size} must be divisible by the {world} processes")
    encoder.to(device).eval().requires_grad_(False)
    classes = num_classes(train_dir, cfg.num_classes)
    tf = EvalTransform(img_size, mean=mean, std=std, in_chans=in_chans)

    def eval_loader(src: str, cap: int | None) -> ShardLoader:
        return capped_eval_loader(
            src,
            cap,
            batch_size=cfg.feature_batch_size,
            transform=tf,
            rank=rank,
            world_size=world,
            num_workers=cfg.num_workers,
        )

    xte, yte = extract_features(  # this process's own share
        encoder, eval_loader(test_dir, cfg.test_samples), device, cfg.pool, precision=cfg.precision
    )
    torch.manual_seed(cfg.seed)
    head = LinearHead(encoder.embed_dim, classes)
    opt = make_optimizer(head, cfg)
    head, opt = accelerator.prepare(head, opt)
    loader: ShardLoader | ShardedFeatures
    if cfg.augment:
        loader = ShardLoader(
            first_shards(train_dir, cfg.train_samples),
            manifest=train_dir,
            batch_size=cfg.batch_size // world,
            rank=rank,
            world_size=world,
            seed=cfg.seed,
            num_workers=cfg.num_workers,
            transform=TrainTransform(img_size, scale=(0.08, 1.0), mean=mean, std=std, in_chans=in_chans),
        )
        n_train, rows = loader.samples_per_epoch, None
    else:
        xtr, ytr = extract_features(
            encoder, eval_loader(train_dir, cfg.train_samples), device, cfg.pool, precision=cfg.precision
        )
        n_train = int(_sum([len(ytr)], device)[0])
        rows = [int(v) for v in _sum([len(ytr) if r == rank else 0 for r in range(world)], device)]
        if n_train < cfg.batch_size:
            raise ConfigError(f"batch_size={cfg.batch_size} is larger than the {n_train} training samples")
        loader = ShardedFeatures(xtr, ytr, cfg.batch_size // world, n_train // cfg.batch_size, cfg.seed, rank)
    steps_per_epoch = len(loader)
    total = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    peak = cfg.blr * cfg.batch_size / 256
    curve, step, epoch = [], 0, 0
    while step < total:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        head.train()
        for batch in loader:
            if step >= total:
                break
            if cfg.augment:
                with torch.no_grad(), eval_autocast(device, cfg.precision):
                    img = batch["image"].to(device, non_blocking=True)
                    feats = encoder.pool(encoder.forward_features(img), cfg.pool).float()
                labels = batch["label"].to(device, non_blocking=True)
            else:
                feats, labels = batch
            for g in opt.param_groups:
                g["lr"] = warmup_cosine(step, total, warmup, peak, 0.0)
            loss = F.cross_entropy(head(feats), labels)
            accelerator.backward(loss)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
        epoch += 1
        acc = evaluate(accelerator.unwrap_model(head), xte, yte, reduce=True)
        curve.append([round(step / steps_per_epoch, 4), acc])
        if accelerator.is_main_process:
            log.info(
                "linear probe epoch %d (step %d/%d): loss %.4f, test top-1 %.2f%%", epoch, step, total, loss.item(), acc
            )
    return {
        "top1": curve[-1][1],
        "best_top1": max(a for _, a in curve),
        "curve": curve,
        "classes": classes,
        "train_samples": n_train,
        "test_samples": int(_sum([len(yte)], device)[0]),
        "steps": total,
        "processes": world,
        "feature_rows_per_process": rows,
        "lr": peak,
        "feature_dim": int(encoder.embed_dim),
    }


class ShardedFeatures:
    """This process's share of the training features as a re-iterable loader of ``(feats [b, D], labels [b])``.

    ``feats [n_r, D]`` / ``labels [n_r]`` stay on their device. Each epoch (:meth:`set_epoch`) draws a fresh
    permutation from ``(seed, epoch, rank)`` and yields ``steps`` batches of ``b`` rows (every process the
    same number of steps, so the gradient all-reduce never waits; a shard a row short of ``steps * b`` wraps).
    """

    def __init__(self, feats: torch.Tensor, labels: torch.Tensor, batch: int, steps: int, seed: int, rank: int):
        self.feats, self.labels, self.batch, self.steps, self.seed, self.rank = feats, labels, batch, steps, seed, rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        n = self.feats.shape[0]
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 1009 + self.rank)
        need = self.steps * self.batch
        order = torch.cat([torch.randperm(n, generator=g) for _ in range(-(-need // max(n, 1)))])[:need]
        order = order.to(self.feats.device)
        for i in range(self.steps):
            idx = order[i * self.batch : (i + 1) * self.batch]
            yield self.feats[idx], self.labels[idx]


def _sum(values: list[float], device) -> list[float]:
    """Sum small numbers over processes (identity on one)."""
    import torch.distributed as tdist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    if tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1:
        tdist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def evaluate(
    head: LinearHead, feats: torch.Tensor, labels: torch.Tensor, chunk: int = 4096, reduce: bool = False
) -> float:
    """Top-1 (%) of ``head`` on ``feats [M, D]`` (eval-mode BatchNorm: the running statistics).

    ``reduce=True``: ``feats`` are this process's share; the correct counts are summed over processes."""
    was = head.training
    head.eval()
    dev = next(head.parameters()).device
    correct = sum(
        int((head(feats[i : i + chunk].to(dev)).argmax(1) == labels[i : i + chunk].to(dev)).sum())
        for i in range(0, len(feats), chunk)
    )
    head.train(was)
    hit, n = _sum([correct, len(labels)], dev) if reduce else (correct, len(labels))
    return 100.0 * hit / n if n else float("nan")
