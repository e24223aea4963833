"""Engine overhead: our DeepSpeed engine (ZeRO-0, 1 rank, fp32) vs a plain PyTorch AdamW loop.

Both contenders train the *same* MAE model (one initialisation, deep-copied) on the *same* fixed batch
(images + masks made once, so data loading is excluded) with the same AdamW hyper-parameters and
parameter groups (``mimscale.engine.deepspeed.param_groups``):

  plain   ``opt.zero_grad(); loss = objective(batch).loss; loss.backward(); opt.step()``
          with ``torch.optim.AdamW``
  engine  ``out = engine(batch); engine.backward(out.loss); engine.step()`` on the engine built by
          ``mimscale.engine.deepspeed.initialize`` from the ``tiny_cpu`` recipe with
          ``train.zero_stage=0 train.precision=fp32`` (DeepSpeed's ``torch_adam`` = torch AdamW)

Both call ``set_hparams``-style lr / weight-decay writes every step, as the train loop does.
Timing is interleaved: each repeat runs a block of ``--steps`` steps of each contender, the order
alternating between repeats (ABBA), and the reported figure is the median over repeats of
``engine step time / plain step time`` (target <= 1.10). Absolute steps/s are printed for context
only: on a shared machine they move with the load, the per-repeat ratio much less so.

After the run both copies have taken the same number of identical steps, so their weights must agree
up to float reordering; the max abs difference is printed as a sanity check.

Run:   python benchmarks/engine_overhead.py                      (vit_micro 32 px, B=128: ~1 min)
       python benchmarks/engine_overhead.py --arch vit_tiny --img 64 --patch 8 --batch 64
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


from common import write_results  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--arch", default="vit_micro", help="encoder arch from mimscale.models.vit.ARCHS (default: %(default)s)"
    )
    ap.add_argument("--img", type=int, default=32, help="image side (default: %(default)s)")
    ap.add_argument("--patch", type=int, default=4, help="patch side (default: %(default)s)")
    ap.add_argument("--batch", type=int, default=128, help="micro-batch = global batch (default: %(default)s)")
    ap.add_argument("--decoder-dim", type=int, default=64, help="default: %(default)s")
    ap.add_argument("--decoder-depth", type=int, default=2, help="default: %(default)s")
    ap.add_argument("--decoder-heads", type=int, default=4, help="default: %(default)s")
    ap.add_argument("--steps", type=int, default=8, help="steps per timed block (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=15, help="interleaved blocks per contender (default: %(default)s)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per contender first (default: %(default)s)")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch/OpenMP threads (default: %(default)s; on a shared, loaded 2-core box 2 threads "
        "spin against other jobs and run ~10x slower and far noisier)",
    )
    ap.add_argument("--no-save", action="store_true", help="do not write benchmarks/results/*.json")
    args = ap.parse_args()

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    from mimscale import config as C
    from mimscale import dist
    from mimscale.engine import deepspeed as ds
    from mimscale.masking import random_masks
    from mimscale.models.vit import build_vit
    from mimscale.objectives.mae import MAE

    d = dist.detect()
    if d.world_size != 1:
        print("engine_overhead.py measures 1 rank; run it without a launcher", file=sys.stderr)
        return 2
    dist.export(d)  # RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=<free>
    dist.bind_device(d)  # this rank's GPU current before DeepSpeed starts (one GPU per task too)
    threads = args.threads
    torch.set_num_threads(threads)

    cfg = C.load(
        "tiny_cpu",
        [
            f"model.arch={args.arch}",
            f"model.img_size={args.img}",
            f"model.patch_size={args.patch}",
            "train.zero_stage=0",
            "train.precision=fp32",
            "optim.clip_grad=0.0",
            f"train.batch_size={args.batch}",
            f"train.micro_batch_size={args.batch}",
            f"objective.decoder_dim={args.decoder_dim}",
            f"objective.decoder_depth={args.decoder_depth}",
            f"objective.decoder_heads={args.decoder_heads}",
            "log.wandb=disabled",
        ],
    )
    derived = C.derive(cfg, 1, samples_per_epoch=args.batch * 1000)
    knobs = C.objective_knobs(cfg)

    torch.manual_seed(0)
    encoder = build_vit(args.arch, args.img, args.patch)
    objective = MAE(encoder, knobs)
    plain = copy.deepcopy(objective)  # same initial weights, independent copy
    n_params = sum(p.numel() for p in objective.parameters() if p.requires_grad)

    t0 = time.perf_counter()
    engine = ds.initialize(objective, cfg, derived, dist.accelerator_name())
    init_s = time.perf_counter() - t0
    o = cfg.optim
    opt = torch.optim.AdamW(
        ds.param_groups(plain, plain.no_weight_decay(), o.weight_decay), lr=derived.lr, betas=tuple(o.betas), eps=o.eps
    )
    engine_opt = f"{type(engine.optimizer).__module__}.{type(engine.optimizer).__name__}"

    g = torch.Generator().manual_seed(0)
    n = encoder.num_patches
    batch = {
        "image": torch.randn(args.batch, 3, args.img, args.img, generator=g),
        "mask": random_masks(args.batch, n, knobs.mask_ratio, g),
    }
    lr, wd = derived.lr, o.weight_decay
    engine.train()
    plain.train()

    def step_plain() -> float:
        for grp in opt.param_groups:
            grp["lr"], grp["weight_decay"] = lr, wd * grp.get("wd_scale", 1.0)
        opt.zero_grad(set_to_none=True)
        loss = plain(batch).loss
        loss.backward()
        opt.step()
        return float(loss.detach())

    def step_engine() -> float:
        ds.set_hparams(engine, lr, wd)
        out = engine(batch)
        engine.backward(out.loss)
        engine.step()
        return float(out.loss.detach())

    contenders = {"plain": step_plain, "engine": step_engine}
    for _ in range(args.warmup):
        for fn in contenders.values():
            fn()

    times: dict[str, list[float]] = {k: [] for k in contenders}
    for r in range(args.repeats):
        order = list(contenders) if r % 2 == 0 else list(reversed(contenders))
        for name in order:
            t = time.perf_counter()
            for _ in range(args.steps):
                contenders[name]()
            times[name].append((time.perf_counter() - t) / args.steps)
    ratios = [e / p for e, p in zip(times["engine"], times["plain"])]
    ratio = statistics.median(ratios)

    with torch.no_grad():
        diff = max((a - b).abs().max().item() for a, b in zip(plain.parameters(), engine.module.parameters()))
    final_loss = {"plain": step_plain(), "engine": step_engine()}

    sps = {k: 1.0 / statistics.median(v) for k, v in times.items()}
    print(
        f"\nMAE {args.arch} img {args.img} patch {args.patch} batch {args.batch}, {n_params / 1e6:.2f} M params, "
        f"fp32, {threads} threads; {args.repeats} interleaved repeats x {args.steps} steps"
    )
    print(f"{'contender':<10} {'steps/s (median)':>17} {'img/s':>9} {'ms/step':>9}")
    for k in ("plain", "engine"):
        print(f"{k:<10} {sps[k]:>17.2f} {sps[k] * args.batch:>9.0f} {1000 / sps[k]:>9.1f}")
    q = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [ratio, ratio, ratio]
    verdict = "OK" if ratio <= 1.10 else "MISSED"
    print(f"ratio engine/plain step time: median {ratio:.3f} (IQR {q[0]:.3f}-{q[2]:.3f}; target <= 1.10: {verdict})")
    print(
        f"sanity: max |w_plain - w_engine| after identical steps = {diff:.2e}; "
        f"final loss plain {final_loss['plain']:.5f} engine {final_loss['engine']:.5f}; "
        f"deepspeed.initialize took {init_s:.1f} s (not timed above); engine optimizer {engine_opt}"
    )

    if not args.no_save:
        out = write_results(
            "engine_overhead",
            {
                "config": {
                    **vars(args),
                    "threads": threads,
                    "params": n_params,
                    "zero_stage": 0,
                    "precision": "fp32",
                    "world_size": 1,
                    "optimizer": "torch AdamW",
                    "engine_optimizer": engine_opt,
                },
                "steps_per_s_median": sps,
                "step_time_s": times,
                "ratios_engine_over_plain": ratios,
                "ratio_engine_over_plain": ratio,
                "target": "<= 1.10",
                "met": ratio <= 1.10,
                "max_abs_weight_diff": diff,
                "deepspeed_init_s": init_s,
                "caveat": "shared, noisy 2-core machine: only the interleaved ratio is meaningful",
            },
        )
        print(f"wrote {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
