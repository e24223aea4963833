"""Benchmark results in the run report: a ``mimscale bench throughput --sweep`` file as a table + plot.

``mimscale report ... --bench FILE`` shows that file and a bare ``--bench`` the newest
``benchmarks/results/throughput-*.json`` under the current directory; without ``--bench`` a report
shows no benchmark results (the repository's stored ones are not about the run).
"""

from __future__ import annotations

import json
import os
from html import escape
from pathlib import Path
from typing import Any

from ..errors import ConfigError

RESULTS_DIR = Path("benchmarks") / "results"


def latest_bench_file(results_dir: str | os.PathLike = RESULTS_DIR) -> Path | None:
    """The newest sweep file in ``results_dir`` (by its ``date`` field, then modification time)."""
    found = []
    for p in Path(results_dir).glob("throughput-*.json"):
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and doc.get("benchmark") == "throughput":
            found.append((str(doc.get("date", "")), p.stat().st_mtime, p))
    return max(found)[2] if found else None


def load_bench(path: str | os.PathLike) -> dict[str, Any]:
    """Read a sweep file; a missing or foreign file is a one-line :class:`ConfigError`."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"--bench {p}: cannot read it ({e.strerror or e})") from None
    except ValueError:
        raise ConfigError(f"--bench {p}: not JSON") from None
    if not (isinstance(doc, dict) and doc.get("benchmark") == "throughput" and isinstance(doc.get("results"), list)):
        raise ConfigError(f"--bench {p}: not a `mimscale bench throughput --sweep` results file")
    doc = dict(doc)
    doc["path"] = str(p)
    return doc


def resolve_bench(path: str | os.PathLike | bool | None, results_dir: str | os.PathLike = RESULTS_DIR) -> dict | None:
    """``None``/``False``: no benchmarks; ``True`` (a bare ``--bench``): the newest sweep in ``results_dir``
    (a one-line :class:`ConfigError` when there is none); a path: that file."""
    if path is None or path is False:
        return None
    if path is True:
        latest = latest_bench_file(results_dir)
        if latest is None:
            raise ConfigError(f"--bench: no throughput-*.json sweep in {results_dir} (pass --bench FILE)")
        return load_bench(latest)
    return load_bench(path)


def _num(v: Any, fmt: str) -> str:
    return format(v, fmt) if isinstance(v, (int, float)) else "–"


def bench_section(doc: dict[str, Any]) -> str:
    """``<h2>Benchmarks</h2>``, a table of every configuration (img/s also relative to ZeRO-0) and a plot."""
    from .sweep import ratios, sweep_svg

    rows = doc["results"]
    rel = ratios(rows) if rows else []
    head = (
        "<tr><th>Model</th><th>ZeRO</th><th>Ckpt</th><th>Micro-batch</th><th>Ranks</th><th>Precision</th>"
        "<th>Throughput<span class='unit'>img/s</span></th><th>vs ZeRO-0<span class='unit'>same micro-batch"
        "</span></th><th>vs ZeRO-0<span class='unit'>img per CPU-second</span></th>"
        "<th>Step<span class='unit'>ms, median</span></th><th>MFU<span class='unit'>%</span></th>"
        "<th>Peak memory<span class='unit'>GB</span></th><th>Plan<span class='unit'>GB, img/s/GPU</span></th></tr>"
    )
    body = []
    for r, q in zip(rows, rel):
        plan = r.get("plan")
        plan_txt = (
            (
                f"{plan['mem_gb']:.1f} {'fits' if plan['fits'] else 'does not fit'}, "
                f"{plan['img_per_s_per_gpu']:,.0f} ({escape(str(plan['gpu']))})"
            )
            if plan
            else "–"
        )
        mfu = 100 * r["mfu"] if isinstance(r.get("mfu"), (int, float)) else None
        cells = [
            escape(f"{r['objective']} {r['arch']}/{r.get('patch', '?')} @{r.get('img', '?')}px"),
            str(r["zero"]),
            "on" if r["ckpt"] else "off",
            str(r["micro_batch"]),
            str(r.get("world_size", 1)),
            escape(str(r.get("precision", ""))),
            _num(r["img_per_s"], ",.1f"),
            _num(q["img_per_s_vs_zero0"], ".3f"),
            _num(q["img_per_cpu_s_vs_zero0"], ".3f"),
            _num(1000 * r["step_time_s"], ",.1f"),
            _num(mfu, ".1f"),
            _num(r.get("mem_peak_gb"), ".2f"),
            plan_txt,
        ]
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    # data-run would tie the curves to the run table's hover highlighting: these series are not runs
    svg = sweep_svg(rows, chart_id="plot-bench", standalone=False).replace("data-run=", "data-series=")
    device = rows[0].get("device_name", rows[0].get("device", "")) if rows else ""
    meta = (
        f"<code>{escape(doc.get('path', ''))}</code> &middot; machine {escape(str(doc.get('machine', '?')))}, "
        f"{escape(str(doc.get('date', '?')))} &middot; {escape(str(device))} &middot; torch "
        f"{escape(str(doc.get('torch', '?')))}, DeepSpeed {escape(str(doc.get('deepspeed', '?')))} &middot; "
        f"{len(rows)} configurations, {doc.get('repeats', 1)} round(s) each. On a shared machine compare "
        "configurations by the ratios, not the absolute img/s."
    )
    # rows in <tfoot>, not <tbody> (which a browser would insert around bare rows): every tbody row of the
    # page is a run of the #runs table to the report's scripts and checks
    return (
        f'<h2>Benchmarks</h2>\n<p class="meta">{meta}</p>\n<div class="table-wrap"><table id="bench">'
        f'<thead>{head}</thead><tfoot>{"".join(body)}</tfoot></table></div>\n<div class="plots"><figure>{svg}<figcaption>img/s by ZeRO '
        "stage; one curve per micro-batch and activation-checkpointing setting.</figcaption></figure></div>\n"
    )
