"""``mimscale bench ...`` (wired into mimscale.cli through add_parser/run).

Sub-commands: ``plan`` (projection from shapes) and ``throughput`` (measured img/s, MFU and memory
per configuration). Heavy imports (torch, the models) happen in ``run``, not at parse time, so
``mimscale --help`` stays fast. Bad arguments print one line and exit 2.
"""

from __future__ import annotations

import argparse
import sys

BENCH_HELP = """\
Performance planning and measurement for ViT pre-training.
  plan        project per-GPU memory (ZeRO stage, activations), img/s and time per ImageNet-1k
              epoch from shapes alone: no GPU needed
  throughput  measure img/s, step time, MFU and peak memory of real training steps, one JSON line
              per configuration; --sweep writes benchmarks/results/throughput-<machine>-<date>.json + .svg
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
    p = sub.add_parser(
        "bench",
        help="performance planning: memory / throughput projections",
        description=BENCH_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bsub = p.add_subparsers(dest="bench_cmd", required=True, metavar="BENCH_COMMAND", parser_class=_OneLineParser)
    _add_plan(bsub)
    _add_throughput(bsub)
    p.set_defaults(run=run)


class _OneLineParser(argparse.ArgumentParser):
    """Argument errors as one line (``mimscale bench throughput: error: ...``), exit code 2."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)

    def parse_known_args(self, args=None, namespace=None):
        ns, extras = super().parse_known_args(args, namespace)
        if extras:  # the top-level parser would print its usage too: report it here, in one line
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return ns, extras


THROUGHPUT_HELP = """\
Measure real training steps (the recipe's objective and encoder, the DeepSpeed engine of
engine/deepspeed.py) and print ONE JSON line per configuration: img_per_s (micro-batch x ranks /
median step time), step_time_s, mfu (FLOPs counted with FlopCounterMode / device peak: datasheet on
A100/H100/H200, measured GEMM peak on CPU), mem_peak_gb, and with --plan-gpu the `bench plan`
projection. Warm-up steps are excluded. Lists after --zero/--ckpt/--micro-batch give a grid, each
configuration in its own process; --sweep also writes the results JSON + SVG plot (default grid:
ZeRO 0-3 x ckpt 0/1). --world-size N > 1 re-launches through torchrun --standalone.
  mimscale bench throughput --objective mae --arch vit_micro --zero 1 --ckpt 0 --micro-batch 32
  mimscale bench throughput --sweep --micro-batch 32 64 --repeats 3
  mimscale bench throughput --recipe mae_vit_l16 --zero 1 --ckpt 1 --micro-batch 64 --precision bf16 \\
      --plan-gpu auto"""


def _add_throughput(bsub) -> None:
    t = bsub.add_parser(
        "throughput",
        help="measure img/s, MFU and peak memory (one JSON line per configuration)",
        description=THROUGHPUT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument(
        "--recipe",
        default="tiny_cpu",
        metavar="NAME",
        help="recipe the configuration starts from (default: %(default)s)",
    )
    t.add_argument("--objective", default=None, help="default: the recipe's (another objective gets its default knobs)")
    t.add_argument(
        "--arch", default=None, metavar="ARCH", help="vit_micro|vit_tiny|...|vit_huge (default: the recipe's)"
    )
    t.add_argument("--img", type=int, default=None, help="image side (default: the recipe's)")
    t.add_argument("--patch", type=int, default=None, help="patch side (default: the recipe's)")
    t.add_argument(
        "--zero",
        type=int,
        nargs="+",
        default=None,
        metavar="STAGE",
        help="ZeRO stage(s) 0-3 (default: 0; --sweep: 0 1 2 3)",
    )
    t.add_argument(
        "--ckpt",
        type=int,
        nargs="+",
        default=None,
        metavar="0|1",
        help="activation checkpointing of the encoder off/on (default: 0; --sweep: 0 1)",
    )
    t.add_argument(
        "--micro-batch", type=int, nargs="+", default=[32], metavar="N", help="images per rank per step (default: 32)"
    )
    t.add_argument("--precision", default=None, help="bf16|fp16|fp32 (default: the recipe's)")
    t.add_argument("--steps", type=int, default=10, help="timed steps (default: %(default)s)")
    t.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: %(default)s)")
    t.add_argument("--world-size", type=int, default=1, help="ranks on this node (default: %(default)s)")
    t.add_argument(
        "--data",
        default="synthetic",
        help="'synthetic' (batches made once by the real transform + mask collate; loader excluded) "
        "or a shard source read by the real loader inside the timed loop (default: %(default)s)",
    )
    t.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    t.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        dest="overrides",
        help="any config override, applied last (repeatable), e.g. --set train.ds_config=my.json",
    )
    t.add_argument(
        "--plan-gpu",
        default=None,
        metavar="GPU",
        help="add the `bench plan` projection for this GPU (a100-40gb|a100-80gb|h100-80gb|h100-pcie|"
        "h200, or auto = this CUDA device)",
    )
    t.add_argument("--sweep", action="store_true", help="write the results JSON + SVG (see --out) and print a table")
    # set by the parent for each configuration it measures in a child process: measure this one, nothing else
    t.add_argument("--measure-only", action="store_true", help=argparse.SUPPRESS)
    t.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="rounds over the grid in alternating order; the median round per configuration is kept",
    )
    t.add_argument(
        "--out",
        default="benchmarks/results",
        metavar="DIR|FILE.json",
        help="where --sweep writes (default: %(default)s)",
    )


def _add_plan(bsub) -> None:
    pl = bsub.add_parser(
        "plan",
        help="project per-GPU memory, img/s and epoch time (no GPU needed)",
        description=PLAN_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = "default: from --recipe, else %s"
    pl.add_argument(
        "--recipe",
        default=None,
        metavar="NAME",
        help="take model, objective knobs, ZeRO stage, batch sizes and epochs from a recipe "
        "(e.g. mae_vit_l16); the flags below override it",
    )
    pl.add_argument("--model", default=None, metavar="ARCH", help="vit_tiny|vit_small|vit_base|vit_large|vit_huge")
    pl.add_argument("--patch", type=int, default=None, help=d % "16")
    pl.add_argument("--img", type=int, default=None, help=d % "224")
    pl.add_argument("--objective", default=None, help=d % "mae" + " (see `mimscale objectives`)")
    pl.add_argument(
        "--gpu", default="a100-80gb", help="a100-40gb|a100-80gb|h100-80gb (SXM)|h100-pcie|h200 (default: %(default)s)"
    )
    pl.add_argument("--zero", type=int, default=None, metavar="STAGE", help=d % "1" + "; 0-3")
    pl.add_argument(
        "--offload",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="ZeRO-Offload of the optimizer states to CPU (stage 1-3)",
    )
    pl.add_argument("--micro-batch", type=int, default=None, help="images per GPU per forward; " + d % "64")
    pl.add_argument(
        "--global-batch",
        type=int,
        default=None,
        help="images per optimizer step; default: from --recipe, else micro-batch x GPUs",
    )
    pl.add_argument("--nodes", type=int, default=1, help="default: %(default)s")
    pl.add_argument("--gpus-per-node", type=int, default=8, help="default: %(default)s")
    pl.add_argument("--mfu", type=float, default=None, help="assumed model FLOPs utilisation (default: 0.45)")
    pl.add_argument(
        "--grad-ckpt",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="activation checkpointing of the encoder blocks",
    )
    pl.add_argument("--precision", choices=("bf16", "fp16"), default=None, help=d % "bf16")
    pl.add_argument("--epochs", type=float, default=None, help="also print the whole run's time and GPU-hours")
    pl.add_argument(
        "--overhead-gb", type=float, default=None, help="CUDA context, workspaces, fragmentation per GPU (default: 2)"
    )
    pl.add_argument(
        "--loader",
        default=None,
        choices=("auto", "cpu", "device", "preresized"),
        help="data path for 'CPU cores per GPU the loader needs': device decode (auto: where the "
        "objective allows it), CPU decode, or CPU decode of pre-resized shards; default: the "
        "recipe's data.decode, else auto",
    )
    pl.add_argument(
        "--loader-rate",
        type=float,
        default=None,
        metavar="SAMPLES_PER_S",
        help="your measured host samples/s per CPU core on that path (benchmarks/loader_speed.py)",
    )
    pl.add_argument("--json", action="store_true", help='print the plan as JSON (with "fits") instead of text')


def run(args) -> int:
    return {"plan": _run_plan, "throughput": _run_throughput}[args.bench_cmd](args)


def _run_throughput(args) -> int:
    import contextlib
    import json

    from ..errors import ConfigError
    from . import throughput as T

    zeros = args.zero or ([0, 1, 2, 3] if args.sweep else [0])
    ckpts = args.ckpt or ([0, 1] if args.sweep else [0])
    if any(c not in (0, 1) for c in ckpts):
        raise ConfigError(f"--ckpt {' '.join(map(str, ckpts))}: each value must be 0 or 1")
    if args.repeats < 1:
        raise ConfigError(f"--repeats {args.repeats}: must be >= 1")
    base = T.ThroughputConfig(
        recipe=args.recipe,
        objective=args.objective,
        arch=args.arch,
        img=args.img,
        patch=args.patch,
        precision=args.precision,
        steps=args.steps,
        warmup=args.warmup,
        world_size=args.world_size,
        data=args.data,
        seed=args.seed,
        plan_gpu=args.plan_gpu,
        overrides=tuple(args.overrides),
    )
    configs = T.grid(base, zeros, [bool(c) for c in ckpts], args.micro_batch)
    if args.plan_gpu == "auto":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("--plan-gpu auto needs a CUDA device; name the GPU instead (e.g. --plan-gpu a100-80gb)")
    for tc in configs:
        tc.check()
        T.build_config(tc, tc.world_size)  # a bad recipe / arch / override: one line, before any launch
    if args.measure_only or (
        len(configs) == 1 and not args.sweep and args.repeats == 1 and not T.build_config(configs[0], 1).model.compile
    ):
        with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's prints: stdout carries the JSON line only
            row = T.run_one(configs[0])
        if row is not None:
            print(json.dumps(row), flush=True)
        return 0
    if len(configs) == 1 and not args.sweep and T.build_config(configs[0], 1).model.compile:
        T.compile_ratio(configs[0], args.repeats, emit=lambda line: print(line, flush=True))
        return 0
    rows = T.run_grid(configs, args.repeats, emit=lambda line: print(line, flush=True))
    if args.sweep:
        spec = {"zero": zeros, "ckpt": ckpts, "micro_batch": args.micro_batch, "base": T.config_dict(base)}
        path, svg = T.write_sweep(rows, args.out, spec, args.repeats)
        print(T.format_table(rows), file=sys.stderr)
        print(f"wrote {path} and {svg.name}", file=sys.stderr)
    return 0


def _run_plan(args) -> int:
    import json

    from ..errors import ConfigError
    from . import plan as P

    fields = P.from_recipe(args.recipe) if args.recipe else {}
    if args.recipe is None and args.model is None:
        raise ConfigError("mimscale bench plan needs --model ARCH (e.g. vit_large) or --recipe NAME")
    flags = {
        "model": args.model,
        "patch": args.patch,
        "img": args.img,
        "objective": args.objective,
        "gpu": args.gpu,
        "zero": args.zero,
        "offload": args.offload,
        "micro_batch": args.micro_batch,
        "global_batch": args.global_batch,
        "nodes": args.nodes,
        "gpus_per_node": args.gpus_per_node,
        "mfu": args.mfu,
        "grad_ckpt": args.grad_ckpt,
        "precision": args.precision,
        "epochs": args.epochs,
        "overhead_gb": args.overhead_gb,
        "loader": args.loader,
        "loader_rate": args.loader_rate,
    }
    if args.objective is not None and args.recipe and args.objective != fields.get("objective"):
        fields["objective_knobs"] = {}  # the recipe's knobs belong to its own objective
    fields.update({k: v for k, v in flags.items() if v is not None})
    plan = P.make_plan(P.PlanInput(**fields))
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print(P.format_plan(plan))
    return 0
