"""Starting from released weights (``model.init=PATH``): read, recognise, rename, resample, load.

Formats read (safetensors, or ``.pth`` / ``.bin`` through ``torch.load(weights_only=True)``; a ``.pth``
may wrap its tensors in ``model`` / ``state_dict`` / ``module``):

* ``mimscale`` / ``timm``: timm ``VisionTransformer`` key names (``patch_embed.proj.weight``,
  ``blocks.{i}.attn.qkv.weight``, ``pos_embed``, optional ``fc_norm`` / ``head``) — our exports, a run
  directory's ``encoder.safetensors`` (with the MAE decoder beside it, :data:`DECODER_FILE`), a checkpoint
  folder, any timm ViT state dict;
* ``beit``: timm's ``Beit`` (per-block ``attn.relative_position_bias_table``, ``q_bias`` / ``v_bias``,
  ``gamma_1`` / ``gamma_2``) or BEiT's own shared ``rel_pos_bias.relative_position_bias_table``;
* ``mae``: the official MAE pre-training checkpoint (``{"model": ...}``): the encoder in timm names plus
  ``decoder_embed``, ``mask_token``, ``decoder_pos_embed``, ``decoder_blocks.{i}``, ``decoder_norm``,
  ``decoder_pred``;
* ``hf``: Hugging Face ``ViTModel`` / ``ViTForImageClassification`` / ``ViTMAEForPreTraining`` (the
  published ``encoder.layer.{i}.attention.attention.query`` names and transformers 5's
  ``layers.{i}.attention.q_proj`` names; separate q/k/v become the fused ``qkv``).

Everything is renamed to one canonical layout: the encoder in timm names (BEiT layout for relative
position tables, i.e. what :meth:`VisionTransformer.export_state_dict` writes) and a pixel decoder in our
:class:`~mimscale.objectives.mae.MAEDecoder` names (``embed``, ``mask_token``, ``blocks.{i}``, ``norm``,
``pred``). :func:`load_encoder` / :func:`load_decoder` then copy tensor by tensor with shape checks;
a different patch grid resamples the position embeddings (learned: bicubic as timm; sin-cos: regenerated;
relative tables: as BEiT and timm's Beit resize them, each head's ``(2G-1)^2`` offset grid on
geometrically spaced positions sampled bilinearly, cls rows kept). Each group logs one summary line;
a file whose width/depth/patch size do not fit, or that matches nothing, is refused in one line.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import CheckpointError
from .pos_embed import resample_abs_pos_embed, resample_rel_pos_table, sincos_2d

log = logging.getLogger("mimscale.init")

__all__ = [
    "DECODER_FILE",
    "Weights",
    "read_tensors",
    "read_weights",
    "convert",
    "load_encoder",
    "load_decoder",
    "init_module",
]

_REL = "relative_position_bias_table"

#: a run's MAE pixel decoder (MAE, EMAE) in :class:`~mimscale.objectives.mae.MAEDecoder` names, written beside
#: ``encoder.safetensors`` at every checkpoint and at the end; read with it (``model.init=RUN_DIR`` continues
#: encoder AND decoder; ``mimscale export --format hf-mae``)
DECODER_FILE = "decoder.safetensors"


@dataclass
class Weights:
    """A file's tensors in the canonical layout. ``encoder``: timm names (``head`` / ``fc_norm`` included
    when present); ``decoder``: MAEDecoder names (empty when the file has no pixel decoder)."""

    format: str
    path: Path
    encoder: dict[str, Tensor]
    decoder: dict[str, Tensor] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)  # file keys that belong to neither
    metadata: dict[str, str] = field(default_factory=dict)
    decoder_metadata: dict[str, str] = field(default_factory=dict)  # the header of a run's DECODER_FILE


# --------------------------------------------------------------------------- reading


def _locate(path: Path) -> Path:
    """The weights file behind ``path``: a file, a run directory (``encoder.safetensors``), a checkpoint
    folder, a run's newest checkpoint, or a Hugging Face folder (``model.safetensors``)."""
    if path.is_file():
        return path
    if path.is_dir():
        for name in ("encoder.safetensors", "model.safetensors", "pytorch_model.bin"):
            if (path / name).is_file():
                return path / name
        ckpts = path / "checkpoints"  # a run's checkpoints (mimscale/checkpoint.py's layout): `latest`, then newest
        if ckpts.is_dir():
            latest = ckpts / "latest"
            tags = [latest.read_text().strip()] if latest.is_file() else []
            tags += sorted((p.name for p in ckpts.glob("step_*")), reverse=True)
            for tag in tags:
                if (ckpts / tag / "encoder.safetensors").is_file():
                    return ckpts / tag / "encoder.safetensors"
        raise CheckpointError(f"{path}: a directory without encoder.safetensors, model.safetensors or checkpoints/")
    raise CheckpointError(f"init weights not found: {path}")


def read_tensors(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str], Path]:
    """``(tensors, safetensors metadata, file)`` of ``path``; pickles only through ``weights_only=True``."""
    f = _locate(Path(path).expanduser())
    meta: dict[str, str] = {}
    try:
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(f), framework="pt") as h:
                meta = dict(h.metadata() or {})
                state = {k: h.get_tensor(k) for k in h.keys()}  # noqa: SIM118 (safe_open is not a Mapping)
        else:
            obj: Any = torch.load(f, map_location="cpu", weights_only=True)
            for key in ("model", "state_dict", "module"):
                if isinstance(obj, dict) and isinstance(obj.get(key), dict):
                    obj = obj[key]
                    break
            if not isinstance(obj, dict):
                raise CheckpointError(f"{f}: holds a {type(obj).__name__}, not a state dict")
            state = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    except CheckpointError:
        raise
    except Exception as e:  # safetensors / pickle errors have many types; one line says what failed
        first = (str(e).strip().splitlines() or ["unreadable"])[0][:200]
        raise CheckpointError(f"{f} is not a readable weights file ({type(e).__name__}: {first})") from None
    if any(k.startswith("module.") for k in state):  # DDP-wrapped
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state, meta, f


def detect(state: dict[str, Tensor]) -> str:
    """The format of a state dict's key names (see the module docstring); CheckpointError if none fits."""
    keys = set(state)
    if any(k.endswith("embeddings.patch_embeddings.projection.weight") for k in keys):
        return "hf"
    if "decoder_embed.weight" in keys or any(k.startswith("decoder_blocks.") for k in keys):
        return "mae"
    if "encoder.patch_embed.proj.weight" in keys:
        return "mimscale-module"
    if "patch_embed.proj.weight" in keys:
        if "rel_pos_bias.relative_position_bias_table" in keys or any(
            k.endswith(f"attn.{_REL}") or k.endswith("attn.q_bias") for k in keys
        ):
            return "beit"
        return "timm"
    shown = ", ".join(sorted(keys)[:4]) or "no tensors"
    raise CheckpointError(
        f"no ViT weights recognised (expected timm, BEiT, MAE or Hugging Face key names; found {shown})"
    )


_HF_LAYER = {
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "attention.output.dense": "attn.proj",
    "attention.o_proj": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_HF_QKV = {
    "attention.attention.query": 0,
    "attention.attention.key": 1,
    "attention.attention.value": 2,
    "attention.q_proj": 0,
    "attention.k_proj": 1,
    "attention.v_proj": 2,
}


def _hf_blocks(state: dict[str, Tensor], layer_re: str, out_prefix: str, used: set[str]) -> dict[str, Tensor]:
    """Transformer layers in HF names (``{layer_re}{i}.<part>.{weight,bias}``) -> ``{out_prefix}{i}.*``."""
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[int, str], list[Tensor | None]] = {}
    pat = re.compile(rf"^{layer_re}(\d+)\.(.+)\.(weight|bias)$")
    for k, v in state.items():
        m = pat.match(k)
        if not m:
            continue
        i, part, kind = int(m.group(1)), m.group(2), m.group(3)
        if part in _HF_QKV:
            qkv.setdefault((i, kind), [None, None, None])[_HF_QKV[part]] = v
        elif part in _HF_LAYER:
            out[f"{out_prefix}{i}.{_HF_LAYER[part]}.{kind}"] = v
        else:
            continue
        used.add(k)
    for (i, kind), parts in qkv.items():
        if any(p is None for p in parts):
            raise CheckpointError(f"layer {i}: query, key and value {kind} are not all present")
        out[f"{out_prefix}{i}.attn.qkv.{kind}"] = torch.cat([p for p in parts if p is not None], dim=0)
    return out


def _from_hf(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor], set[str]]:
    used: set[str] = set()
    base = next(k for k in state if k.endswith("embeddings.patch_embeddings.projection.weight"))
    p = base[: -len("embeddings.patch_embeddings.projection.weight")]  # "" or "vit."
    enc: dict[str, Tensor] = {}
    simple = {
        f"{p}embeddings.cls_token": "cls_token",
        f"{p}embeddings.position_embeddings": "pos_embed",
        f"{p}embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
        f"{p}embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
        f"{p}layernorm.weight": "norm.weight",
        f"{p}layernorm.bias": "norm.bias",
        "classifier.weight": "head.weight",
        "classifier.bias": "head.bias",
    }
    for src, dst in simple.items():
        if src in state:
            enc[dst] = state[src]
            used.add(src)
    enc.update(_hf_blocks(state, rf"{re.escape(p)}(?:encoder\.layer|layers)\.", "blocks.", used))
    dec: dict[str, Tensor] = {}
    for src, dst in {
        "decoder.decoder_embed.weight": "embed.weight",
        "decoder.decoder_embed.bias": "embed.bias",
        "decoder.mask_token": "mask_token",
        "decoder.decoder_norm.weight": "norm.weight",
        "decoder.decoder_norm.bias": "norm.bias",
        "decoder.decoder_pred.weight": "pred.weight",
        "decoder.decoder_pred.bias": "pred.bias",
    }.items():
        if src in state:
            dec[dst] = state[src]
            used.add(src)
    # published: decoder.decoder_layers.{i}; transformers 5 writes decoder.decoder_encoder.layer.{i}
    dec.update(_hf_blocks(state, r"decoder\.decoder_(?:layers|encoder\.layer)\.", "blocks.", used))
    if "decoder.decoder_pos_embed" in state:
        used.add("decoder.decoder_pos_embed")  # fixed sin-cos: regenerated by the decoder
    return enc, dec, used


def _from_mae(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor], set[str]]:
    dec: dict[str, Tensor] = {}
    used: set[str] = set()
    for k, v in state.items():
        if k == "mask_token":
            dec["mask_token"] = v
        elif k.startswith("decoder_embed."):
            dec["embed." + k.split(".", 1)[1]] = v
        elif k.startswith("decoder_blocks."):
            dec["blocks." + k.split(".", 1)[1]] = v
        elif k.startswith("decoder_norm."):
            dec["norm." + k.split(".", 1)[1]] = v
        elif k.startswith("decoder_pred."):
            dec["pred." + k.split(".", 1)[1]] = v
        elif k == "decoder_pos_embed":
            pass  # fixed sin-cos: regenerated by the decoder
        else:
            continue
        used.add(k)
    enc = {k: v for k, v in state.items() if k not in used}
    used |= set(enc)
    return enc, dec, used


def _beit_canonical(enc: dict[str, Tensor]) -> dict[str, Tensor]:
    """BEiT's shared table (``rel_pos_bias.*``) copied into every block (timm's Beit layout); index buffers
    dropped (they are rebuilt from the grid)."""
    out = {k: v for k, v in enc.items() if not k.endswith("relative_position_index")}
    shared = out.pop(f"rel_pos_bias.{_REL}", None)
    if shared is not None:
        depth = len({k.split(".")[1] for k in out if k.startswith("blocks.")})
        for i in range(depth):
            out.setdefault(f"blocks.{i}.attn.{_REL}", shared)
    return out


def convert(state: dict[str, Tensor], path: Path, metadata: dict[str, str] | None = None) -> Weights:
    """Rename a state dict of any supported format into the canonical layout."""
    try:
        fmt = detect(state)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    dec: dict[str, Tensor] = {}
    if fmt == "hf":
        enc, dec, used = _from_hf(state)
    elif fmt == "mae":
        enc, dec, used = _from_mae(state)
    elif fmt == "mimscale-module":  # a whole objective's state dict (encoder.* / decoder.*)
        enc = {k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")}
        dec = {k[len("decoder.") :]: v for k, v in state.items() if k.startswith("decoder.")}
        dec.pop("pos_embed", None)
        used = {k for k in state if k.startswith(("encoder.", "decoder."))}
    else:
        enc, used = dict(state), set(state)
    enc = _beit_canonical(enc)
    meta = dict(metadata or {})
    if fmt == "timm" and "mimscale" in meta:
        fmt = "mimscale"
    return Weights(fmt, path, enc, dec, sorted(set(state) - used), meta)


def read_weights(path: str | Path) -> Weights:
    """:func:`read_tensors` + :func:`convert`; a run's ``encoder.safetensors`` brings the :data:`DECODER_FILE`
    beside it (if any) as the decoder."""
    state, meta, f = read_tensors(path)
    w = convert(state, f, meta)
    beside = f.parent / DECODER_FILE
    if f.name == "encoder.safetensors" and beside.is_file() and not w.decoder:
        w.decoder, w.decoder_metadata, _ = read_tensors(beside)
    return w


# --------------------------------------------------------------------------- loading


def _grid(n: int) -> int:
    g = math.isqrt(n)
    return g if g * g == n else -1


def _rel_grid(rows: int) -> int:
    side = math.isqrt(rows - 3)
    return (side + 1) // 2 if side * side == rows - 3 and side % 2 == 1 else -1


@dataclass
class _Tally:
    loaded: int = 0
    resampled: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def line(self, group: str, w: Weights) -> str:
        def few(xs: list[str]) -> str:
            return f" ({', '.join(xs[:3])}{', ...' if len(xs) > 3 else ''})" if xs else ""

        return (
            f"init {group} from {w.path} ({w.format}): loaded {self.loaded}, resampled {len(self.resampled)}"
            f"{few(self.resampled)}, missing {len(self.missing)}{few(self.missing)}, unexpected-and-ignored "
            f"{len(self.ignored)}{few(self.ignored)}"
        )


def _describe(enc: dict[str, Tensor]) -> str:
    w = enc.get("patch_embed.proj.weight")
    depth = len({k.split(".")[1] for k in enc if k.startswith("blocks.")})
    if w is None:
        return f"{depth} blocks without a patch embedding"
    return f"a ViT of width {w.shape[0]} x {depth} blocks, patch {w.shape[-1]}, {w.shape[1]} channels"


@torch.no_grad()
def load_encoder(encoder: nn.Module, w: Weights, keep_head: bool = True, require_all: bool = False) -> str:
    """Copy ``w.encoder`` into ``encoder`` (a :class:`~mimscale.models.vit.VisionTransformer`) with shape checks
    and position-embedding resampling; returns the summary line. ``keep_head=False`` leaves ``head`` and
    ``fc_norm`` as initialised (fine-tuning starts a fresh head). CheckpointError (one line) when the file's
    width, depth or patch size differ, nothing matches, or (``require_all``) any tensor is missing."""
    from .vit import VisionTransformer

    assert isinstance(encoder, VisionTransformer)
    target = encoder.export_state_dict(encoder.state_dict())
    src = dict(w.encoder)
    mine = (
        f"width {encoder.embed_dim} x {encoder.depth} blocks, patch {encoder.patch_size}, {encoder.in_chans} channels"
    )
    pw, tw = src.get("patch_embed.proj.weight"), target["patch_embed.proj.weight"]
    depth = len({k.split(".")[1] for k in src if k.startswith("blocks.")})
    if pw is None or pw.shape != tw.shape or depth != encoder.depth:
        raise CheckpointError(
            f"{w.path} ({w.format}) holds {_describe(src)}; this model is {mine}: "
            "set model.arch / model.patch_size / model.in_chans to match the file"
        )
    file_rel = any(k.endswith(_REL) for k in src)
    if file_rel != (encoder.pos_embed_type == "relative"):
        want = "relative" if file_rel else "learned (or sincos)"
        raise CheckpointError(
            f"{w.path} ({w.format}) is a {'BEiT (relative position)' if file_rel else 'absolute position'} "
            f"ViT; this model has pos_embed={encoder.pos_embed_type}: set model.pos_embed={want.split()[0]}"
        )
    t = _Tally()
    new: dict[str, Tensor] = {}
    grid = encoder.grid_size
    for k, cur in target.items():
        s = src.pop(k, None)
        if not keep_head and k.startswith(("head.", "fc_norm.")):
            new[k] = cur
            if s is not None:
                t.ignored.append(k)
            continue
        if s is None:
            new[k] = cur
            t.missing.append(k)
            continue
        if k == "pos_embed":
            g0 = _grid(s.shape[1] - 1)
            if s.ndim != 3 or s.shape[-1] != cur.shape[-1] or g0 < 0:
                raise CheckpointError(f"{w.path}: pos_embed {list(s.shape)} does not fit {list(cur.shape)}")
            if encoder.pos_embed_type == "sincos":  # a fixed buffer: regenerated, never taken from a file
                new[k] = sincos_2d(encoder.embed_dim, grid).to(cur)
                fixed = g0 == grid and torch.allclose(s.float(), new[k].float(), atol=1e-5)
                if fixed:
                    t.loaded += 1
                else:
                    why = f"{g0}x{g0} -> {grid}x{grid}" if g0 != grid else "the file's is not this sin-cos table"
                    t.resampled.append(f"pos_embed: sin-cos regenerated, {why}")
                continue
            if g0 != grid:
                new[k] = resample_abs_pos_embed(s.float(), grid).to(cur)
                t.resampled.append(f"pos_embed: bicubic {g0}x{g0} -> {grid}x{grid}")
            else:
                new[k] = s.to(cur)
                t.loaded += 1
            continue
        if k.endswith(_REL) and s.shape != cur.shape:
            g0 = _rel_grid(s.shape[0])
            if g0 < 0 or s.shape[1] != cur.shape[1]:
                raise CheckpointError(f"{w.path}: {k} {list(s.shape)} does not fit {list(cur.shape)}")
            new[k] = resample_rel_pos_table(s.float(), grid).to(cur)
            if k == f"blocks.0.attn.{_REL}":
                t.resampled.append(f"relative_position_bias_table: BEiT-interpolated {g0}x{g0} -> {grid}x{grid}")
            continue
        if s.shape != cur.shape:
            if k.startswith("head."):  # another class count: a fresh head
                new[k] = cur
                t.ignored.append(f"{k} {list(s.shape)}")
                continue
            raise CheckpointError(f"{w.path}: {k} is {list(s.shape)} in the file, {list(cur.shape)} in this model")
        new[k] = s.to(cur)
        t.loaded += 1
    t.ignored += sorted(src)
    tables = [k for k in new if k.endswith(_REL)]
    if len(tables) > 1 and any(not torch.equal(new[tables[0]], new[k]) for k in tables[1:]):
        mean = torch.stack([new[k] for k in tables]).mean(0)  # this encoder shares one table across blocks
        for k in tables:
            new[k] = mean
        t.resampled.append("per-block relative position tables averaged into the shared one")
    if t.loaded == 0:
        raise CheckpointError(f"{w.path}: no tensor of the file fits this encoder ({mine})")
    if require_all and t.missing:
        raise CheckpointError(f"{w.path} ({w.format}) lacks {', '.join(t.missing[:3])} of this encoder")
    encoder.load_state_dict(new, strict=True)
    line = t.line("encoder", w)
    log.info(line)
    return line


@torch.no_grad()
def load_decoder(decoder: nn.Module | None, w: Weights) -> str | None:
    """Copy ``w.decoder`` into a pixel decoder (``embed``, ``mask_token``, ``blocks``, ``norm``, ``pred``,
    sin-cos ``pos_embed`` regenerated). None when the file has no decoder; a line saying it is ignored when
    the objective has none; CheckpointError when both exist and their shapes differ."""
    if not w.decoder:
        return None
    if decoder is None or not hasattr(decoder, "pred"):
        line = f"init decoder from {w.path} ({w.format}): ignored ({len(w.decoder)} tensors; this objective has no pixel decoder)"
        log.info(line)
        return line
    target = {k: v for k, v in decoder.state_dict().items() if k != "pos_embed"}
    src = dict(w.decoder)
    t = _Tally()
    for k, cur in target.items():
        s = src.pop(k, None)
        if s is None:
            t.missing.append(k)
        elif s.shape != cur.shape:
            d_file = w.decoder.get("embed.weight")
            depth = len({k.split(".")[1] for k in w.decoder if k.startswith("blocks.")})
            raise CheckpointError(
                f"{w.path}: decoder {k} is {list(s.shape)} in the file, {list(cur.shape)} here (the file's decoder is "
                f"{d_file.shape[0] if d_file is not None else '?'} wide x {depth} blocks): set objective.decoder_dim / "
                "decoder_depth / decoder_heads to match"
            )
        else:
            cur.copy_(s.to(cur))
            t.loaded += 1
    t.ignored = sorted(src)
    if t.missing and t.loaded:
        raise CheckpointError(f"{w.path}: the file's decoder lacks {t.missing[0]} (depth differs?)")
    line = t.line("decoder", w)
    log.info(line)
    return line


def init_module(module: nn.Module, path: str | Path) -> list[str]:
    """``model.init``: load ``path`` into ``module`` (an objective with ``.encoder`` and maybe ``.decoder``,
    or a bare encoder). Returns the summary lines (also logged)."""
    w = read_weights(path)
    encoder = getattr(module, "encoder", module)
    lines = [load_encoder(encoder, w)]
    dec = load_decoder(getattr(module, "decoder", None), w)
    if dec:
        lines.append(dec)
    return lines
