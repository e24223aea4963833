"""What the loop builds from the config besides the engine: the epoch size and the kNN evaluator."""
from __future__ import annotations

from pathlib import Path

from .. import config as C
from .. import dist
from ..data import builtin
from ..data.loader import ShardLoader, expand_source
from ..data.shards import read_manifest
from ..data.transforms import EvalTransform
from ..errors import DataError
from ..eval.knn import KNNEvaluator


def count_samples(source: str, override: int | None) -> int:
    """Epoch size: ``data.samples_per_epoch``, else the manifest counts of exactly the listed shards."""
    if override:
        return override
    urls, manifest = expand_source(source)
    local = [u for u in urls if not u.startswith("pipe:")]
    if manifest is None and local:
        manifest = str(Path(local[0]).parent)
    if manifest is None:
        raise DataError(f"cannot size an epoch of '{source}' without a manifest: set data.samples_per_epoch")
    counts = {s["name"]: int(s["count"]) for s in read_manifest(manifest)["shards"]}
    missing = [u for u in urls if Path(u.split()[-1]).name not in counts]
    if missing:
        raise DataError(f"{missing[0]} is not listed in {manifest}: set data.samples_per_epoch")
    return sum(counts[Path(u.split()[-1]).name] for u in urls)


def build_knn(cfg: C.Config, d: dist.DistEnv) -> KNNEvaluator | None:
    """kNN evaluator over two labelled shard directories (bank and queries), each optionally capped."""
    e = cfg.eval
    if not e.knn_train:
        return None
    tf = EvalTransform(e.img_size or cfg.model.img_size, mean=cfg.data.mean, std=cfg.data.std,
                       in_chans=cfg.model.in_chans)
    loaders = []
    for src, cap in ((e.knn_train, e.knn_train_samples), (e.knn_test, e.knn_test_samples)):
        src = builtin.resolve(src, cfg.data.root)
        loaders.append(ShardLoader(_first_shards(src, cap), manifest=src, batch_size=e.batch_size, transform=tf,
                                   rank=d.rank, world_size=d.world_size, num_workers=e.num_workers,
                                   mode="eval", shuffle=False))
    return KNNEvaluator(*loaders, k=e.knn_k, temperature=e.knn_temperature, pool=e.pool)


def _first_shards(source: str, cap: int | None) -> list[str]:
    """The shards of a shard directory, or its first whole shards covering ``cap`` samples."""
    shards, n = [], 0
    for s in read_manifest(source)["shards"]:
        if cap and n >= cap:
            break
        shards.append(str(Path(source) / s["name"]))
        n += int(s["count"])
    return shards
