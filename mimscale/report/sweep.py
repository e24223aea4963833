"""A throughput sweep (``mimscale bench throughput --sweep``) as ratios to ZeRO-0 and as a line chart: shared by
the sweep's own files (:mod:`mimscale.bench.throughput`) and the run report's benchmark section."""

from __future__ import annotations

from .svg import Series, line_chart


def ratios(rows: list[dict]) -> list[dict]:
    """img/s (and img per CPU-second, when measured) of each row relative to ZeRO-0 without checkpointing
    at the same micro-batch and model (``None`` without that baseline)."""

    def key(r):
        return r.get("arch"), r["micro_batch"], r.get("world_size", 1)

    base = {key(r): r for r in rows if r["zero"] == 0 and not r["ckpt"]}
    out = []
    for r in rows:
        b = base.get(key(r))
        cpu = b is not None and r.get("img_per_cpu_s") and b.get("img_per_cpu_s")
        out.append(
            {
                "arch": r.get("arch"),
                "zero": r["zero"],
                "ckpt": r["ckpt"],
                "micro_batch": r["micro_batch"],
                "img_per_s_vs_zero0": r["img_per_s"] / b["img_per_s"] if b else None,
                "img_per_cpu_s_vs_zero0": r["img_per_cpu_s"] / b["img_per_cpu_s"] if cpu and b else None,
            }
        )
    return out


SVG_STYLE = """<style>
.chart-title { font: 600 15px sans-serif; fill: #1d2430; }
.plot-bg { fill: #fbfcfd; }
.grid line { stroke: #e6e9ee; stroke-width: 1; }
.axes line { stroke: #5d6675; stroke-width: 1; }
.tick { font: 11.5px sans-serif; fill: #5d6675; }
.tick.x { text-anchor: middle; }
.tick.y { text-anchor: end; }
.axis-label { font: 12.5px sans-serif; fill: #1d2430; text-anchor: middle; }
.curve { fill: none; stroke-width: 2; stroke-linejoin: round; stroke-linecap: round; }
.marker { stroke: #fff; stroke-width: 1; }
.legend text { font: 12px sans-serif; fill: #1d2430; }
.legend line { stroke-width: 3; }
.no-data { font: 13px sans-serif; fill: #9aa1ac; text-anchor: middle; }
</style>"""


def sweep_svg(rows: list[dict], *, chart_id: str = "bench-throughput", standalone: bool = True) -> str:
    """Throughput against ZeRO stage, one curve per (arch, micro-batch, checkpointing) (the report's line chart).

    img/s, except when every row ran on a CPU with its CPU time measured: then images per CPU-second of
    the process, which a shared machine's load moves far less than wall-clock img/s.
    """
    per_cpu = bool(rows) and all(r.get("device") == "cpu" and r.get("img_per_cpu_s") for r in rows)
    metric, unit = ("img_per_cpu_s", "img per CPU-second") if per_cpu else ("img_per_s", "img/s")
    keys = sorted({(r["arch"], r["micro_batch"], r["ckpt"]) for r in rows})
    series = [
        Series(
            f"{a} mb {mb}" + (" + ckpt" if c else ""),
            i,
            sorted(
                (float(r["zero"]), r[metric]) for r in rows if (r["arch"], r["micro_batch"], r["ckpt"]) == (a, mb, c)
            ),
            tooltip="{label}: ZeRO-{x}, {y} " + unit,
        )
        for i, (a, mb, c) in enumerate(keys)
    ]
    first = rows[0] if rows else {}
    title = (
        f"{first.get('objective', '')} throughput by ZeRO stage ({first.get('world_size', 1)} x "
        f"{first.get('device', '')}, {first.get('precision', '')})"
    )
    svg = line_chart(
        series, chart_id=chart_id, title=title, x_label="ZeRO stage", y_label=unit, markers=True, x_from_zero=True
    )
    if standalone:
        svg = svg.replace("<svg ", '<svg xmlns="http://www.w3.org/2000/svg" ', 1).replace(
            "</title>", "</title>\n" + SVG_STYLE, 1
        )
    return svg
