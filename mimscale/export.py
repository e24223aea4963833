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
  only (HF's ViT has neither a relative position bias nor ``fc_norm``); anything else is refused in one line;
* ``hf-mae``: the whole MAE (encoder AND pixel decoder) as a Hugging Face ``ViTMAEForPreTraining`` folder, for
  MAE and EMAE runs (their decoder is written beside the encoder, ``decoder.safetensors``), an official MAE
  pre-training checkpoint or a ``ViTMAEForPreTraining`` folder. Given the same image and the same mask
  (transformers draws it from ``noise``: the ``1 - mask_ratio`` lowest-noise patches stay visible) its
  ``logits`` are our decoder's predictions and its ``loss`` our MSE (``norm_pix_loss``, mask ratio and the
  decoder's width, depth and heads go into ``config.json``). MAE+ and AdPE are refused: their encoder runs on
  all tokens with mask tokens in it and their decoder inserts none, while ``ViTMAEForPreTraining`` drops the
  hidden patches before the encoder and inserts mask tokens in the decoder, so the same weights cannot give
  the same outputs there.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from .errors import CheckpointError, ConfigError
from .models.describe import metadata, timm_call
from .models.init import Weights
from .models.vit import VisionTransformer

__all__ = ["metadata", "timm_call", "model_from_weights", "write_timm", "write_hf", "write_hf_mae", "export"]

FORMATS = ("timm", "hf", "hf-mae")
#: pre-training objectives whose pixel decoder cannot be a ViTMAEForPreTraining decoder, and why (one line)
_NOT_VITMAE = (
    "its encoder runs on all tokens with mask tokens in place and its decoder inserts none, while transformers' "
    "ViTMAEForPreTraining drops the hidden patches before the encoder and inserts mask tokens in the decoder "
    "(the same weights cannot give the same outputs)"
)


def model_from_weights(src: str | Path) -> tuple[VisionTransformer, str]:
    """Our ViT (head and pooling as in the file) holding every tensor of ``src``; returns it and its format."""
    model, w = _load(src)
    return model, w.format


def _load(src: str | Path) -> tuple[VisionTransformer, Weights]:
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
    return model.eval(), w


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


_HF_LAYER = {
    "norm1": "layernorm_before",
    "norm2": "layernorm_after",
    "attn.proj": "attention.output.dense",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}


def _hf_layers(sd: dict[str, torch.Tensor], depth: int, ours: str, theirs: str) -> dict[str, torch.Tensor]:
    """Our blocks ``{ours}{i}.*`` in the published transformers ViT layer names ``{theirs}{i}.*`` (the fused
    ``qkv`` split into ``attention.attention.query/key/value``)."""
    out: dict[str, torch.Tensor] = {}
    for i in range(depth):
        b, h = f"{ours}{i}.", f"{theirs}{i}."
        for kind in ("weight", "bias"):
            for o, t in _HF_LAYER.items():
                out[f"{h}{t}.{kind}"] = sd[f"{b}{o}.{kind}"]
            qkv = sd.get(f"{b}attn.qkv.{kind}")
            if qkv is None:  # qkv_bias=False
                continue
            for part, piece in zip(("query", "key", "value"), qkv.chunk(3, dim=0)):
                out[f"{h}attention.attention.{part}.{kind}"] = piece.clone()
    return out


def _hf_encoder(model: VisionTransformer, prefix: str) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    out = {
        f"{prefix}embeddings.cls_token": sd["cls_token"],
        f"{prefix}embeddings.position_embeddings": sd["pos_embed"],
        f"{prefix}embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        f"{prefix}embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
        f"{prefix}layernorm.weight": sd["norm.weight"],
        f"{prefix}layernorm.bias": sd["norm.bias"],
    }
    out.update(_hf_layers(sd, model.depth, "blocks.", f"{prefix}encoder.layer."))
    return out


def _write_hf_folder(tensors: dict[str, torch.Tensor], config: dict, out_dir: str | Path, meta: dict[str, str]) -> Path:
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    _atomic_save(tensors, d / "model.safetensors", meta)
    (d / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return d


def write_hf(model: VisionTransformer, out_dir: str | Path, meta: dict[str, str]) -> Path:
    """A transformers ``ViTModel`` folder (published key names: ``encoder.layer.{i}.attention.attention.query``
    ...). ConfigError for what HF's ViT cannot hold (relative positions, LayerScale, average pooling)."""
    if model.pos_embed_type == "relative" or model.layer_scale_init or model.global_pool != "token":
        raise ConfigError(
            "--format hf writes a transformers ViTModel: absolute position embeddings, no LayerScale, cls "
            f"pooling; this model has pos_embed={model.pos_embed_type}, global_pool={model.global_pool}"
            f"{', LayerScale' if model.layer_scale_init else ''}: export it with --format timm"
        )
    return _write_hf_folder(_hf_encoder(model, ""), _hf_config(model, meta), out_dir, meta)


def write_hf_mae(
    model: VisionTransformer,
    decoder: nn.Module,
    out_dir: str | Path,
    meta: dict[str, str],
    mask_ratio: float,
    norm_pix_loss: bool,
) -> Path:
    """A transformers ``ViTMAEForPreTraining`` folder: ``model`` as ``vit.*`` and ``decoder`` (a
    :class:`~mimscale.objectives.mae.MAEDecoder` on ``model``'s grid) as ``decoder.*``, both tables (the
    encoder's and the decoder's sin-cos ``pos_embed``, our column-first layout = transformers' released
    layout) included, published key names. ConfigError for an encoder ViTMAE cannot hold (relative
    positions, LayerScale, average pooling without the final norm, no qkv bias: HF's decoder takes the
    encoder's)."""
    from .objectives.mae import MAEDecoder

    assert isinstance(decoder, MAEDecoder)
    if (
        model.pos_embed_type == "relative"
        or model.layer_scale_init
        or model.global_pool != "token"
        or not model.qkv_bias
    ):
        raise ConfigError(
            "--format hf-mae writes a transformers ViTMAEForPreTraining: absolute position embeddings, no "
            "LayerScale, cls pooling, qkv bias; this encoder has "
            f"pos_embed={model.pos_embed_type}, global_pool={model.global_pool}, qkv_bias={model.qkv_bias}"
            f"{', LayerScale' if model.layer_scale_init else ''}: export the encoder with --format timm"
        )
    tensors = _hf_encoder(model, "vit.")
    sd = decoder.state_dict()
    tensors.update(
        {
            "decoder.decoder_embed.weight": sd["embed.weight"],
            "decoder.decoder_embed.bias": sd["embed.bias"],
            "decoder.mask_token": sd["mask_token"],
            "decoder.decoder_pos_embed": decoder.pos_embed,
            "decoder.decoder_norm.weight": sd["norm.weight"],
            "decoder.decoder_norm.bias": sd["norm.bias"],
            "decoder.decoder_pred.weight": sd["pred.weight"],
            "decoder.decoder_pred.bias": sd["pred.bias"],
        }
    )
    tensors.update(_hf_layers(sd, len(decoder.blocks), "blocks.", "decoder.decoder_layers."))
    config = {
        **_hf_config(model, meta),
        "architectures": ["ViTMAEForPreTraining"],
        "model_type": "vit_mae",
        "decoder_hidden_size": decoder.dim,
        "decoder_num_hidden_layers": len(decoder.blocks),
        "decoder_num_attention_heads": decoder.heads,
        "decoder_intermediate_size": 4 * decoder.dim,
        "mask_ratio": mask_ratio,
        "norm_pix_loss": norm_pix_loss,
    }
    return _write_hf_folder(tensors, config, out_dir, meta)


def _mae_parts(
    model: VisionTransformer, w: Weights, objective: str | None, source: str
) -> tuple[nn.Module, float, bool]:
    """The pixel decoder of ``w`` as our MAEDecoder on ``model``'s grid, with the mask ratio and norm-pix flag
    for the HF config (the decoder file's header; a ViTMAE folder's config.json; MAE's released defaults for
    an official checkpoint). CheckpointError / ConfigError in one line when there is no such decoder."""
    from .objectives.mae import MAEDecoder

    if objective in ("mae_plus", "adpe"):
        raise ConfigError(f"--format hf-mae: {objective} cannot be a ViTMAEForPreTraining: {_NOT_VITMAE}")
    if not w.decoder:
        if objective in ("mae", "emae"):
            what = f"{source} has no decoder.safetensors beside its encoder (saved by an older mimscale?)"
        elif objective:
            what = f"a {objective} run has no MAE pixel decoder"
        else:
            what = f"{source} holds no MAE pixel decoder"
        raise ConfigError(
            f"--format hf-mae takes an MAE / EMAE run, an official MAE pre-training checkpoint or a "
            f"ViTMAEForPreTraining folder; {what}: export the encoder with --format hf or timm"
        )
    knobs: dict[str, Any] = dict(w.decoder_metadata)
    hf_cfg = w.path.parent / "config.json"
    if not knobs and w.format == "hf" and hf_cfg.is_file():
        c = json.loads(hf_cfg.read_text())
        knobs = {
            "decoder_heads": c.get("decoder_num_attention_heads"),
            "mask_ratio": c.get("mask_ratio", 0.75),
            "norm_pix_loss": c.get("norm_pix_loss", False),
        }
    elif not knobs and w.format == "mae":  # the official checkpoints: 16 decoder heads, 75 % masked, norm-pix
        knobs = {"decoder_heads": 16, "mask_ratio": 0.75, "norm_pix_loss": True}
    if not knobs.get("decoder_heads"):
        raise CheckpointError(f"{source}: the decoder's head count is not recorded (no decoder header)")
    dec = w.decoder
    emb, pred = dec.get("embed.weight"), dec.get("pred.weight")
    depth = len({k.split(".")[1] for k in dec if k.startswith("blocks.")})
    if emb is None or pred is None:
        raise CheckpointError(f"{source}: the decoder lacks embed / pred weights")
    try:
        decoder = MAEDecoder(
            model.embed_dim, model.num_patches, pred.shape[0], emb.shape[0], depth, int(knobs["decoder_heads"])
        )
        decoder.load_state_dict({k: v for k, v in dec.items() if k != "pos_embed"}, strict=True)
    except (RuntimeError, ValueError) as e:
        first = (str(e).strip().splitlines() or ["?"])[0][:200]
        raise CheckpointError(f"{source}: the decoder does not fit an MAE decoder on this encoder ({first})") from None
    norm_pix = str(knobs.get("norm_pix_loss")).lower() in ("true", "1")
    return decoder.eval(), float(knobs["mask_ratio"]), norm_pix


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
    """Export ``src`` to ``out`` in ``fmt``; returns what was written (``call``: the loading line)."""
    from . import checkpoint
    from .models.init import DECODER_FILE

    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    src = Path(src).expanduser()
    if not src.exists():
        raise CheckpointError(f"{src} does not exist (pass a run directory or a weights file)")
    objective, run = _run_info(src)
    if fmt == "hf-mae" and objective in ("mae_plus", "adpe"):
        raise ConfigError(f"--format hf-mae: {objective} cannot be a ViTMAEForPreTraining: {_NOT_VITMAE}")
    got_step = step
    ckpts = src / checkpoint.CKPT_DIR
    if src.is_dir() and ckpts.is_dir() and (step is not None or not (src / "model.safetensors").is_file()):
        parent = Path(out).expanduser().resolve().parent
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=parent) as tmp:
            info = checkpoint.export(src, Path(tmp) / "encoder.safetensors", step)
            if (Path(info["checkpoint"]) / DECODER_FILE).is_file():  # the checkpoint's MAE decoder comes along
                shutil.copyfile(Path(info["checkpoint"]) / DECODER_FILE, Path(tmp) / DECODER_FILE)
            model, w = _load(Path(tmp) / "encoder.safetensors")
            got_step, source = info["step"], info["checkpoint"]
            objective = objective or info.get("objective")
    else:
        model, w = _load(src)
        source = str(src)
    objective = objective or w.decoder_metadata.get("objective") or None
    meta = metadata(model, objective, run, got_step)
    tensors = sum(1 for _ in model.state_dict())
    if fmt == "hf":
        where = write_hf(model, out, meta)
        call = f"transformers.ViTModel.from_pretrained({str(where)!r})"
    elif fmt == "hf-mae":
        decoder, mask_ratio, norm_pix = _mae_parts(model, w, objective, source)
        where = write_hf_mae(model, decoder, out, meta, mask_ratio, norm_pix)
        call = f"transformers.ViTMAEForPreTraining.from_pretrained({str(where)!r})"
        tensors += sum(1 for _ in decoder.state_dict())
    else:
        call = write_timm(model, out, meta)
    return {"out": str(out), "format": fmt, "call": call, "tensors": tensors, "source": source, **meta}
