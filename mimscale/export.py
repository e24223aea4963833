"""Weights out: ``mimscale export SRC --out PATH [--format timm|hf]``.

SRC is a run directory (the newest usable checkpoint, or ``--step``; a run without checkpoints gives its
``encoder.safetensors``), a fine-tuning output directory or any weights file :mod:`mimscale.models.init`
reads. The weights are loaded into our ViT (every tensor checked), then written:

* ``timm`` (default): one safetensors file in the layout timm loads strictly (``VisionTransformer`` or, for
  ``pos_embed=relative``, ``Beit``) whose header carries the model's description (:func:`metadata`:
  architecture, img/patch size, pooling, fc_norm, pos-embed type, objective, run, step) and the exact
  ``timm.create_model(...)`` call that loads it (:func:`timm_call`, printed too);
* ``hf``: a Hugging Face transformers folder (``config.json`` + ``model.safetensors``, ``ViTModel`` with the
  published key names) that ``transformers.ViTModel.from_pretrained(DIR)`` loads offline with outputs equal
  to ours (``last_hidden_state`` = our ``forward_features``). Absolute position embeddings and cls pooling
  only (HF's ViT has neither a relative position bias nor ``fc_norm``); anything else is refused in one line.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
import yaml

from .errors import CheckpointError, ConfigError
from .models.describe import metadata, timm_call
from .models.vit import VisionTransformer

__all__ = ["metadata", "timm_call", "model_from_weights", "write_timm", "write_hf", "export"]


def model_from_weights(src: str | Path) -> tuple[VisionTransformer, str]:
    """Our ViT (head and pooling as in the file) holding every tensor of ``src``; returns it and its format."""
    from .eval.source import infer_geometry, vit_for_geometry
    from .models.init import load_encoder, read_weights

    w = read_weights(src)
    state = {k: v for k, v in w.encoder.items() if not k.startswith(("head.", "fc_norm."))}
    geo = infer_geometry(state, w.path)
    head = w.encoder.get("head.weight")
    model = vit_for_geometry(
        geo,
        state,
        global_pool="avg" if "fc_norm.weight" in w.encoder else "token",
        num_classes=int(head.shape[0]) if head is not None else 0,
    )
    load_encoder(model, w, keep_head=True, require_all=True)
    return model.eval(), w.format


def _atomic_save(tensors: dict[str, torch.Tensor], out: Path, meta: dict[str, str]) -> None:
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    os.replace(tmp, out)


def write_timm(model: VisionTransformer, out: str | Path, meta: dict[str, str]) -> str:
    """Write the timm layout with ``meta`` + the loading call in its header; returns the call."""
    out = Path(out)
    call = timm_call(model, out)
    _atomic_save(model.export_state_dict(model.state_dict()), out, {**meta, "timm_call": call})
    return call


def _hf_config(model: VisionTransformer, meta: dict[str, str]) -> dict:
    return {
        "architectures": ["ViTModel"],
        "model_type": "vit",
        "hidden_size": model.embed_dim,
        "num_hidden_layers": model.depth,
        "num_attention_heads": model.num_heads,
        "intermediate_size": int(model.embed_dim * model.mlp_ratio),
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-6,
        "image_size": model.img_size,
        "patch_size": model.patch_size,
        "num_channels": model.in_chans,
        "qkv_bias": model.qkv_bias,
        "mimscale": meta,
    }


def write_hf(model: VisionTransformer, out_dir: str | Path, meta: dict[str, str]) -> Path:
    """A transformers ``ViTModel`` folder (published key names: ``encoder.layer.{i}.attention.attention.query``
    ...). ConfigError for what HF's ViT cannot hold (relative positions, LayerScale, average pooling)."""
    if model.pos_embed_type == "relative" or model.layer_scale_init or model.global_pool != "token":
        raise ConfigError(
            "--format hf writes a transformers ViTModel: absolute position embeddings, no LayerScale, cls "
            f"pooling; this model has pos_embed={model.pos_embed_type}, global_pool={model.global_pool}"
            f"{', LayerScale' if model.layer_scale_init else ''}: export it with --format timm"
        )
    sd = model.state_dict()
    out: dict[str, torch.Tensor] = {
        "embeddings.cls_token": sd["cls_token"],
        "embeddings.position_embeddings": sd["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
        "layernorm.weight": sd["norm.weight"],
        "layernorm.bias": sd["norm.bias"],
    }
    names = {
        "norm1": "layernorm_before",
        "norm2": "layernorm_after",
        "attn.proj": "attention.output.dense",
        "mlp.fc1": "intermediate.dense",
        "mlp.fc2": "output.dense",
    }
    for i in range(model.depth):
        b, h = f"blocks.{i}.", f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            for ours, theirs in names.items():
                out[f"{h}{theirs}.{kind}"] = sd[f"{b}{ours}.{kind}"]
            q, k, v = sd[f"{b}attn.qkv.{kind}"].chunk(3, dim=0)
            for part, t in (("query", q), ("key", k), ("value", v)):
                out[f"{h}attention.attention.{part}.{kind}"] = t.clone()
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    _atomic_save(out, d / "model.safetensors", meta)
    (d / "config.json").write_text(json.dumps(_hf_config(model, meta), indent=2) + "\n")
    return d


def _run_info(src: Path) -> tuple[str | None, str | None]:
    """``(objective, run)`` from a run directory's config.yaml (None where unknown)."""
    cfg_path = src / "config.yaml" if src.is_dir() else None
    if cfg_path is None or not cfg_path.is_file():
        return None, str(src.name) if src.is_dir() else None
    try:
        cfg = yaml.safe_load(cfg_path.read_text()) or {}
    except yaml.YAMLError:
        cfg = {}
    obj = cfg.get("objective") or {}
    name = obj.get("name") if isinstance(obj, dict) else None
    if name is None and "finetune" in cfg:
        name = "finetune"
    return name, str(src.resolve().name)


def export(src: str | Path, out: str | Path, fmt: str = "timm", step: int | None = None) -> dict:
    """Export ``src`` to ``out`` in ``fmt``; returns what was written (``call``: the timm line)."""
    from . import checkpoint

    src = Path(src).expanduser()
    if not src.exists():
        raise CheckpointError(f"{src} does not exist (pass a run directory or a weights file)")
    objective, run = _run_info(src)
    got_step = step
    ckpts = src / checkpoint.CKPT_DIR
    if src.is_dir() and ckpts.is_dir() and (step is not None or not (src / "model.safetensors").is_file()):
        parent = Path(out).expanduser().resolve().parent
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=parent) as tmp:
            info = checkpoint.export(src, Path(tmp) / "encoder.safetensors", step)
            model, _ = model_from_weights(Path(tmp) / "encoder.safetensors")
            got_step, source = info["step"], info["checkpoint"]
            objective = objective or info.get("objective")
    else:
        model, _ = model_from_weights(src)
        source = str(src)
    meta = metadata(model, objective, run, got_step)
    if fmt == "hf":
        where = write_hf(model, out, meta)
        call = f"transformers.ViTModel.from_pretrained({str(where)!r})"
    elif fmt == "timm":
        call = write_timm(model, out, meta)
    else:
        raise ConfigError(f"--format must be timm or hf, got {fmt!r}")
    tensors = sum(1 for _ in model.state_dict())
    return {"out": str(out), "format": fmt, "call": call, "tensors": tensors, "source": source, **meta}
