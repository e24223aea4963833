"""``mimscale bench ...`` (wired into mimscale.cli through add_parser/run).

Sub-commands hang off ``_COMMANDS``: ``plan`` today; ``throughput`` (measured img/s, MFU and memory
per ZeRO stage) slots in beside it. Heavy imports (torch, the models) happen in ``run``, not at
parse time, so ``mimscale --help`` stays fast.
"""
from __future__ import annotations

import argparse

BENCH_HELP = """\
Performance planning and measurement for ViT pre-training.
  plan        project per-GPU memory (ZeRO stage, activations), img/s and time per ImageNet-1k
              epoch from shapes alone: no GPU needed
Run `mimscale bench COMMAND --help` for the options of each."""

PLAN_HELP = """\
Project whether a run fits and how long it takes, from the analytic FLOPs per image
(objective.flops_per_sample()), the trainable parameter count Ψ (model built on the meta device),
ZeRO mixed-precision model states per GPU (stage 0: 16Ψ, 1: 4Ψ + 12Ψ/N, 2: 2Ψ + 14Ψ/N, 3: 16Ψ/N;
--offload moves the 12Ψ/N optimizer part to CPU), DeepSpeed buffers from mimscale/ds_configs,
activations of 16 x tokens x width x 2 B per block call per image (checkpointed blocks keep
only their input), and a 2 GB runtime overhead. Throughput = MFU x dense peak / FLOPs per image.
Prints a FIT / DOES NOT FIT line (exit code 0 either way); --json gives "fits": true|false.
  mimscale bench plan --model vit_large --patch 16 --img 224 --objective mae --gpu a100-80gb \\
      --zero 1 --micro-batch 64 --nodes 8 --gpus-per-node 8 --mfu 0.45
  mimscale bench plan --recipe emae_vit_l16 --gpu h100-80gb --nodes 4 --grad-ckpt --json"""


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="performance planning: memory / throughput projections",
                       description=BENCH_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    bsub = p.add_subparsers(dest="bench_cmd", required=True, metavar="BENCH_COMMAND")
    _add_plan(bsub)
    p.set_defaults(run=run)


def _add_plan(bsub) -> None:
    pl = bsub.add_parser("plan", help="project per-GPU memory, img/s and epoch time (no GPU needed)",
                         description=PLAN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = "default: from --recipe, else %s"
    pl.add_argument("--recipe", default=None, metavar="NAME",
                    help="take model, objective knobs, ZeRO stage, batch sizes and epochs from a recipe "
                         "(e.g. mae_vit_l16); the flags below override it")
    pl.add_argument("--model", default=None, metavar="ARCH", help="vit_tiny|vit_small|vit_base|vit_large|vit_huge")
    pl.add_argument("--patch", type=int, default=None, help=d % "16")
    pl.add_argument("--img", type=int, default=None, help=d % "224")
    pl.add_argument("--objective", default=None, help=d % "mae" + " (see `mimscale objectives`)")
    pl.add_argument("--gpu", default="a100-80gb", help="a100-40gb|a100-80gb|h100-80gb (SXM)|h100-pcie|h200 "
                                                       "(default: %(default)s)")
    pl.add_argument("--zero", type=int, default=None, metavar="STAGE", help=d % "1" + "; 0-3")
    pl.add_argument("--offload", action=argparse.BooleanOptionalAction, default=None,
                    help="ZeRO-Offload of the optimizer states to CPU (stage 1-3)")
    pl.add_argument("--micro-batch", type=int, default=None, help="images per GPU per forward; " + d % "64")
    pl.add_argument("--global-batch", type=int, default=None,
                    help="images per optimizer step; default: from --recipe, else micro-batch x GPUs")
    pl.add_argument("--nodes", type=int, default=1, help="default: %(default)s")
    pl.add_argument("--gpus-per-node", type=int, default=8, help="default: %(default)s")
    pl.add_argument("--mfu", type=float, default=None, help="assumed model FLOPs utilisation (default: 0.45)")
    pl.add_argument("--grad-ckpt", action=argparse.BooleanOptionalAction, default=None,
                    help="activation checkpointing of the encoder blocks")
    pl.add_argument("--precision", choices=("bf16", "fp16"), default=None, help=d % "bf16")
    pl.add_argument("--epochs", type=float, default=None, help="also print the whole run's time and GPU-hours")
    pl.add_argument("--overhead-gb", type=float, default=None,
                    help="CUDA context, workspaces, fragmentation per GPU (default: 2)")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON (with \"fits\") instead of text")


def run(args) -> int:
    return {"plan": _run_plan}[args.bench_cmd](args)


def _run_plan(args) -> int:
    import json

    from ..errors import ConfigError
    from . import plan as P

    fields = P.from_recipe(args.recipe) if args.recipe else {}
    if args.recipe is None and args.model is None:
        raise ConfigError("mimscale bench plan needs --model ARCH (e.g. vit_large) or --recipe NAME")
    flags = {"model": args.model, "patch": args.patch, "img": args.img, "objective": args.objective,
             "gpu": args.gpu, "zero": args.zero, "offload": args.offload, "micro_batch": args.micro_batch,
             "global_batch": args.global_batch, "nodes": args.nodes, "gpus_per_node": args.gpus_per_node,
             "mfu": args.mfu, "grad_ckpt": args.grad_ckpt, "precision": args.precision, "epochs": args.epochs,
             "overhead_gb": args.overhead_gb}
    if args.objective is not None and args.recipe and args.objective != fields.get("objective"):
        fields["objective_knobs"] = {}            # the recipe's knobs belong to its own objective
    fields.update({k: v for k, v in flags.items() if v is not None})
    plan = P.make_plan(P.PlanInput(**fields))
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print(P.format_plan(plan))
    return 0
