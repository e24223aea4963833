"""Streaming data: WebDataset shard writers, transforms and the resumable ShardLoader.

Names are imported on first use, so that ``mimscale`` subcommands that only parse arguments (or check a
config before a SLURM launch) do not pay for importing torch.
"""

from importlib import import_module

_WHERE = {
    "ShardLoader": "loader",
    "default_collate": "streams",
    "expand_source": "sources",
    "iter_tar_samples": "tario",
    "FASHION_MNIST_CLASSES": "shards",
    "FASHION_MNIST_DIR": "shards",
    "IMAGE_EXTENSIONS": "shards",
    "MANIFEST_FORMAT": "shards",
    "MANIFEST_NAME": "shards",
    "is_complete": "shards",
    "read_idx": "shards",
    "read_manifest": "shards",
    "shard_name": "shards",
    "write_fashion_mnist": "shards",
    "write_gray_split": "shards",
    "MNIST_CLASSES": "mnist",
    "write_mnist": "mnist",
    "write_folder": "shards",
    "write_manifest": "shards",
    "write_shard": "shards",
    "IMAGENET_MEAN": "transforms",
    "IMAGENET_STD": "transforms",
    "EvalTransform": "transforms",
    "TrainTransform": "transforms",
    "rrc_params": "transforms",
    "MultiCrop": "transforms",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
