"""`mimscale report` subcommand (wired into mimscale.cli through add_parser/run)."""

from __future__ import annotations

import argparse

DESCRIPTION = """\
Write a self-contained report.html (open it offline in any browser) and report.json for one or
more run directories: per run the objective, model, epochs, device-hours, MAE-equivalent epochs,
best kNN/linear/fine-tune top-1, time to a target accuracy, throughput (img/s, TFLOP/s, MFU when logged),
peak memory, and plots of kNN top-1 vs device-hours and training loss vs step (one curve per run).
A `mimscale compare` directory (it holds compare.json) gets the league report instead: one row per
member, ranked by final kNN top-1 and by time to the common target with teacher cost included.
  mimscale report runs/mae_vit_b16 runs/emae_vit_b16 --target 60 --out reports/b16
  mimscale report COMPARE_DIR"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "report",
        help="HTML + JSON report of one or more runs, or the league of a compare directory",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (train.run_dir of each run), or one compare dir"
    )
    p.add_argument(
        "--out", default=None, metavar="DIR", help="where report.html and report.json go (default: the first RUN_DIR)"
    )
    p.add_argument(
        "--target",
        type=float,
        default=None,
        metavar="PCT",
        help="kNN top-1 target in percent for the time-to-target column (default: none; for a league, "
        "the lowest best kNN top-1 of its finished members)",
    )
    p.add_argument(
        "--bench",
        nargs="?",
        const=True,
        default=None,
        metavar="FILE",
        help="show a `mimscale bench throughput --sweep` results file as a table + plot; a bare --bench shows "
        "the newest benchmarks/results/throughput-*.json (default: no benchmark results)",
    )
    p.set_defaults(run=run)


def run(args) -> int:
    from ..errors import MimscaleError
    from . import is_compare_dir, write_league, write_report

    leagues = [d for d in args.run_dirs if is_compare_dir(d)]
    if leagues and len(args.run_dirs) > 1:
        raise MimscaleError(f"{leagues[0]} is a `mimscale compare` directory: report it on its own")
    if leagues:
        html_path, json_path = write_league(leagues[0], args.out, args.target, bench=args.bench)
    else:
        html_path, json_path = write_report(args.run_dirs, args.out, args.target, bench=args.bench)
    print(f"report: {html_path}")
    print(f"data:   {json_path}")
    return 0
