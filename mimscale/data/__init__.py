"""Streaming data: WebDataset shard writers, transforms and the resumable ShardLoader."""

from .loader import ShardLoader, default_collate, expand_source, iter_tar_samples
from .shards import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    IMAGE_EXTENSIONS,
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    is_complete,
    read_idx,
    read_manifest,
    shard_name,
    write_fashion_mnist,
    write_folder,
    write_manifest,
    write_shard,
)
from .transforms import IMAGENET_MEAN, IMAGENET_STD, EvalTransform, TrainTransform, rrc_params

__all__ = [
    "ShardLoader", "default_collate", "expand_source", "iter_tar_samples",
    "FASHION_MNIST_CLASSES", "FASHION_MNIST_DIR", "IMAGE_EXTENSIONS", "MANIFEST_FORMAT", "MANIFEST_NAME",
    "is_complete", "read_idx", "read_manifest", "shard_name", "write_fashion_mnist", "write_folder",
    "write_manifest", "write_shard",
    "IMAGENET_MEAN", "IMAGENET_STD", "EvalTransform", "TrainTransform", "rrc_params",
]
