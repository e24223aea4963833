"""The run report: ``mimscale report RUN_DIR [RUN_DIR ...]`` -> ``report.html`` + ``report.json``.

``report.html`` is self-contained (inline CSS, SVG and JS; no URL of any kind), so it opens offline
and can be mailed or archived next to the run. ``report.json`` holds the same numbers per run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .bench import resolve_bench
from .data import Run, load_run, load_runs, mae_reference_flops
from .html import render

__all__ = ["Run", "load_run", "load_runs", "mae_reference_flops", "render", "write_report"]


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_report(
    run_dirs: list[str | os.PathLike],
    out_dir: str | os.PathLike | None = None,
    target: float | None = None,
    bench: str | os.PathLike | bool | None = None,
) -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.json`` into ``out_dir`` (default: the first run dir).

    ``bench``: a sweep file to show, ``True`` for the newest benchmarks/results/throughput-*.json,
    ``None`` for none. Returns the two paths. Raises :class:`mimscale.errors.MimscaleError` for a
    missing run directory, one without metrics, or a target outside (0, 100].
    """
    runs = load_runs(list(run_dirs), target)
    bench_doc = resolve_bench(bench)
    out = Path(out_dir) if out_dir is not None else Path(run_dirs[0])
    out.mkdir(parents=True, exist_ok=True)
    html_path, json_path = out / "report.html", out / "report.json"
    doc = {"target": target, "runs": [r.to_json() for r in runs], **({"bench": bench_doc} if bench_doc else {})}
    _write(json_path, json.dumps(doc, indent=2) + "\n")
    _write(html_path, render(runs, target, bench=bench_doc))
    return html_path, json_path
