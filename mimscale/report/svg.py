"""Inline SVG line charts (no plotting library, no external resources).

:func:`line_chart` draws one ``<path class="curve" data-run="i">`` per series that has points
(non-finite values break the line), optional point markers with ``<title>`` tooltips, axes with
"nice" ticks, grid lines, axis titles, an optional dashed horizontal reference line and a legend
below the plot area. Series without points still get a legend entry, marked "no data".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from html import escape

# Okabe-Ito (colour-blind safe, yellow left out: too pale on white), then Tableau tones.
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#8C564B", "#7F7F7F", "#9467BD")
DASHES = ("", "7 4", "2 3")

WIDTH = 640
MARGIN = dict(left=64, right=20, top=36, bottom=64)
PLOT_H = 300
LEGEND_ROW = 20
CHAR_W = 6.6  # approximate width of a 12px sans-serif character, for legend layout


def run_style(i: int) -> tuple[str, str]:
    """(colour, dash pattern) of run ``i``: colours first, then dashes once the palette repeats."""
    return PALETTE[i % len(PALETTE)], DASHES[(i // len(PALETTE)) % len(DASHES)]


@dataclass
class Series:
    label: str
    index: int  # run index: colour and data-run attribute
    points: list[tuple[float, float]] = field(default_factory=list)
    empty_note: str = "no data"
    tooltip: str = "{label}: x={x}, y={y}"  # for markers


def nice_step(span: float, target: int = 5) -> float:
    """A 1/2/2.5/5 x 10^k tick step giving about ``target`` intervals over ``span``."""
    if not span > 0 or not math.isfinite(span):
        return 1.0
    raw = span / target
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag * (1 + 1e-9):
            return m * mag
    return 10 * mag


def nice_range(lo: float, hi: float, target: int = 5, include_zero: bool = False) -> tuple[float, float, float]:
    """(lo, hi, step) widened to whole tick steps; a degenerate range is opened up around its value."""
    if include_zero:
        lo, hi = min(lo, 0.0), max(hi, 0.0)
    if hi - lo <= abs(hi) * 1e-9:
        pad = abs(hi) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
        if include_zero and lo < 0 <= hi - pad:
            lo = 0.0
    step = nice_step(hi - lo, target)
    return math.floor(lo / step + 1e-9) * step, math.ceil(hi / step - 1e-9) * step, step


def format_tick(v: float, step: float) -> str:
    """Tick label with just enough decimals for ``step``; thousands as 10k / 1.5M."""
    if abs(v) < step * 1e-6:
        v = 0.0
    if step >= 1000 and abs(v) >= 1000:
        for div, suffix in ((1e6, "M"), (1e3, "k")):
            if abs(v) >= div:
                return format_tick(v / div, step / div) + suffix
    text = f"{step:.12f}".rstrip("0").rstrip(".")
    decimals = len(text.split(".")[1]) if "." in text else 0
    return f"{v:.{decimals}f}"


def format_number(v: float, digits: int = 4) -> str:
    """Compact general number for tooltips."""
    if v == 0 or not math.isfinite(v):
        return str(v)
    if 1e-3 <= abs(v) < 1e6:
        return f"{v:.{digits}g}"
    return f"{v:.3g}"


def _segments(points: list[tuple[float, float]]) -> list[list[tuple[float, float]]]:
    segs: list[list[tuple[float, float]]] = [[]]
    for x, y in points:
        if math.isfinite(x) and math.isfinite(y):
            segs[-1].append((x, y))
        elif segs[-1]:
            segs.append([])
    return [s for s in segs if s]


def _downsample(points: list[tuple[float, float]], max_points: int) -> list[tuple[float, float]]:
    """Bucket means over x so a long run keeps its shape without a megabyte of path data."""
    if len(points) <= max_points:
        return points
    lo, hi = points[0][0], points[-1][0]
    width = (hi - lo) / max_points or 1.0
    out: list[tuple[float, float]] = []
    bucket: list[tuple[float, float]] = []
    edge = lo + width
    for x, y in points:
        if x > edge and bucket:
            out.append((sum(p[0] for p in bucket) / len(bucket), sum(p[1] for p in bucket) / len(bucket)))
            bucket = []
            while x > edge:
                edge += width
        bucket.append((x, y))
    if bucket:
        out.append((sum(p[0] for p in bucket) / len(bucket), sum(p[1] for p in bucket) / len(bucket)))
    out[-1] = points[-1]
    return out


def _legend_layout(series: list[Series], x0: float, y0: float, width: float):
    """Positions of legend entries, wrapped into rows; returns (entries, rows)."""
    entries, x, y, rows = [], x0, y0, 1
    for s in series:
        text = s.label if s.points else f"{s.label} ({s.empty_note})"
        if len(text) > 48:
            text = text[:47] + "…"
        w = 28 + CHAR_W * len(text) + 18
        if x > x0 and x + w > x0 + width:
            x, y, rows = x0, y + LEGEND_ROW, rows + 1
        entries.append((s, text, x, y))
        x += w
    return entries, rows


def line_chart(
    series: list[Series],
    *,
    chart_id: str,
    title: str,
    x_label: str,
    y_label: str,
    markers: bool = False,
    hline: tuple[float, str] | None = None,
    x_from_zero: bool = True,
    max_points: int = 1500,
    x_range: tuple[float, float] | None = None,
    y_range: tuple[float, float] | None = None,
    width: int = WIDTH,
    plot_h: int = PLOT_H,
    no_data: str = "no data in any run",
) -> str:
    """An ``<svg>`` element (as a string) with one curve per series that has finite points.

    ``x_range`` / ``y_range`` fix the axes (widened to whole ticks) instead of fitting the points, so that
    several charts drawn with the same ranges share their axes and tick labels (small multiples).
    """
    m = MARGIN
    pw, ph = width - m["left"] - m["right"], plot_h
    legend_top = m["top"] + ph + m["bottom"]
    entries, rows = _legend_layout(series, m["left"] - 40, legend_top, pw + 40)
    height = legend_top + rows * LEGEND_ROW + 8

    pts = [p for s in series for p in s.points if math.isfinite(p[0]) and math.isfinite(p[1])]
    ys = [y for _, y in pts] + ([hline[0]] if hline else [])
    if x_range is None:
        x_range = (min(x for x, _ in pts), max(x for x, _ in pts)) if pts else None
    if y_range is None:
        y_range = (min(ys), max(ys)) if pts else None
    x0, x1, xs = nice_range(*x_range, include_zero=x_from_zero) if x_range else (0.0, 1.0, 0.2)
    y0, y1, ystep = nice_range(*y_range) if y_range else (0.0, 1.0, 0.2)

    def sx(x: float) -> float:
        return m["left"] + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return m["top"] + ph - (y - y0) / (y1 - y0) * ph

    out = [
        f'<svg id="{escape(chart_id)}" class="chart" viewBox="0 0 {width} {height:.0f}" '
        f'width="{width}" height="{height:.0f}" role="img" aria-label="{escape(title)}">',
        f"<title>{escape(title)}</title>",
        f'<text class="chart-title" x="{m["left"]}" y="22">{escape(title)}</text>',
        f'<rect class="plot-bg" x="{m["left"]}" y="{m["top"]}" width="{pw}" height="{ph}"/>',
    ]
    # grid + ticks
    grid, ticks = [], []
    n = int(round((x1 - x0) / xs))
    for i in range(n + 1):
        v = x0 + i * xs
        x = sx(v)
        grid.append(f'<line x1="{x:.1f}" y1="{m["top"]}" x2="{x:.1f}" y2="{m["top"] + ph}"/>')
        ticks.append(
            f'<line x1="{x:.1f}" y1="{m["top"] + ph}" x2="{x:.1f}" y2="{m["top"] + ph + 5}"/>'
            f'<text class="tick x" x="{x:.1f}" y="{m["top"] + ph + 18}">{format_tick(v, xs)}</text>'
        )
    n = int(round((y1 - y0) / ystep))
    for i in range(n + 1):
        v = y0 + i * ystep
        y = sy(v)
        grid.append(f'<line x1="{m["left"]}" y1="{y:.1f}" x2="{m["left"] + pw}" y2="{y:.1f}"/>')
        ticks.append(
            f'<line x1="{m["left"] - 5}" y1="{y:.1f}" x2="{m["left"]}" y2="{y:.1f}"/>'
            f'<text class="tick y" x="{m["left"] - 8}" y="{y + 4:.1f}">{format_tick(v, ystep)}</text>'
        )
    out.append('<g class="grid">' + "".join(grid) + "</g>")
    out.append(
        f'<g class="axes"><line x1="{m["left"]}" y1="{m["top"] + ph}" x2="{m["left"] + pw}" '
        f'y2="{m["top"] + ph}"/><line x1="{m["left"]}" y1="{m["top"]}" x2="{m["left"]}" '
        f'y2="{m["top"] + ph}"/>' + "".join(ticks) + "</g>"
    )
    out.append(
        f'<text class="axis-label" x="{m["left"] + pw / 2:.1f}" y="{m["top"] + ph + 38}">{escape(x_label)}</text>'
    )
    cy = m["top"] + ph / 2
    out.append(f'<text class="axis-label" transform="translate(16 {cy:.1f}) rotate(-90)">{escape(y_label)}</text>')
    if hline is not None:
        y = sy(hline[0])
        out.append(
            f'<g class="hline"><line x1="{m["left"]}" y1="{y:.1f}" x2="{m["left"] + pw}" y2="{y:.1f}"/>'
            f'<text x="{m["left"] + pw - 4}" y="{y - 5:.1f}">{escape(hline[1])}</text></g>'
        )
    if not pts:
        out.append(f'<text class="no-data" x="{m["left"] + pw / 2:.1f}" y="{cy:.1f}">{escape(no_data)}</text>')

    # curves
    out.append('<g class="curves">')
    for s in series:
        if not s.points:
            continue
        colour, dash = run_style(s.index)
        d = []
        for seg in _segments(_downsample(list(s.points), max_points)):
            if len(seg) == 1:  # a lone point between gaps: a zero-length segment (round caps draw a dot)
                seg = seg * 2
            d.append("M" + " L".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in seg))
        if not d:
            continue
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        out.append(
            f'<g class="run" data-run="{s.index}">'
            f'<path class="curve" data-run="{s.index}" d="{" ".join(d)}" stroke="{colour}"{dash_attr}>'
            f"<title>{escape(s.label)}</title></path>"
        )
        if markers:
            for x, y in s.points:
                if math.isfinite(x) and math.isfinite(y):
                    tip = s.tooltip.format(label=s.label, x=format_number(x), y=format_number(y))
                    out.append(
                        f'<circle class="marker" cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3.5" '
                        f'fill="{colour}"><title>{escape(tip)}</title></circle>'
                    )
        out.append("</g>")
    out.append("</g>")

    # legend
    out.append('<g class="legend">')
    for s, text, x, y in entries:
        colour, dash = run_style(s.index)
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        cls = "legend-item" + ("" if s.points else " empty")
        out.append(
            f'<g class="{cls}" data-run="{s.index}">'
            f'<line x1="{x:.1f}" y1="{y - 4:.1f}" x2="{x + 22:.1f}" y2="{y - 4:.1f}" stroke="{colour}"'
            f'{dash_attr}/><text x="{x + 28:.1f}" y="{y:.1f}">{escape(text)}</text></g>'
        )
    out.append("</g></svg>")
    return "\n".join(out)


def dot_chart(
    rows: list[tuple[str, int, list[float | None]]],
    keys: list[str],
    *,
    chart_id: str,
    title: str,
    x_label: str,
    width: int = WIDTH,
) -> str:
    """A horizontal dot chart: one row per ``(label, run index, values)``, value ``k`` drawn as a filled
    (``k`` = 0) or hollow (``k`` >= 1) dot named ``keys[k]`` in the legend; ``None`` values are left out."""
    left, right, top, row_h = 120, 24, 40, 26
    pw, ph = width - left - right, row_h * max(len(rows), 1)
    height = top + ph + 70
    vals = [v for _, _, vs in rows for v in vs if v is not None and math.isfinite(v)]
    x0, x1, xs = nice_range(min(vals), max(vals)) if vals else (0.0, 1.0, 0.2)

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    out = [
        f'<svg id="{escape(chart_id)}" class="chart" viewBox="0 0 {width} {height}" width="{width}" '
        f'height="{height}" role="img" aria-label="{escape(title)}"><title>{escape(title)}</title>',
        f'<text class="chart-title" x="{left}" y="22">{escape(title)}</text>',
        f'<rect class="plot-bg" x="{left}" y="{top}" width="{pw}" height="{ph}"/>',
    ]
    grid = []
    for i in range(int(round((x1 - x0) / xs)) + 1):
        x = sx(x0 + i * xs)
        grid.append(
            f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + ph}"/>'
            f'<text class="tick x" x="{x:.1f}" y="{top + ph + 18}">{format_tick(x0 + i * xs, xs)}</text>'
        )
    out.append('<g class="grid">' + "".join(grid) + "</g>")
    out.append(f'<text class="axis-label" x="{left + pw / 2:.1f}" y="{top + ph + 38}">{escape(x_label)}</text>')
    for r, (label, index, values) in enumerate(rows):
        colour, _ = run_style(index)
        y = top + row_h * (r + 0.5)
        dots = "".join(
            f'<circle class="dot" cx="{sx(v):.1f}" cy="{y:.1f}" r="5" fill="{colour if k == 0 else "#fff"}" '
            f'stroke="{colour}" stroke-width="2"><title>{escape(f"{label}: {keys[k]} {v:.2f}")}</title></circle>'
            for k, v in enumerate(values)
            if v is not None and math.isfinite(v)
        )
        out.append(
            f'<g class="run" data-run="{index}"><text class="tick y" x="{left - 8}" y="{y + 4:.1f}">'
            f"{escape(label)}</text>{dots}</g>"
        )
    legend = "".join(
        f'<circle cx="{left + 150 * k + 6}" cy="{height - 12}" r="5" fill="{"#5d6675" if k == 0 else "#fff"}" '
        f'stroke="#5d6675" stroke-width="2"/><text x="{left + 150 * k + 16}" y="{height - 8}">{escape(key)}</text>'
        for k, key in enumerate(keys)
    )
    out.append(f'<g class="legend">{legend}</g></svg>')
    return "\n".join(out)
