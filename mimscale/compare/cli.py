"""``mimscale compare`` (plugged into mimscale.cli through add_parser/run)."""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

from ..errors import ConfigError

DESCRIPTION = """\
Pre-train several objectives on the same encoder, data, evaluation and budget, then compare them
(`mimscale report DIR` writes the league table). Each member: its teachers (timed, a separate cost),
a short calibration, training to the budget (kNN during training), a linear probe at the end.
  mimscale compare tiny_cpu --out runs/league --budget-minutes 10           all objectives, here, in turn
  mimscale compare tiny_cpu --out runs/league --objectives mae,emae,emae_k2=emae \\
      --set emae_k2:objective.num_parts=2 --budget-mae-epochs 4
  mimscale compare mae_vit_b16 'data.train=/data/in1k/train-{000000..001281}.tar' --out runs/b16 \\
      --budget-minutes 600 --slurm --sbatch=--nodes=1                       one SLURM array task per member
  mimscale compare --out runs/league                                        resume: complete members are kept
SPEC is a compare spec (mimscale/configs/compare/*.yaml: per-objective knobs for a scale) or a recipe."""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "compare",
        help="every objective at equal compute (locally or as a SLURM job array)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("spec", nargs="?", default=None, metavar="SPEC", help="compare spec or recipe (omit to resume)")
    p.add_argument("overrides", nargs="*", help="key=value overrides for every member")
    p.add_argument("--out", required=True, metavar="DIR", help="the compare directory (plan, teachers, members)")
    p.add_argument("--objectives", default=None, help="comma-separated members (LABEL=OBJECTIVE for a variant)")
    p.add_argument("--budget-minutes", type=float, default=None, metavar="M", help="training minutes per member")
    p.add_argument(
        "--budget-mae-epochs", type=float, default=None, metavar="E", help="training FLOPs as MAE-equivalent epochs"
    )
    p.add_argument(
        "--seeds", type=int, default=None, metavar="K", help="runs per member (train.seed + k); a restart may add seeds"
    )
    p.add_argument("--set", action="append", default=[], metavar="NAME:KEY=VALUE", help="one member's override")
    p.add_argument("--member", action="append", default=None, metavar="NAME", help="run only this member")
    p.add_argument("--member-index", type=int, default=None, help="run only the plan's member #I (array tasks)")
    p.add_argument("--launch", choices=("none", "srun"), default="none", help="how to start each member's ranks")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan and each member's steps, epochs and minutes; run and store nothing",
    )
    p.add_argument("--slurm", action="store_true", help="submit one array task per member (slurm/compare.sh)")
    p.add_argument(
        "--sbatch",
        action="append",
        default=[],
        metavar="ARG",
        help="extra sbatch argument, e.g. --sbatch=--time=4:00:00",
    )
    p.set_defaults(run=run)


def run(args) -> int:
    from . import load_plan, plan_compare, run_members
    from .run import EXIT_REQUEUE, Interrupted, estimate, format_estimate, say

    if args.spec is None:
        if args.overrides or args.objectives or args.set or args.budget_minutes or args.budget_mae_epochs:
            raise ConfigError("to change a comparison give its SPEC too (or resume with only --out DIR)")
        plan = load_plan(args.out)
        if args.seeds is not None and args.seeds != plan.seeds:
            raise ConfigError(f"--seeds changes the plan ({plan.seeds} stored): give its SPEC too")
    else:
        names = args.objectives.split(",") if args.objectives else None
        plan = plan_compare(
            args.out,
            args.spec,
            args.overrides,
            names,
            args.budget_minutes,
            args.budget_mae_epochs,
            args.set,
            seeds=args.seeds,
            write=not args.dry_run,
        )
    selected = args.member or (
        [m.partition("=")[0] for m in args.objectives.split(",")] if args.objectives else plan.names
    )
    if args.member_index is not None:
        if not 0 <= args.member_index < len(plan.members):
            raise ConfigError(f"--member-index {args.member_index} is outside 0..{len(plan.members) - 1}")
        selected = [plan.members[args.member_index].name]
    for name in selected:
        plan.member(name)  # unknown names: one line now
    for m in plan.members:
        mark = "*" if m.name in selected else " "
        say(f"{mark} {m.name:12s} {m.objective:9s} teachers={m.teachers or '-'} {' '.join(m.overrides[1:])}")
    if args.dry_run:
        say(f"budget {plan.budget['value']:g} {plan.budget['kind']} per member, {plan.seeds} seed(s) each")
        for line in format_estimate(estimate(plan, Path(args.out)), plan):
            say(line)
        say("dry run: nothing was run or stored")
        return 0
    if args.slurm:
        return submit(args.out, [plan.names.index(n) for n in selected], args.sbatch)
    try:
        run_members(plan, args.out, selected, args.launch)
    except Interrupted as e:  # saved on SIGUSR1/SIGTERM: slurm/compare.sh requeues the task on 42
        say(f"interrupted: {e}")
        return EXIT_REQUEUE
    return 0


SCRIPT = Path(__file__).resolve().parents[2] / "slurm" / "compare.sh"


def submit(root: str, indices: list[int], sbatch_args: list[str]) -> int:
    """``sbatch --array=I,J,... slurm/compare.sh DIR``: one task per member, each resumable and requeued."""
    from .run import say

    if shutil.which("sbatch") is None:
        raise ConfigError("--slurm needs sbatch on PATH (run on a SLURM login node)")
    if not SCRIPT.is_file():
        raise ConfigError(f"{SCRIPT} is missing: --slurm needs a source checkout of mimscale")
    out = str(Path(root).resolve())
    cmd = ["sbatch", "--parsable", f"--array={','.join(map(str, indices))}", *sbatch_args, str(SCRIPT), out]
    say("+ " + " ".join(cmd))
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise ConfigError(f"sbatch failed: {res.stderr.strip() or res.stdout.strip()}")
    job = res.stdout.strip().split(";")[0]
    say(f"submitted array job {job} ({len(indices)} tasks); when they are done: mimscale report {out}")
    print(job)
    return 0
