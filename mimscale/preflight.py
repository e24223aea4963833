"""``mimscale check-config RECIPE [key=value ...] [--world-size N]``: fail before the launch, not after it.

The SLURM templates run this once in the batch shell, before ``srun`` starts any rank, so that a bad
argument (unknown key, wrong type, missing recipe, missing shards, a batch size the world size does not
divide, a key given twice) ends the job within seconds with one clear line in its log, instead of N nodes x 8 ranks each
printing the same error (or one of them hanging in a collective). It checks what the run itself would
check at start-up, in the same order, without building a model: the config (:func:`mimscale.config.load`),
the training data (shard files exist, an epoch can be sized), the kNN shard manifests, the derived schedule
for the given world size and the DeepSpeed knobs file.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from . import config as C
from .errors import ConfigError, DataError


def check(recipe: str | None, overrides: list[str], world_size: int = 1) -> str:
    """Validate a run; returns a one-line summary, raises ConfigError/DataError with one line otherwise."""
    if world_size < 1:
        raise ConfigError(f"--world-size {world_size} must be >= 1")
    keys = [o.split("=", 1)[0] for o in overrides]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise ConfigError(f"{twice[0]} is given {keys.count(twice[0])} times (a brace pattern your shell expanded? "
                          f"quote it: '{twice[0]}=/data/train-{{000000..000099}}.tar')")
    cfg = C.load(recipe, overrides)
    from .data import builtin
    from .data.loader import expand_source
    from .data.shards import read_manifest
    from .engine import deepspeed as ds
    from .data.epoch import count_samples

    train = builtin.resolve(cfg.data.train, cfg.data.root)  # a built-in name is converted once, under a lock
    urls, _ = expand_source(train)
    local = [u for u in urls if not u.startswith("pipe:")]
    missing = [u for u in local if not Path(u).is_file()]
    if not urls or missing:
        raise DataError(f"data.train='{cfg.data.train}': {len(missing)} of {len(urls)} shards are missing"
                        + (f", e.g. {missing[0]}" if missing else ""))
    samples = count_samples(train, cfg.data.samples_per_epoch)
    for key in ("knn_train", "knn_test"):
        src = getattr(cfg.eval, key)
        if src and not builtin.is_builtin(src):
            read_manifest(src)
    derived = C.derive(cfg, world_size, samples)
    from .dist import accelerator_name

    ds.ds_config(cfg, derived, accelerator_name())
    return (f"config OK: {cfg.objective['name']} {cfg.model.arch}, world size {world_size}, "
            f"batch {cfg.train.batch_size} = {cfg.train.micro_batch_size} x {world_size} x {derived.grad_accum} "
            f"(accumulation), {derived.total_steps} steps, ZeRO-{cfg.train.zero_stage}, run_dir {derived.run_dir}")


def add_parser(sub) -> None:
    p = sub.add_parser("check-config", help="validate a recipe + overrides (and data) before launching a run",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("config", nargs="?", default=None, help="recipe name (see mimscale/configs) or YAML path")
    p.add_argument("overrides", nargs="*", help="key=value overrides (dotted keys)")
    p.add_argument("--world-size", type=int, default=1, help="number of ranks the run will have (default 1)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.config and "=" in args.config:  # `check-config key=value ...`: the default recipe
        args.overrides, args.config = [args.config, *args.overrides], None
    print(check(args.config, args.overrides, args.world_size), flush=True)
    return 0
