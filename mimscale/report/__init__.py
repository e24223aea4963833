"""The run report: ``mimscale report RUN_DIR [RUN_DIR ...]`` -> ``report.html`` + ``report.json``;
for a ``mimscale compare`` directory (it holds compare.json) the league report (:mod:`.league`).

``report.html`` is self-contained (inline CSS, SVG and JS; no URL of any kind), so it opens offline
and can be mailed or archived next to the run. ``report.json`` holds the same numbers per run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .bench import resolve_bench
from .data import Run, check_target, load_run, load_runs, mae_reference_flops
from .html import render, render_league
from .league import League, is_compare_dir, load_league, markdown_table

__all__ = [
    "League",
    "Run",
    "is_compare_dir",
    "load_league",
    "load_run",
    "load_runs",
    "mae_reference_flops",
    "render",
    "render_league",
    "write_league",
    "write_live_report",
    "write_report",
]

LIVE_REFRESH_S = 30.0  # how often a live run report reloads itself in the browser


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_report(
    run_dirs: list[str | os.PathLike],
    out_dir: str | os.PathLike | None = None,
    target: float | None = None,
    bench: str | os.PathLike | bool | None = None,
    refresh: float | None = None,
) -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.json`` into ``out_dir`` (default: the first run dir). ``refresh``: the
    page reloads itself every that many seconds while a run is unfinished.

    ``bench``: a sweep file to show, ``True`` for the newest benchmarks/results/throughput-*.json,
    ``None`` for none. Returns the two paths. Raises :class:`mimscale.errors.MimscaleError` for a
    missing run directory, one without metrics, or a target outside (0, 100].
    """
    runs = load_runs(list(run_dirs), target)
    bench_doc = resolve_bench(bench)
    doc = {"target": target, "runs": [r.to_json() for r in runs], **({"bench": bench_doc} if bench_doc else {})}
    html = render(runs, target, bench=bench_doc, refresh=refresh)
    return _emit(Path(out_dir if out_dir is not None else run_dirs[0]), doc, html)


def write_live_report(run_dir: str | os.PathLike, refresh: float = LIVE_REFRESH_S) -> Path | None:
    """The training loop's report: ``RUN_DIR/report.html`` (+ report.json) after every evaluation and at the
    end, reloading itself in the browser while the run trains. Never raises: a report that cannot be written
    is a warning, not a failed run. Returns the HTML path (``None`` when it failed)."""
    import logging

    try:
        return write_report([run_dir], refresh=refresh)[0]
    except Exception as e:  # the report must never stop training
        logging.getLogger("mimscale.report").warning("report.html not updated: %s", e)
        return None


def _emit(out: Path, doc: dict, html: str) -> tuple[Path, Path]:
    """Write ``report.json`` (``doc``) and ``report.html`` into ``out``; returns (html path, json path)."""
    out.mkdir(parents=True, exist_ok=True)
    html_path, json_path = out / "report.html", out / "report.json"
    _write(json_path, json.dumps(doc, indent=2) + "\n")
    _write(html_path, html)
    return html_path, json_path


def write_league(
    compare_dir: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    target: float | None = None,
    bench: str | os.PathLike | bool | None = None,
    refresh: float | None = None,
) -> tuple[Path, Path]:
    """The league report of a ``mimscale compare`` directory: ``report.html`` + ``report.json`` into
    ``out_dir`` (default: the compare directory). ``target`` replaces the league's own target; ``refresh``: the
    page reloads itself every that many seconds while a member is unfinished."""
    check_target(target)
    league = load_league(compare_dir, target)
    bench_doc = resolve_bench(bench)
    doc = {"league": league.to_json(), **({"bench": bench_doc} if bench_doc else {})}
    out = Path(out_dir if out_dir is not None else compare_dir)
    paths = _emit(out, doc, render_league(league, bench=bench_doc, refresh=refresh))
    _write(out / "league.md", markdown_table(league))  # the same table as Markdown
    return paths
