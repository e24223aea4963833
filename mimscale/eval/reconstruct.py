"""Reconstructions: the picture every masked-image-modeling user looks at first.

For objectives that predict pixels (a pixel decoder with ``pred``: MAE and EMAE's MAE decoder, MAE+ / AdPE's
crop decoder) the final evaluation of a pre-training run saves a few fixed validation images as one grid,
``RUN_DIR/reconstructions.png`` (+ ``reconstructions.json``: caption and what was drawn), one row per image:

    original | masked | reconstruction | reconstruction with the visible patches pasted

The objective is not named here: a module with a ``decoder`` that has ``mask_token`` and ``num_patches``
decodes encoded visible tokens (MAE layout); one with ``encoder_input`` / ``predict_tokens`` fills masked slots
itself (MAE+ / AdPE layout, run at its crop size). Anything else is "not a pixel objective".

With norm-pix targets the model never predicts a patch's mean and variance: each predicted patch is
un-normalised with the ORIGINAL patch's mean and variance (the figure's caption says so), then the data
normalisation is undone for display.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

log = logging.getLogger("mimscale.eval")

PNG = "reconstructions.png"
META = "reconstructions.json"
NOT_PIXEL = "not a pixel objective"


def _patchify(img: torch.Tensor, p: int) -> torch.Tensor:
    """``[B, C, H, W] -> [B, N, p*p*C]`` (pixel (dy, dx, c) at (dy*p + dx)*C + c, the MAE order)."""
    b, c, h, w = img.shape
    x = img.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def _unpatchify(x: torch.Tensor, p: int, c: int) -> torch.Tensor:
    """Inverse of :func:`_patchify` for a square grid: ``[B, N, p*p*C] -> [B, C, H, W]``."""
    b, n, _ = x.shape
    g = int(round(n**0.5))
    return x.reshape(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, g * p, g * p)


def pixel_kind(objective: nn.Module) -> str | None:
    """``"decoder"`` (MAE layout), ``"tokens"`` (MAE+ / AdPE layout) or None (not a pixel objective)."""
    dec = getattr(objective, "decoder", None)
    if dec is not None and hasattr(dec, "pred") and hasattr(dec, "mask_token") and hasattr(dec, "num_patches"):
        return "decoder"
    if hasattr(objective, "encoder_input") and hasattr(objective, "predict_tokens") and dec is not None:
        return "tokens"
    return None


def image_size(objective: nn.Module) -> int:
    """The size the objective predicts at (the crop size of a multi-crop objective, else the encoder's)."""
    cfg: Any = getattr(objective, "cfg", None)
    if pixel_kind(objective) == "tokens" and getattr(cfg, "crop_size", None):
        return int(cfg.crop_size)
    enc: Any = objective.encoder
    return int(enc.img_size)


@torch.no_grad()
def predict_pixels(objective: nn.Module, img: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``img [B, C, S, S]`` (normalised), ``mask bool [B, N]`` (True = hidden) -> ``pred [B, N, P]`` (fp32)."""
    kind = pixel_kind(objective)
    enc: Any = objective.encoder
    dtype = enc.patch_embed.proj.weight.dtype
    img = img.to(dtype)
    if kind == "decoder":
        keep = torch.argsort(mask.to(torch.uint8), dim=1, stable=True)[:, : int((~mask[0]).sum())]
        return objective.decoder(enc.forward_features(img, keep), keep).float()  # type: ignore[operator]
    if kind == "tokens":
        return objective.predict_tokens(objective.encoder_input(img, mask)).float()  # type: ignore[operator]
    raise ValueError(NOT_PIXEL)


def unnormalize(pred: torch.Tensor, orig: torch.Tensor, eps: float) -> torch.Tensor:
    """Norm-pix predictions back to pixels with the ORIGINAL patches' statistics (what the model never
    predicts): ``pred * sqrt(var_unbiased(orig) + eps) + mean(orig)``; ``pred, orig [B, N, P]``."""
    mu, var = orig.mean(-1, keepdim=True), orig.var(-1, keepdim=True, unbiased=True)
    return pred * (var + eps).sqrt() + mu


def fixed_mask(n: int, ratio: float, b: int, seed: int = 0) -> torch.Tensor:
    """``bool [b, n]``: the same count ``floor(n * ratio)`` hidden per row, drawn from ``seed`` (the figure is
    comparable across runs and checkpoints)."""
    g = torch.Generator().manual_seed(seed)
    hide = int(n * ratio)
    order = torch.argsort(torch.rand(b, n, generator=g), dim=1)
    mask = torch.zeros(b, n, dtype=torch.bool)
    mask.scatter_(1, order[:, :hide], True)
    return mask


@torch.no_grad()
def grid(
    objective: nn.Module,
    images: torch.Tensor,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    mask_ratio: float = 0.75,
    seed: int = 0,
) -> tuple[np.ndarray, str]:
    """``images [B, C, S, S]`` normalised with ``mean`` / ``std`` -> ``(uint8 [B*S, 4*S + 3*gap, 3], caption)``."""
    enc: Any = objective.encoder
    p, c = enc.patch_size, images.shape[1]
    b, s = images.shape[0], images.shape[-1]
    n = (s // p) ** 2
    mask = fixed_mask(n, mask_ratio, b, seed)
    was = objective.training
    objective.eval()
    try:
        pred = predict_pixels(objective, images.to(enc.patch_embed.proj.weight.device), mask.to(images.device))
    finally:
        objective.train(was)
    pred = pred.cpu()
    orig = _patchify(images.float().cpu(), p)  # [B, N, P] in normalised units
    cfg = getattr(objective, "cfg", None)
    norm_pix = bool(getattr(cfg, "norm_pix_loss", False))
    if norm_pix:
        pred = unnormalize(pred, orig, float(getattr(cfg, "norm_pix_eps", 1e-6)))
    m = mask.unsqueeze(-1)
    gray = torch.zeros_like(orig)  # 0 in normalised units: the data mean
    cols = [orig, torch.where(m, gray, orig), pred, torch.where(m, pred, orig)]
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, c, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, c, 1, 1)
    pics = [(_unpatchify(x, p, c) * std_t + mean_t).clamp(0, 1) for x in cols]  # [B, C, S, S] each
    gap = max(2, s // 16)
    rows = []
    for i in range(b):
        tiles = []
        for j, pic in enumerate(pics):
            t = pic[i].permute(1, 2, 0).numpy()
            t = np.repeat(t, 3, axis=2) if c == 1 else t[..., :3]
            tiles.append(t)
            if j < len(pics) - 1:
                tiles.append(np.ones((s, gap, 3), dtype=t.dtype))
        rows.append(np.concatenate(tiles, axis=1))
        if i < b - 1:
            rows.append(np.ones((gap, rows[-1].shape[1], 3), dtype=rows[-1].dtype))
    out = (np.concatenate(rows, axis=0) * 255.0 + 0.5).astype(np.uint8)
    caption = (
        f"original | masked ({mask_ratio:.0%} of the {n} patches hidden, fixed seed {seed}) | reconstruction | "
        "reconstruction with the visible patches pasted"
    )
    if norm_pix:
        caption += (
            "; norm-pix targets: the model predicts each patch normalised, so every predicted patch is shown "
            "un-normalised with the ORIGINAL patch's mean and variance"
        )
    return out, caption


def save(objective: nn.Module, images: torch.Tensor, mean, std, run_dir: Path, seed: int = 0) -> Path | None:
    """Write ``reconstructions.png`` / ``.json`` into ``run_dir``; None (and a json saying so) for objectives
    that do not predict pixels."""
    from PIL import Image

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    name = str(getattr(objective, "name", type(objective).__name__))
    if pixel_kind(objective) is None:
        (run_dir / META).write_text(json.dumps({"objective": name, "pixel": False, "caption": NOT_PIXEL}) + "\n")
        return None
    ratio = float(getattr(getattr(objective, "cfg", None), "mask_ratio", 0.75))
    pic, caption = grid(objective, images, tuple(mean), tuple(std), ratio, seed)
    Image.fromarray(pic).save(run_dir / PNG)
    meta = {"objective": name, "pixel": True, "caption": caption, "images": int(images.shape[0]), "mask_ratio": ratio}
    (run_dir / META).write_text(json.dumps(meta, indent=1) + "\n")
    log.info("reconstructions of %d validation images: %s", images.shape[0], run_dir / PNG)
    return run_dir / PNG
