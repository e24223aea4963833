"""``mimscale check-config RECIPE [key=value ...] [--world-size N]``: fail before the launch, not after it.

The SLURM templates run this once in the batch shell, before ``srun`` starts any rank, so that a bad
argument ends the job within seconds with one clear line in its log, instead of N nodes x 8 ranks each
printing the same error (or one of them hanging in a collective) after hours in the queue. It runs every
check the launch runs before its first step, in the launch's order and in the launch's own code:

1. the config: keys, types, valid ranges, combinations (:func:`mimscale.config.load`);
2. the training data: shards exist, an epoch can be sized (``count_samples``), the schedule for the given
   world size (:func:`mimscale.config.derive`);
3. the run directory: a checkpoint there belongs to this run and can be loaded on this world size
   (:func:`mimscale.checkpoint.find`, :func:`mimscale.checkpoint.check_reshard`);
4. the model: encoder and objective are built on the ``meta`` device (shapes only, no memory, seconds for
   ViT-H), so the objective's own knob checks run (``engine.build.build_model``);
5. the DeepSpeed config: the knobs file and everything filled in from the YAML (``ds_config``);
6. rank 0's train loader, built exactly as the launch builds it (``pretrain.PretrainTask.loader``): the
   objective's cached targets/codes are in the shards' manifest with the crop rule and image size it trains on;
7. the kNN evaluator's shard manifests (``pretrain.build_knn``).
"""

from __future__ import annotations

import argparse
import logging
import warnings
from pathlib import Path

from . import config as C
from .errors import ConfigError, DataError, MimscaleError

log = logging.getLogger("mimscale.preflight")


def check(recipe: str | None, overrides: list[str], world_size: int = 1) -> str:
    """Validate a run; returns a one-line summary, raises a MimscaleError with one line otherwise."""
    if world_size < 1:
        raise ConfigError(f"--world-size {world_size} must be >= 1")
    keys = [o.split("=", 1)[0] for o in overrides]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise ConfigError(
            f"{twice[0]} is given {keys.count(twice[0])} times (a brace pattern your shell expanded? "
            f"quote it: '{twice[0]}=/data/train-{{000000..000099}}.tar')"
        )
    cfg = C.load(recipe, overrides)

    from . import checkpoint as ckpt
    from .data import builtin
    from .data.epoch import count_samples
    from .data.loader import expand_source
    from .dist import DistEnv, accelerator_name
    from .engine import deepspeed as ds
    from .engine.resume import identity
    from .pretrain import PretrainTask, build_knn

    train = builtin.resolve(cfg.data.train, cfg.data.root)  # a built-in name is converted once, under a lock
    urls, _ = expand_source(train)
    local = [u for u in urls if not u.startswith("pipe:")]
    missing = [u for u in local if not Path(u).is_file()]
    if not urls or missing:
        raise DataError(
            f"data.train='{cfg.data.train}': {len(missing)} of {len(urls)} shards are missing"
            + (f", e.g. {missing[0]}" if missing else "")
        )
    derived = C.derive(cfg, world_size, count_samples(train, cfg.data.samples_per_epoch))
    found = ckpt.find(Path(derived.run_dir), identity(cfg)) if cfg.train.resume == "auto" else None
    if found is not None:
        ckpt.check_reshard(found, world_size)
    objective = _build_meta(cfg)
    accelerator = accelerator_name()
    ds.ds_config(cfg, derived, accelerator)
    rank0 = DistEnv(
        rank=0,
        world_size=world_size,
        local_rank=0,
        local_world_size=1,
        master_addr="127.0.0.1",
        master_port=0,
        launcher="none",
    )
    PretrainTask(cfg).loader(objective, derived, rank0, accelerator)
    build_knn(cfg, rank0)
    resume = f", resumes from {found.tag}" if found is not None else ""
    return (
        f"config OK: {cfg.objective['name']} {cfg.model.arch}, world size {world_size}, "
        f"batch {cfg.train.batch_size} = {cfg.train.micro_batch_size} x {world_size} x {derived.grad_accum} "
        f"(accumulation), {derived.total_steps} steps, ZeRO-{cfg.train.zero_stage}, run_dir {derived.run_dir}"
        f"{resume}"
    )


def _build_meta(cfg: C.Config):
    """``build_model`` under the meta device (a frozen teacher's checkpoint file is read and its shapes checked,
    its values dropped). An objective whose constructor needs real tensors (e.g. DTM's random-init test teacher)
    cannot be built there: it is built for real on the CPU instead, so its checks still run."""
    from .engine.build import build_model

    try:
        with warnings.catch_warnings():  # a teacher file loads into meta tensors: a no-op
            warnings.filterwarnings("ignore", message=".*to a meta parameter in the current model.*")
            return build_model(cfg, "meta")
    except MimscaleError:
        raise
    except (NotImplementedError, RuntimeError) as e:
        log.info(
            "objective %s does not build on the meta device (%s); building it on the CPU",
            cfg.objective["name"],
            str(e).splitlines()[0][:120],
        )
    return build_model(cfg, "cpu")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "check-config",
        help="validate a recipe + overrides (and data) before launching a run",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("config", nargs="?", default=None, help="recipe name (see mimscale/configs) or YAML path")
    p.add_argument("overrides", nargs="*", help="key=value overrides (dotted keys)")
    p.add_argument("--world-size", type=int, default=1, help="number of ranks the run will have (default 1)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.config and "=" in args.config:  # `check-config key=value ...`: the default recipe
        args.overrides, args.config = [args.config, *args.overrides], None
    print(check(args.config, args.overrides, args.world_size), flush=True)
    return 0
