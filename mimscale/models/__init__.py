"""Encoder models: a timm-compatible ViT and fixed sin-cos position embeddings."""

from .pos_embed import sincos_2d, sincos_from_coords
from .vit import ARCHS, VisionTransformer, build_vit, timm_kwargs, timm_model_name

__all__ = [
    "ARCHS",
    "VisionTransformer",
    "build_vit",
    "sincos_2d",
    "sincos_from_coords",
    "timm_kwargs",
    "timm_model_name",
]
