"""Frozen open_clip image tower as a patch-feature teacher (DTM targets, k-CLIP features).

A CLIP checkpoint file is either

* a **mimscale CLIP file** (what ``mimscale teacher train-clip`` writes; self-describing)::

      {"format": "mimscale-clip/1", "arch": str, "model_cfg": <open_clip model cfg dict>,
       "state_dict": {name: Tensor}, "preprocess": {"image_size": int, "mean": [3], "std": [3]},
       "meta": {...}}

  loaded with ``torch.load(weights_only=True)`` and built as ``open_clip.CLIP(**model_cfg)``; or
* any **plain open_clip checkpoint** of a built-in architecture (e.g. the OpenAI ViT-B-16 weights as
  ``open_clip_pytorch_model.bin``), loaded with ``open_clip.create_model(arch, pretrained=path,
  weights_only=True)`` when ``arch`` is given.

:class:`CLIPTeacher` returns the patch tokens after the tower's final LayerNorm (``ln_post``), class
token dropped, multiplied by the visual projection (``proj``): ``[B, N, D_out]`` with ``N = gh * gw`` in
raster order and ``D_out = embed_dim`` (512 for CLIP ViT-B/16, 64 for :data:`TINY_CLIP_CFG`).

Its weights are **not registered** as parameters of the module (``teacher.parameters()`` is empty): an
objective that holds the teacher as a submodule therefore never hands them to DeepSpeed, ZeRO, the
optimizer or a checkpoint, yet ``teacher.to(device)`` still moves them. Checkpoints record
:meth:`CLIPTeacher.teacher_id` (path + sha256) instead of the weights.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, ConfigError

__all__ = [
    "CLIP_FORMAT",
    "TINY_CLIP_ARCH",
    "TINY_CLIP_CFG",
    "CLIPTeacher",
    "build_clip",
    "save_clip",
    "load_clip",
    "file_sha256",
]

CLIP_FORMAT = "mimscale-clip/1"
TINY_CLIP_ARCH = "mimscale-tiny-clip"
#: A CPU-sized real CLIP (open_clip model cfg): ViT 32 px / patch 4 (8x8 = 64 patches, the ``tiny_cpu``
#: student's grid), width 32, 2 blocks, 2 heads, 64-d joint embedding (= the teacher's ``D_out``); text:
#: 16-token context, width 32, 2 blocks, 2 heads, open_clip's BPE vocabulary. ~4 MFLOPs per image forward.
TINY_CLIP_CFG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "patch_size": 4, "width": 32, "layers": 2, "head_width": 16, "mlp_ratio": 4.0},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file (streamed)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def build_clip(model_cfg: dict) -> nn.Module:
    """A randomly initialised ``open_clip.CLIP`` from an open_clip model cfg dict (e.g. :data:`TINY_CLIP_CFG`)."""
    import open_clip

    try:
        return open_clip.CLIP(**_copy(model_cfg))
    except (TypeError, ValueError, AssertionError) as e:
        raise ConfigError(f"invalid open_clip model cfg ({type(e).__name__}: {e})") from None


def _copy(cfg: dict) -> dict:
    return {k: (_copy(v) if isinstance(v, dict) else v) for k, v in cfg.items()}


def save_clip(
    model: nn.Module,
    model_cfg: dict,
    path: str | os.PathLike,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    arch: str = TINY_CLIP_ARCH,
    meta: dict | None = None,
) -> Path:
    """Write a mimscale CLIP file atomically (temp file + rename). ``mean``/``std``: the 3-channel
    normalisation the model was trained with; ``meta``: plain JSON-like values (classes, accuracy, ...)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {
        "format": CLIP_FORMAT,
        "arch": arch,
        "model_cfg": _copy(model_cfg),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "preprocess": {
            "image_size": int(model_cfg["vision_cfg"]["image_size"]),
            "mean": [float(m) for m in mean],
            "std": [float(s) for s in std],
        },
        "meta": dict(meta or {}),
    }
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    torch.save(blob, tmp)
    os.replace(tmp, path)
    return path


def load_clip(path: str | os.PathLike, arch: str | None = None) -> tuple[nn.Module, dict]:
    """Load a CLIP model (eval mode, fp32, CPU) and its info ``{"arch", "sha256", "path", "mean", "std",
    "image_size", "meta"}``. Raises :class:`CheckpointError` (one line) on a missing or corrupt file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(
            f"CLIP teacher file {path} not found; train one with "
            f"`mimscale teacher train-clip {path}` or give the path of an open_clip checkpoint"
        )
    data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    try:
        blob = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"CLIP teacher file {path} is corrupt or not a torch checkpoint "
            f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
        ) from None
    del data
    if isinstance(blob, dict) and blob.get("format") == CLIP_FORMAT:
        try:
            model = build_clip(blob["model_cfg"])
            model.load_state_dict(blob["state_dict"], strict=True)
            pre = blob["preprocess"]
            info = {
                "arch": str(blob["arch"]),
                "mean": list(pre["mean"]),
                "std": list(pre["std"]),
                "image_size": int(pre["image_size"]),
                "meta": blob.get("meta", {}),
            }
        except (KeyError, RuntimeError, TypeError, ConfigError) as e:
            raise CheckpointError(
                f"CLIP teacher file {path} is damaged ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
            ) from None
    elif isinstance(blob, dict) and blob.get("format") is not None:
        raise CheckpointError(
            f"{path} has format {blob.get('format')!r}, not a CLIP teacher ({CLIP_FORMAT!r} "
            f"or a plain open_clip state dict)"
        )
    else:
        if not arch:
            raise CheckpointError(
                f"{path} is a plain state dict, not a {CLIP_FORMAT} file; name its open_clip "
                f"architecture (e.g. arch='ViT-B-16')"
            )
        del blob
        import open_clip

        try:
            model = open_clip.create_model(arch, pretrained=str(path), weights_only=True, load_weights=True)
        except Exception as e:
            raise CheckpointError(
                f"cannot load {path} as open_clip '{arch}' ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:160] if str(e) else ''})"
            ) from None
        pre = getattr(model.visual, "preprocess_cfg", {}) or {}
        mean = list(pre.get("mean", open_clip.OPENAI_DATASET_MEAN))
        std = list(pre.get("std", open_clip.OPENAI_DATASET_STD))
        info = {"arch": arch, "mean": mean, "std": std, "image_size": int(model.visual.image_size[0]), "meta": {}}
    info.update(path=str(path.resolve()), sha256=sha)
    return model.eval(), info


def _check_tower(visual: nn.Module, path: Path) -> None:
    from open_clip.transformer import VisionTransformer

    if not isinstance(visual, VisionTransformer):
        raise ConfigError(f"{path}: the teacher needs an open_clip ViT image tower, got {type(visual).__name__}")
    if visual.attn_pool is not None or visual.final_ln_after_pool or visual.proj is None:
        raise ConfigError(
            f"{path}: image towers with attentional pooling, LayerNorm after pooling or no "
            f"projection are not supported as patch-feature teachers"
        )


class CLIPTeacher(nn.Module):
    """Frozen CLIP image tower -> patch features.

    ``forward(images: [B, C, H, W], grid=None) -> [B, gh*gw, D_out]`` float32, no grad, raster order.
    ``images`` are normalised tensors (the student's batch; ``C`` = 1 is broadcast to RGB). ``grid``
    (default: the teacher's own grid ``image_size // patch``) is the token grid to return, normally the
    student's. When it differs from what the images give, ``resize`` decides:

    * ``"input"`` (default; docs/objectives/dtm.md, for H/14): the images are resized (bicubic, antialiased) to
      ``grid * teacher_patch`` pixels and the teacher's learned position embedding is interpolated
      (bicubic) to ``grid``, so every output token sees exactly one student patch's area. No resizing
      at all when ``H == gh * teacher_patch`` and ``grid`` is the teacher's grid (e.g. ViT-B/16 student
      with a CLIP-B/16 teacher at 224 px, or the tiny CLIP with a 32 px / patch 4 student).
    * ``"features"``: the images are resized to the teacher's native ``image_size``, the tower runs on its
      native grid and the ``[D_out, Gt, Gt]`` feature map is resized (bilinear, antialiased) to ``grid``.

    ``dtype``: ``torch.float32`` or ``torch.bfloat16`` weights/compute (output always float32).
    """

    _visual: Any  # the open_clip VisionTransformer (its attributes are open_clip's, untyped), set in __init__

    def __init__(
        self,
        path: str | os.PathLike,
        arch: str | None = None,
        resize: str = "input",
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        if resize not in ("input", "features"):
            raise ConfigError(f"teacher resize must be 'input' or 'features', got {resize!r}")
        if dtype not in (torch.float32, torch.bfloat16):
            raise ConfigError(f"teacher dtype must be float32 or bfloat16, got {dtype}")
        model, info = load_clip(path, arch)
        visual = cast(Any, model).visual
        _check_tower(visual, Path(path))
        del model
        visual.eval().requires_grad_(False).to(dtype)
        self.__dict__["_visual"] = visual  # hidden from parameters()/state_dict()/ZeRO (see module docstring)
        self.info = info
        self.resize = resize
        self.patch_size = int(visual.patch_size[0])
        self.image_size = int(visual.image_size[0])
        self.grid: tuple[int, int] = (int(visual.grid_size[0]), int(visual.grid_size[1]))
        self.out_dim = int(visual.proj.shape[1])
        self.width = int(visual.proj.shape[0])
        self.mean = tuple(float(m) for m in info["mean"])
        self.std = tuple(float(s) for s in info["std"])
        self._pos_cache: dict[tuple[int, int], torch.Tensor] = {}
        self._norm_cache: dict[tuple, tuple[torch.Tensor, ...]] = {}  # renormalize's constants per dtype/device
        super().train(False)

    # ---- module plumbing: the hidden tower follows .to()/.float()/.bfloat16(); never leaves eval mode
    @property
    def visual(self) -> nn.Module:
        """The frozen open_clip ``VisionTransformer`` (not a registered submodule)."""
        return self._visual

    def _apply(self, fn, recurse: bool = True):
        self._visual._apply(fn)
        self._pos_cache.clear()
        self._norm_cache.clear()
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True) -> CLIPTeacher:
        return super().train(False)

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self._visual.parameters())

    def teacher_id(self) -> dict[str, str]:
        """What a checkpoint / shard manifest records instead of the weights: ``{"path", "sha256", "arch"}``."""
        return {"path": self.info["path"], "sha256": self.info["sha256"], "arch": self.info["arch"]}

    # ---- compute
    def renormalize(self, images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
        """Map ``images`` normalised with ``(mean, std)`` to the teacher's own statistics (``teacher_norm='clip'``).
        ``images: [B, C, H, W]`` -> ``[B, 3, H, W]``."""
        images = self._rgb(images)
        key = (images.dtype, str(images.device), tuple(map(float, mean)), tuple(map(float, std)))
        if key not in self._norm_cache:  # made once: a torch.tensor(..., device=) per step is a blocking copy
            self._norm_cache[key] = tuple(
                torch.tensor(v, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
                for v in (key[2], key[3], self.mean, self.std)
            )
        m_in, s_in, m_t, s_t = self._norm_cache[key]
        return (images * s_in + m_in - m_t) / s_t

    @staticmethod
    def _rgb(images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"teacher input must be [B, 1|3, H, W], got {tuple(images.shape)}")
        return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images

    def _pos_embed(self, grid: tuple[int, int]) -> torch.Tensor:
        """Learned position embedding ``[1 + gh*gw, W]``, bicubically interpolated off the native grid."""
        pos = self._visual.positional_embedding
        if grid == self.grid:
            return pos
        if grid not in self._pos_cache:
            gh, gw = self.grid
            patch = pos[1:].float().reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
            patch = F.interpolate(patch, size=grid, mode="bicubic", align_corners=False)
            patch = patch.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)
            self._pos_cache[grid] = torch.cat([pos[:1].float(), patch]).to(pos.dtype)
        return self._pos_cache[grid]

    @torch.no_grad()
    def forward(self, images: torch.Tensor, grid: Sequence[int] | None = None) -> torch.Tensor:
        """``images [B, C, H, W]`` (normalised) -> patch features ``[B, gh*gw, D_out]`` float32."""
        v = self._visual
        images = self._rgb(images)
        grid = self.grid if grid is None else (int(grid[0]), int(grid[1]))
        p = self.patch_size
        if self.resize == "input":
            run_grid, pixels = grid, (grid[0] * p, grid[1] * p)
        else:
            run_grid, pixels = self.grid, (self.image_size, self.image_size)
        x = images.to(v.conv1.weight.dtype)
        if tuple(x.shape[-2:]) != pixels:
            x = F.interpolate(x.float(), size=pixels, mode="bicubic", align_corners=False, antialias=True).to(x.dtype)
        x = v.conv1(x).flatten(2).transpose(1, 2)  # [B, N, W]
        cls = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self._pos_embed(run_grid).to(x.dtype)
        x = v.ln_pre(x)
        x = v.transformer(x)
        x = v.ln_post(x)[:, 1:] @ v.proj  # [B, N, D_out]
        x = x.float()
        if run_grid != grid:
            fmap = x.transpose(1, 2).reshape(x.shape[0], -1, *run_grid)
            fmap = F.interpolate(fmap, size=grid, mode="bilinear", align_corners=False, antialias=True)
            x = fmap.flatten(2).transpose(1, 2)
        return x.contiguous()

    def flops_per_image(self, grid: Sequence[int] | None = None) -> float:
        """Forward FLOPs (2 x multiply-accumulates of the linear layers and attention matmuls) per image."""
        v = self._visual
        gh, gw = self.grid if grid is None else grid
        if self.resize == "features":
            gh, gw = self.grid
        n, t, w, p = gh * gw, gh * gw + 1, self.width, self.patch_size
        block = v.transformer.resblocks[0]
        hidden = block.mlp.c_fc.out_features
        per_layer = t * (4 * w * w + 2 * w * hidden) + 2 * t * t * w
        macs = n * 3 * p * p * w + len(v.transformer.resblocks) * per_layer + n * w * self.out_dim
        return 2.0 * macs

    def extra_repr(self) -> str:
        return (
            f"arch={self.info['arch']}, grid={self.grid}, patch={self.patch_size}, out_dim={self.out_dim}, "
            f"resize={self.resize}, sha256={self.info['sha256'][:12]}"
        )


def grid_of(num_patches: int) -> tuple[int, int]:
    """Square grid side of ``num_patches`` (``ConfigError`` if it is not a square)."""
    g = int(round(math.sqrt(num_patches)))
    if g * g != num_patches:
        raise ConfigError(f"{num_patches} patches do not form a square grid")
    return g, g
