"""`mimscale report` subcommand (wired into mimscale.cli through add_parser/run)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

DESCRIPTION = """\
Write a self-contained report.html (open it offline in any browser) and report.json for one or
more run directories: per run the objective, model, epochs, device-hours, MAE-equivalent epochs,
best kNN/linear/fine-tune top-1, time to a target accuracy, throughput (img/s, TFLOP/s, MFU when logged),
peak memory, and plots of kNN top-1 vs device-hours and training loss vs step (one curve per run).
A `mimscale compare` directory (it holds compare.json) gets the league report instead: one row per
member, ranked by final kNN top-1 and by time to the common target with teacher cost included.
  mimscale report runs/mae_vit_b16 runs/emae_vit_b16 --target 60 --out reports/b16
  mimscale report COMPARE_DIR
  mimscale report --watch 30 COMPARE_DIR      a live dashboard: rewritten every 30 s (the page reloads itself)
                                              until every run / member has finished, then static
A run's own RUN_DIR/report.html is rewritten by the training loop after every evaluation and at the end."""


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
    p.add_argument(
        "--watch",
        type=float,
        default=None,
        metavar="SECONDS",
        help="rewrite the report every SECONDS (the page reloads itself) until all runs / members have finished",
    )
    p.set_defaults(run=run)


def run(args) -> int:
    from ..errors import MimscaleError
    from . import is_compare_dir, write_league, write_report

    leagues = [d for d in args.run_dirs if is_compare_dir(d)]
    if leagues and len(args.run_dirs) > 1:
        raise MimscaleError(f"{leagues[0]} is a `mimscale compare` directory: report it on its own")
    if args.watch is not None and not args.watch > 0:
        raise MimscaleError(f"--watch {args.watch}: give the seconds between updates (> 0)")

    def write(refresh: float | None) -> tuple[Path, Path]:
        if leagues:
            return write_league(leagues[0], args.out, args.target, bench=args.bench, refresh=refresh)
        return write_report(args.run_dirs, args.out, args.target, bench=args.bench, refresh=refresh)

    if args.watch is not None:
        return watch(write, args.run_dirs, args.watch)
    html_path, json_path = write(None)
    print(f"report: {html_path}")
    print(f"data:   {json_path}")
    return 0


def all_finished(json_path: Path) -> bool:
    """Whether every run (or every league member, all seeds) in a written report.json has finished."""
    doc = json.loads(json_path.read_text(encoding="utf-8"))
    if "league" in doc:
        return all(m["status"] == "done" for m in doc["league"]["members"])
    return all(r["finished"] for r in doc["runs"])


def _sleep(seconds: float) -> None:  # tests replace it (the run trains on while --watch sleeps)
    time.sleep(seconds)


def watch(write, dirs: list[str], seconds: float) -> int:
    """``--watch``: rewrite the report every ``seconds`` until everything has finished (the last write is the
    static page). A run that has logged nothing yet is waited for; a missing directory is an error at once."""
    from ..errors import MimscaleError

    for d in dirs:
        if not Path(d).is_dir():
            raise MimscaleError(f"run directory '{d}' does not exist (pass the train.run_dir of a run)")
    while True:
        try:
            html_path, json_path = write(seconds)
        except MimscaleError as e:  # e.g. no metric record yet: the run is starting
            print(f"waiting: {e}", flush=True)
        else:
            if all_finished(json_path):
                write(None)
                print(f"all finished; static report: {html_path}", flush=True)
                return 0
            print(f"{time.strftime('%H:%M:%S')} updated {html_path}", flush=True)
        _sleep(seconds)
