"""What ``mimscale eval`` evaluates: a pre-training run directory or an exported encoder file.

A run directory holds ``config.yaml`` (geometry and normalisation of the run) and ``encoder.safetensors``;
an exported ``.safetensors`` file carries its geometry in its tensors (``patch_embed.proj.weight
[D, C, p, p]``, ``pos_embed [1, 1 + N, D]``, the block count), so arch, patch size, image size and channels
are inferred and ``--arch`` etc. only have to agree. Any format :mod:`mimscale.models.init` reads works as
a file (timm / BEiT state dicts, the official MAE checkpoint, a Hugging Face ViT folder); weights are read with
safetensors or ``torch.load(weights_only=True)``.
Any missing, corrupt or mismatching file raises :class:`~mimscale.errors.CheckpointError` (one line).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from ..config import IMAGENET_MEAN, IMAGENET_STD
from ..errors import CheckpointError, DataError
from ..models.pos_embed import sincos_2d
from ..models.vit import ARCHS, VisionTransformer, build_vit

ENCODER_FILE = "encoder.safetensors"
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
log = logging.getLogger("mimscale.eval")


@dataclass
class Source:
    """A loaded encoder and what it was trained with."""

    encoder: VisionTransformer  # global_pool="token", num_classes=0: the exported encoder
    state: dict[str, torch.Tensor]  # its weights as read (timm key names)
    arch: str
    img_size: int
    patch_size: int
    in_chans: int
    pos_embed: str  # "sincos" (fixed buffer), "learned" or "relative" (BEiT layout)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    weights: Path
    run_dir: Path | None = None  # set when SOURCE is a run directory
    step: int | None = None  # the run's last training step (where eval metrics are logged)
    format: str = "mimscale"  # the file's layout (models/init.py): mimscale, timm, beit, mae, hf


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file; CheckpointError if missing or unreadable."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"encoder weights not found: {path}")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error type for truncated / non-safetensors files
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else 'corrupt'})"
        ) from None


def vit_for_geometry(
    geo: dict, state: dict[str, torch.Tensor], *, global_pool: str, num_classes: int = 0
) -> VisionTransformer:
    """An empty ViT of :func:`infer_geometry`'s ``geo``, with layer scale where ``state`` has it (timm's ``ls1`` or
    BEiT's ``gamma_1``), to load ``state`` into."""
    return build_vit(
        geo["arch"],
        geo["img_size"],
        geo["patch_size"],
        geo["in_chans"],
        pos_embed=geo["pos_embed"],
        layer_scale_init=1.0 if "blocks.0.ls1.gamma" in state or "blocks.0.gamma_1" in state else None,
        global_pool=global_pool,
        num_classes=num_classes,
    )


def infer_geometry(state: dict[str, torch.Tensor], path: Path) -> dict:
    """``arch, img_size, patch_size, in_chans, pos_embed`` from the tensors of an exported encoder."""
    table = state.get("blocks.0.attn.relative_position_bias_table")  # BEiT layout (pos_embed=relative)
    try:
        w, pos = state["patch_embed.proj.weight"], state["pos_embed"] if table is None else None
    except KeyError as e:
        raise CheckpointError(f"{path} is not a mimscale/timm ViT encoder (no {e.args[0]} tensor)") from None
    dim, in_chans, patch = int(w.shape[0]), int(w.shape[1]), int(w.shape[2])
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    arch = next((a for a, s in ARCHS.items() if s["embed_dim"] == dim and s["depth"] == depth), None)
    if table is not None:  # (2G - 1)^2 + 3 rows
        side = math.isqrt(int(table.shape[0]) - 3)
        grid, ok = (side + 1) // 2, side * side == table.shape[0] - 3 and side % 2 == 1
    else:
        assert pos is not None  # read above whenever there is no relative table
        grid = math.isqrt(int(pos.shape[1]) - 1)
        ok = grid * grid == pos.shape[1] - 1
    if arch is None or not ok:
        raise CheckpointError(f"{path}: width {dim} x {depth} blocks is not a known ViT ({', '.join(ARCHS)})")
    if table is not None:
        kind = "relative"
    else:
        assert pos is not None
        kind = "sincos" if torch.allclose(pos.float(), sincos_2d(dim, grid, cls_token=True), atol=1e-5) else "learned"
    return dict(arch=arch, img_size=grid * patch, patch_size=patch, in_chans=in_chans, pos_embed=kind)


def load_source(
    source: str | Path,
    arch: str | None = None,
    img_size: int | None = None,
    patch_size: int | None = None,
    in_chans: int | None = None,
) -> Source:
    """Load SOURCE (a run directory or an exported ``.safetensors`` file) into a strict-checked encoder."""
    from ..models.init import load_encoder, read_weights

    p = Path(source).expanduser()
    run_dir: Path | None = None
    cfg: dict[str, Any] = {}
    if p.is_dir() and (p / "config.yaml").is_file():
        try:
            cfg = yaml.safe_load((p / "config.yaml").read_text()) or {}
        except yaml.YAMLError as e:
            raise CheckpointError(f"{p / 'config.yaml'} is not valid YAML ({str(e).splitlines()[0]})") from None
        run_dir, weights = p, p / ENCODER_FILE
        if not weights.is_file():
            raise CheckpointError(f"encoder weights not found: {weights}")
    elif p.is_dir() or (p.is_file() and p.suffix in WEIGHT_SUFFIXES):
        weights = p  # an export, a timm / BEiT / MAE / Hugging Face file or folder (models/init.py)
    else:
        raise CheckpointError(
            f"weights not found: {source} (no such run directory or file)"
            if not p.exists()
            else f"{source}: expected a run directory or a weights file ({', '.join(WEIGHT_SUFFIXES)})"
        )
    w = read_weights(weights)
    weights = w.path
    state = {k: v for k, v in w.encoder.items() if not k.startswith(("head.", "fc_norm."))}
    geo = infer_geometry(state, weights)
    model_cfg = cfg.get("model") or {}
    trained_at = geo["img_size"]
    if model_cfg.get("img_size") not in (None, trained_at):
        raise CheckpointError(
            f"{weights} holds a {geo['arch']} with img_size={trained_at}, but its run's config says "
            f"img_size={model_cfg['img_size']}"
        )
    if img_size is not None and img_size != trained_at:  # evaluate at another resolution: pos-embed resampled
        if img_size % geo["patch_size"]:
            raise CheckpointError(f"--img-size {img_size} is not a multiple of the patch size {geo['patch_size']}")
        geo["img_size"] = img_size
        log.info(
            "evaluating at %d px; %s was trained at %d px: position embeddings resampled", img_size, weights, trained_at
        )
    for key, given in (("arch", arch), ("patch_size", patch_size), ("in_chans", in_chans)):
        want = given if given is not None else model_cfg.get(key)
        if want is not None and want != geo[key]:
            raise CheckpointError(
                f"{weights} holds a {geo['arch']} with img_size={geo['img_size']}, "
                f"patch_size={geo['patch_size']}, in_chans={geo['in_chans']}, but {key}={want} "
                f"was asked for"
            )
    # a timm model saved with global average pooling has fc_norm and no final norm: keep that layout
    pooled = "norm.weight" not in w.encoder and "fc_norm.weight" in w.encoder
    encoder = vit_for_geometry(geo, state, global_pool="avg" if pooled else "token")  # values come from the file
    load_encoder(encoder, w, keep_head=pooled, require_all=True)  # logs its summary line
    data = cfg.get("data") or {}
    summary_step = None
    if run_dir is not None and (run_dir / "summary.json").is_file():
        import json

        try:
            summary_step = json.loads((run_dir / "summary.json").read_text()).get("steps")
        except ValueError:
            summary_step = None
    return Source(
        encoder=encoder,
        state=w.encoder,
        weights=weights,
        format=w.format,
        run_dir=run_dir,
        step=summary_step,
        mean=tuple(data.get("mean") or IMAGENET_MEAN),
        std=tuple(data.get("std") or IMAGENET_STD),
        **geo,
    )


def num_classes(shard_dir: str, given: int | None = None) -> int:
    """Class count: ``given``, else the length of the manifest's ``classes`` list."""
    from ..data.shards import read_manifest

    if given:
        return int(given)
    classes = read_manifest(shard_dir).get("classes") or []
    if not classes:
        raise DataError(f"the manifest of {shard_dir} lists no classes: pass num_classes=N")
    return len(classes)
