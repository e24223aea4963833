"""Shared by the benchmark scripts (importable because a script's own folder is on sys.path)."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def write_results(name: str, doc: dict, out_dir: str | os.PathLike | None = None) -> Path:
    """``benchmarks/results/<name>-<machine>-<date>.json`` (or in ``out_dir``) with the machine's description
    prepended."""
    date = dt.date.today().isoformat()
    machine = platform.node() or "machine"
    out = Path(out_dir or REPO / "benchmarks" / "results") / f"{name}-{machine}-{date}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": name,
        "machine": machine,
        "date": date,
        "cpu": platform.processor() or platform.machine(),
        "cores": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        **doc,
    }
    out.write_text(json.dumps(doc, indent=2) + "\n")
    return out
