"""The self-contained HTML report: inline CSS, inline SVG plots, a few lines of inline JS
(sortable table, hover highlighting). No external URL of any kind, so it opens offline."""

from __future__ import annotations

import datetime as _dt
import functools
import math
from html import escape
from pathlib import Path

from .bench import bench_section
from .data import Run
from .league import BUDGET_UNITS, League, Member, budget_note, budget_text, pm
from .recon import recon_section
from .svg import Series, dot_chart, line_chart, run_style

DASH = "—"

CSS = """
:root { --fg:#1d2330; --muted:#5d6675; --line:#d9dde4; --bg:#ffffff; --head:#f3f5f8; }
* { box-sizing: border-box; }
body { margin: 0; padding: 22px 26px 40px; font: 13px/1.4 system-ui, -apple-system, "Segoe UI",
       "DejaVu Sans", sans-serif; color: var(--fg); background: var(--bg); }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 17px; margin: 28px 0 10px; }
.meta { color: var(--muted); margin: 0 0 6px; }
.table-wrap { overflow-x: auto; border: 1px solid var(--line); border-radius: 6px; }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
th, td { padding: 5px 6px; border-bottom: 1px solid var(--line); text-align: right; }
td { white-space: nowrap; }
td .sub { white-space: normal; }
th { background: var(--head); font-weight: 600; vertical-align: bottom; cursor: pointer; user-select: none; }
th .unit { display: block; font-weight: 400; color: var(--muted); font-size: 11.5px; }
th.sorted-asc::after { content: " \\25B2"; font-size: 10px; }
th.sorted-desc::after { content: " \\25BC"; font-size: 10px; }
td.text, th.text { text-align: left; }
tbody tr:last-child td { border-bottom: none; }
tbody tr:hover, tbody tr.hl { background: #eef4fb; }
.swatch { display: inline-block; width: 18px; height: 4px; border-radius: 2px; vertical-align: middle;
          margin-right: 7px; }
.sub { color: var(--muted); font-size: 11.5px; }
.na { color: #9aa1ac; }
.sub.warn { color: #b3261e; }
.plots { display: grid; grid-template-columns: repeat(auto-fit, minmax(560px, 1fr)); gap: 20px; }
figure { margin: 0; border: 1px solid var(--line); border-radius: 6px; padding: 8px; }
figcaption { color: var(--muted); font-size: 12.5px; padding: 2px 6px 4px; }
svg.chart { width: 100%; height: auto; display: block; font-family: inherit; }
svg .chart-title { font-size: 15px; font-weight: 600; fill: var(--fg); }
svg .plot-bg { fill: #fbfcfd; }
svg .grid line { stroke: #e6e9ee; stroke-width: 1; }
svg .axes line { stroke: #5d6675; stroke-width: 1; }
svg .tick { font-size: 11.5px; fill: var(--muted); }
svg .tick.x { text-anchor: middle; }
svg .tick.y { text-anchor: end; }
svg .axis-label { font-size: 12.5px; fill: var(--fg); text-anchor: middle; }
svg .curve { fill: none; stroke-width: 2; stroke-linejoin: round; stroke-linecap: round; }
svg .marker { stroke: #fff; stroke-width: 1; }
svg .hline line { stroke: #7a818c; stroke-dasharray: 5 4; stroke-width: 1.2; }
svg .hline text { font-size: 11.5px; fill: #5d6675; text-anchor: end; }
svg .no-data { font-size: 13px; fill: var(--muted); text-anchor: middle; }
svg .legend text { font-size: 12px; fill: var(--fg); }
svg .legend line { stroke-width: 3; }
svg .legend-item.empty text { fill: #9aa1ac; font-style: italic; }
svg .run, svg .legend-item { transition: opacity .15s; }
svg.dimmed .run:not(.hl), svg.dimmed .legend-item:not(.hl) { opacity: .18; }
dl.notes { display: grid; grid-template-columns: max-content 1fr; gap: 4px 16px; margin: 0; }
dl.notes dt { font-weight: 600; }
dl.notes dd { margin: 0; color: var(--muted); }
ul.paths { margin: 0; padding-left: 18px; color: var(--muted); font-size: 13px; }
code { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 12.5px; }
.multiples { display: grid; grid-template-columns: repeat(auto-fill, minmax(440px, 1fr)); gap: 14px; }
"""

# Sort a table.sortable on header click; hover on a row or legend entry highlights that run in every plot.
JS = """
(function () {
  function sortable(table) {
    var body = table.tBodies[0];
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, col) {
      th.addEventListener("click", function () {
        var asc = !th.classList.contains("sorted-asc");
        Array.prototype.forEach.call(th.parentNode.cells, function (c) {
          c.classList.remove("sorted-asc", "sorted-desc");
        });
        th.classList.add(asc ? "sorted-asc" : "sorted-desc");
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (a, b) {
          var x = a.cells[col].getAttribute("data-sort"), y = b.cells[col].getAttribute("data-sort");
          var nx = parseFloat(x), ny = parseFloat(y);
          var bothNum = !isNaN(nx) && !isNaN(ny);
          if (x === "" || y === "") { return x === y ? 0 : (x === "" ? 1 : -1); }
          var r = bothNum ? nx - ny : String(x).localeCompare(String(y));
          return asc ? r : -r;
        });
        rows.forEach(function (r) { body.appendChild(r); });
      });
    });
  }
  Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), sortable);
  var bodyRows = document.querySelectorAll("table.sortable tbody tr");
  var charts = document.querySelectorAll("svg.chart");
  function highlight(run) {
    Array.prototype.forEach.call(charts, function (svg) {
      svg.classList.toggle("dimmed", run !== null);
      Array.prototype.forEach.call(svg.querySelectorAll("[data-run]"), function (el) {
        el.classList.toggle("hl", el.getAttribute("data-run") === run);
      });
    });
    Array.prototype.forEach.call(bodyRows, function (r) {
      r.classList.toggle("hl", r.getAttribute("data-run") === run);
    });
  }
  var hoverables = Array.prototype.slice.call(bodyRows).concat(
    Array.prototype.slice.call(document.querySelectorAll("svg .legend-item, svg .run")));
  hoverables.forEach(function (el) {
    el.addEventListener("mouseenter", function () { highlight(el.getAttribute("data-run")); });
    el.addEventListener("mouseleave", function () { highlight(null); });
  });
  Array.prototype.forEach.call(charts, function (svg) {  // rendered size, read by the browser test
    var box = svg.getBoundingClientRect();
    svg.setAttribute("data-rendered", Math.round(box.width) + "x" + Math.round(box.height));
  });
  document.documentElement.setAttribute("data-report-ready", "1");
})();
"""


def _fmt(v: float | int | None, digits: int = 2, unit: str = "") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return f'<span class="na">{DASH}</span>'
    return f"{v:,.{digits}f}{unit}"


def _sub(*parts: str, cls: str = "sub") -> str:
    """A second, smaller line; each part stays on one line, the line may break between parts."""
    parts = tuple(p for p in parts if p)
    if not parts:
        return ""
    return f'<br><span class="{cls}">' + " &middot; ".join(p.replace(" ", "&nbsp;") for p in parts) + "</span>"


def _hours(v: float | None) -> str:
    """Device-hours with a precision that suits CPU minutes and GPU weeks alike (never 1e-05 style)."""
    if v is None:
        return f'<span class="na">{DASH}</span>'
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 1 or v == 0:
        return f"{v:.2f}" if v else "0"
    return f"{v:.{2 - math.floor(math.log10(v))}f}"


def _duration(device_hours: float | None) -> str:
    """Device-minutes/-seconds for amounts under an hour ("" otherwise)."""
    if device_hours is None or device_hours >= 1:
        return ""
    secs = device_hours * 3600
    return f"{secs / 60:.1f} min" if secs >= 60 else f"{secs:.1f} s"


def _td(html: str, sort: float | int | str | None, cls: str = "") -> str:
    key = "" if sort is None or (isinstance(sort, float) and not math.isfinite(sort)) else sort
    c = f' class="{cls}"' if cls else ""
    return f'<td{c} data-sort="{escape(str(key))}">{html}</td>'


def _model(r: Run) -> str:
    if not r.arch:
        return f'<span class="na">{DASH}</span>'
    geo = f"/{r.patch_size}" if r.patch_size else ""
    px = f' <span class="sub">@{r.img_size}px</span>' if r.img_size else ""
    params = f"{r.params_total / 1e6:.1f}M params" if r.params_total else ""
    return f"{escape(str(r.arch))}{escape(geo)}{px}{_sub(params)}"


def _time_to_target(r: Run) -> tuple[str, float | None]:
    if r.target is None:
        return f'<span class="na">{DASH}</span>', None
    if r.time_to_target_h is not None:
        at = "at init" if r.time_to_target_step == 0 else f"step {r.time_to_target_step:,}"
        return _hours(r.time_to_target_h) + _sub(at), r.time_to_target_h
    if not r.knn_curve:
        return '<span class="na">no eval</span>', None
    return '<span class="na">not reached</span>', None


def _final(best: float | None, final: float | None) -> str:
    """The final value under a best-of-run cell."""
    return _sub(f"final {final:.2f}") if best is not None and final is not None else ""


def _row(i: int, r: Run) -> str:
    colour, _ = run_style(i)
    label = f'<span class="swatch" style="background:{colour}"></span>{escape(r.label)}' + (
        "" if r.finished else _sub("unfinished")
    )
    steps = ""
    if r.steps is not None:
        of = f" / {r.total_steps:,}" if r.total_steps and r.total_steps != r.steps else ""
        steps = f"{r.steps:,}{of} steps"
    devices = f"{r.world_size} device{'s' if r.world_size != 1 else ''}" if r.world_size else ""
    ratio = f"{r.mae_equiv_ratio:.2f}\u00d7 MAE" if r.mae_equiv_ratio is not None else ""
    init = f"init {r.knn_init:.2f}" if r.knn_best is not None and r.knn_init is not None else ""
    tflops = f"{r.tflops_per_device:.3g} TFLOP/s/dev" if r.tflops_per_device is not None else ""
    bad = f"{r.loss_nonfinite} NaN/inf" if r.loss_nonfinite else ""
    ttt, ttt_sort = _time_to_target(r)
    mfu = None if r.mfu is None else 100.0 * r.mfu
    cells = [
        _td(label, r.label, "text"),
        _td(escape(r.objective or DASH), r.objective, "text"),
        _td(_model(r) + _sub(*(escape(x) for x in (r.data or "").split(", "))), r.arch, "text"),
        _td(_fmt(r.epochs, 2) + _sub(steps), r.epochs),
        _td(_fmt(r.mae_equiv_epochs, 2) + _sub(ratio), r.mae_equiv_epochs),
        _td(_hours(r.device_hours) + _sub(devices, _duration(r.device_hours)), r.device_hours),
        _td(_fmt(r.knn_best) + _sub(init), r.knn_best),
        _td(_fmt(r.linear_best) + _final(r.linear_best, r.linear_final), r.linear_best),
        _td(_fmt(r.finetune_best) + _final(r.finetune_best, r.finetune_final), r.finetune_best),
        _td(ttt, ttt_sort),
        _td(_fmt(r.img_per_s, 1) + _sub(tflops), r.img_per_s),
        _td(_fmt(mfu, 1), mfu),
        _td(_fmt(r.mem_peak_gb, 2), r.mem_peak_gb),
        _td(_fmt(r.final_loss, 4) + _sub(bad, cls="sub warn"), r.final_loss),
    ]
    return f'<tr data-run="{i}">' + "".join(cells) + "</tr>"


def _header(target: float | None) -> str:
    ttt = f"Time to {target:g}%" if target is not None else "Time to target"
    cols = [
        ("Run", "", "text"),
        ("Objective", "", "text"),
        ("Model", "", "text"),
        ("Epochs", "trained", ""),
        ("MAE-eq. epochs", "at MAE cost", ""),
        ("Compute", "device-hours", ""),
        ("kNN top-1", "best, %", ""),
        ("Linear top-1", "best, %", ""),
        ("Fine-tune top-1", "best, %", ""),
        (ttt, "kNN, device-h", ""),
        ("Throughput", "img/s", ""),
        ("MFU", "%", ""),
        ("Peak memory", "GB, rank 0", ""),
        ("Final loss", "train", ""),
    ]
    return _head_row(cols)


def _head_row(cols: list[tuple[str, str, str]]) -> str:
    """A header row from (name, unit, css class) per column."""
    cells = []
    for name, unit, cls in cols:
        u = f'<span class="unit">{escape(unit)}</span>' if unit else ""
        c = f' class="{cls}"' if cls else ""
        cells.append(f'<th{c} title="click to sort">{escape(name)}{u}</th>')
    return "<tr>" + "".join(cells) + "</tr>"


def _plots(runs: list[Run], target: float | None) -> str:
    acc = [
        Series(
            r.label,
            i,
            [(h, v) for _, h, v in r.knn_curve if h is not None],
            empty_note="no eval points",
            tooltip="{label}: {y}% at {x} device-hours",
        )
        for i, r in enumerate(runs)
    ]
    loss = [
        Series(r.label, i, [(s, v) for s, v in r.loss_curve], empty_note="no loss logged") for i, r in enumerate(runs)
    ]
    hline = (target, f"target {target:g}%") if target is not None else None
    acc_svg = line_chart(
        acc,
        chart_id="plot-acc",
        title="kNN top-1 vs compute",
        x_label="device-hours",
        y_label="kNN top-1 (%)",
        markers=True,
        hline=hline,
    )
    loss_svg = line_chart(
        loss,
        chart_id="plot-loss",
        title="Training loss vs step",
        x_label="optimizer step",
        y_label="train loss",
        x_from_zero=True,
    )
    return (
        f'<div class="plots"><figure>{acc_svg}<figcaption>One curve per run; points are kNN evaluations '
        "(step 0 = random init), placed at the device-hours the run had trained for at that step."
        f"</figcaption></figure><figure>{loss_svg}<figcaption>Training loss as logged every "
        "<code>train.log_every</code> steps (long runs are averaged into at most 1500 points)."
        "</figcaption></figure></div>"
    )


NOTES = [
    (
        "Device-hours",
        "training wall time &times; number of devices (ranks), from <code>time/device_hours</code>; "
        "evaluation pauses inside the loop count, start-up does not.",
    ),
    (
        "MAE-eq. epochs",
        "epochs &times; FLOPs per image of the run's objective / FLOPs per image of MAE with its "
        "default knobs (mask 0.75, 512-d &times; 8-block decoder) on the same encoder: the "
        "compute yardstick of the EMAE paper.",
    ),
    (
        "Time to target",
        "device-hours at the first kNN evaluation whose top-1 reaches the target (<code>--target</code>).",
    ),
    (
        "Throughput",
        "median of the logged global images/s; achieved TFLOP/s = FLOPs per image &times; img/s "
        "/ devices; MFU only when the run logs <code>perf/mfu</code>.",
    ),
    ("Peak memory", "largest <code>perf/mem_peak_gb</code> logged on rank 0 (GPU: max allocated; CPU: peak RSS)."),
]


def render(
    runs: list[Run],
    target: float | None = None,
    generated: str | None = None,
    bench: dict | None = None,
    refresh: float | None = None,
) -> str:
    """The whole report as one HTML document. ``refresh``: seconds between reloads in the browser while a run
    is unfinished (a live dashboard); a report of finished runs is static."""
    generated = generated or _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    title = f"mimscale report — {len(runs)} run{'s' if len(runs) != 1 else ''}"
    live = refresh if refresh and not all(r.finished for r in runs) else None
    if live:
        title += f" (live: step {max((r.steps or 0) for r in runs):,})"
    target_txt = f"target kNN top-1 {target:g}%" if target is not None else "no accuracy target (--target)"
    rows = "\n".join(_row(i, r) for i, r in enumerate(runs))
    notes = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in NOTES)
    paths = "".join(f"<li><code>{escape(r.label)}</code>: <code>{escape(r.path)}</code></li>" for r in runs)
    return _page(
        title,
        f"""{_live_note(live)}<p class="meta">Generated {escape(generated)} &middot; {escape(target_txt)} &middot; objectives:
{escape(", ".join(sorted({r.objective or "?" for r in runs})))}</p>
<h2>Runs</h2>
<div class="table-wrap">
<table id="runs" class="sortable">
<thead>{_header(target)}</thead>
<tbody>
{rows}
</tbody>
</table>
</div>
<h2>Curves</h2>
{_plots(runs, target)}
{recon_section(runs)}{bench_section(bench) if bench else ""}<h2>Notes</h2>
<dl class="notes">{notes}</dl>
<h2>Run directories</h2>
<ul class="paths">{paths}</ul>
""",
        refresh=live,
    )


def _live_note(refresh: float | None) -> str:
    if not refresh:
        return ""
    now = _dt.datetime.now().strftime("%H:%M:%S")
    return (
        f'<p class="meta" id="live">Live: updated {now}; this page reloads every {refresh:g} s until every run '
        "has finished, then it stays as it is.</p>"
    )


def _page(title: str, body: str, refresh: float | None = None) -> str:
    """The HTML document around ``body``: inline style, the title as <h1>, the inline script at the end;
    ``refresh``: the browser reloads it every that many seconds (a live dashboard)."""
    meta = f'\n<meta http-equiv="refresh" content="{refresh:g}">' if refresh else ""
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">{meta}
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)}</title>
<style>{CSS}</style>
</head>
<body>
<h1>{escape(title)}</h1>
{body}<script>{JS}</script>
</body>
</html>
"""


# ----------------------------------------------------------------------- league report (mimscale compare)

LEAGUE_NOTES = [
    (
        "Target",
        "the best kNN top-1 that every finished member reaches: the lowest of the finished members' best "
        "kNN top-1 (<code>--target</code> replaces it), but only when it is above the best random-init kNN "
        "top-1; otherwise there is no common target and no time-to-target ranking.",
    ),
    (
        "Seeds",
        "with several seeds per member (<code>mimscale compare --seeds K</code>: other init, data order and "
        "masks) a cell shows the mean &plusmn; the sample standard deviation, and the kNN cell each seed's "
        "value; rankings use the mean. <b>Within noise</b>: Welch's two-sided t-test on the per-seed final "
        "kNN top-1 of two members gives p &ge; 0.05.",
    ),
    (
        "Training",
        "the training minutes each member achieved (evaluation and saving excluded) beside its budget, and "
        "what it used of the budget in the budget's own unit (training minutes, or the MAE-equivalent epochs "
        "it trained for a FLOP budget): the worst seed's deviation.",
    ),
    (
        "Time to target",
        "training device-hours (and step) at a member's first kNN evaluation at or above the target.",
    ),
    (
        "Teacher cost",
        "device-hours of the teacher steps a member needs (CLIP training; k-means + codes for k-CLIP), "
        "from <code>teachers/&lt;step&gt;/cost.json</code>; a teacher shared by two members counts for each.",
    ),
    ("Total", "training device-hours + teacher device-hours."),
    (
        "Ranking",
        "finished members only, by final kNN top-1, and by time to target + teacher device-hours (members "
        "that never reach the target last); unfinished and pending members follow in plan order, unranked.",
    ),
    ("Device-hours", NOTES[0][1]),
    (NOTES[3][0], NOTES[3][1]),
    (NOTES[4][0], NOTES[4][1]),
]


def _budget(plan: dict) -> str:
    b = plan.get("budget") or {}
    kind = str(b.get("kind"))
    unit = {"minutes": "training minutes", "mae_epochs": "MAE-equivalent epochs"}.get(kind, kind)
    value = b.get("value")
    if value is None:
        return "budget not stated"
    return f"budget {value:g} {unit} per member" if isinstance(value, (int, float)) else f"budget {value} {unit}"


def _encoder(league: League) -> str:
    r = next((m.run for m in league.members if m.run is not None and m.run.arch), None)
    if r is None:
        return DASH
    params = f", {r.params_total / 1e6:.1f}M params" if r.params_total else ""
    return f"{r.arch}/{r.patch_size} @{r.img_size}px{params}"


def _league_meta(league: League) -> str:
    plan, data = league.plan, league.plan.get("data") or {}
    recipe = escape(str(plan.get("recipe") or plan.get("spec") or "?"))
    over = " ".join(escape(str(o)) for o in plan.get("overrides") or [])
    data_txt = " &middot; ".join(f"{escape(k)} <code>{escape(str(v))}</code>" for k, v in data.items()) or DASH
    if league.target is not None:
        target = f"target kNN top-1 {league.target:.2f}% ({escape(league.target_source)})"
    else:
        target = escape(league.target_source or "no common target")
    seeds = league.seeds
    if seeds > 1:
        target += f" &middot; {seeds} seeds per member: mean &plusmn; std; within noise: {escape(league.noise_test)}"
    lines = [
        f"{escape(_budget(plan))} &middot; recipe <code>{recipe}</code>" + (f" + <code>{over}</code>" if over else ""),
        f"data: {data_txt}",
        f"encoder: {escape(_encoder(league))} &middot; spec <code>{escape(str(plan.get('spec', '?')))}</code>",
        target,
        *[escape(n) for n in [budget_note(league)] if n],
    ]
    return "".join(f'<p class="meta">{line}</p>' for line in lines)


def _member_label(m: Member) -> str:
    colour, _ = run_style(m.index)
    status = "" if m.finished else _sub(m.status + (f" {m.seeds_done}/{m.seeds} seeds" if m.seeds > 1 else ""))
    return f'<span class="swatch" style="background:{colour}"></span>{escape(m.name)}{status}'


def _member_ttt(m: Member, target: float | None) -> str:
    if target is None:
        return f'<span class="na">{DASH}</span>'
    if m.ttt_h is not None:
        return _dh(m.ttt_h) + _sub("at init" if m.ttt_step == 0 else f"step {m.ttt_step:,}")
    if m.run is None or not m.run.knn_curve:
        return '<span class="na">no eval</span>'
    return '<span class="na">not reached</span>'


def _dh(h: float | None) -> str:
    """Device-hours with their unit."""
    return _hours(h) + ("" if h is None else " device-h")


def _ranks(league: League, order: list[str]) -> dict[str, int]:
    finished = {m.name for m in league.members if m.finished}
    return {name: i + 1 for i, name in enumerate(n for n in order if n in finished)}


def _pm(mean: float | None, std: float | None, digits: int = 2, unit: str = "") -> str:
    return f'<span class="na">{DASH}</span>' if mean is None else escape(pm(mean, std, digits, unit))


def _league_row(m: Member, rank: int | None, target: float | None, budget: str = "") -> str:
    mfu = None if m.mfu is None else 100.0 * m.mfu
    gflops = f"{m.flops_per_sample / 1e9:.3g} GFLOP/img" if m.flops_per_sample else ""
    best = f"best {pm(m.knn_best, m.knn_best_std, 2, '%')}" if m.knn_best is not None else ""
    seeds = "seeds " + ", ".join(f"{v:.2f}" for v in m.knn_final_seeds) if m.seeds > 1 and m.knn_final_seeds else ""
    lin_seeds = "seeds " + ", ".join(f"{v:.2f}" for v in m.linear_seeds) if m.seeds > 1 and m.linear_seeds else ""
    mins = "seeds " + ", ".join(f"{v:.2f}" for v in m.train_minutes_seeds) if m.seeds > 1 else ""
    if m.budget_dev is not None:
        flops = m.budget_unit == BUDGET_UNITS["mae_epochs"]
        used = f"{m.budget_used:.4g} {m.budget_unit}, " if flops and m.budget_used is not None else ""
        budget = f"{budget}; used {used}{100 * m.budget_dev:+.1f} %"
    noise = ", ".join(escape(n) for n in m.noise_peers) or DASH if m.finished and m.seeds > 1 else DASH
    cells = [
        _td(f"#{rank}" if rank else DASH, rank),
        _td(_member_label(m), m.name, "text"),
        _td(escape(m.objective or DASH), m.objective, "text"),
        _td(_pm(m.knn_final, m.knn_final_std, 2, "%") + _sub(best, seeds), m.knn_final),
        _td(_pm(m.linear_top1, m.linear_std, 2, "%") + _sub(lin_seeds), m.linear_top1),
        _td(noise, len(m.noise_peers), "text"),
        _td(_member_ttt(m, target), m.ttt_h),
        _td(
            _pm(m.train_minutes, m.train_minutes_std, 2, "min") + _sub(f"budget {budget}" if budget else "", mins),
            m.train_minutes,
        ),
        _td(_pm(m.img_per_s, None, 1, "img/s"), m.img_per_s),
        _td(_pm(mfu, None, 1, "%"), mfu),
        _td(_pm(m.mem_peak_gb, None, 2, "GB"), m.mem_peak_gb),
        _td(_fmt(m.flops_ratio, 2, "\u00d7 MAE") + _sub(gflops), m.flops_ratio),
        _td(_dh(m.train_h) + _sub(_duration(m.train_h)), m.train_h),
        _td(_dh(m.teacher_h) + _sub(", ".join(m.teachers)), m.teacher_h),
        _td(_dh(m.total_h), m.total_h),
    ]
    return f'<tr data-run="{m.index}">' + "".join(cells) + "</tr>"


def _teacher_row(m: Member, rank: int | None, target: float | None, budget: str = "") -> str:
    cells = [
        _td(f"#{rank}" if rank else DASH, rank),
        _td(_member_label(m), m.name, "text"),
        _td(_dh(m.ttt_total_h) if m.ttt_h is not None else _member_ttt(m, target), m.ttt_total_h),
        _td(_member_ttt(m, target), m.ttt_h),
        _td(_dh(m.teacher_h) + _sub(", ".join(m.teachers)), m.teacher_h),
        _td(_dh(m.total_h), m.total_h),
        _td(_pm(m.knn_final, m.knn_final_std, 2, "%"), m.knn_final),
    ]
    return f'<tr data-run="{m.index}">' + "".join(cells) + "</tr>"


LEAGUE_COLS = [
    ("#", "by mean kNN", ""),
    ("Member", "", "text"),
    ("Objective", "", "text"),
    ("kNN top-1", "final", ""),
    ("Linear top-1", "final", ""),
    ("Within noise of", "Welch p \u2265 0.05", "text"),
    ("Time to target", "kNN, training", ""),
    ("Training", "achieved vs budget", ""),
    ("Throughput", "median", ""),
    ("MFU", "", ""),
    ("Peak memory", "rank 0", ""),
    ("FLOPs / image", "vs reference", ""),
    ("Training", "compute", ""),
    ("Teacher", "compute", ""),
    ("Total", "compute", ""),
]
TEACHER_COLS = [
    ("#", "incl. teacher", ""),
    ("Member", "", "text"),
    ("Time to target + teacher", "compute", ""),
    ("Time to target", "training compute", ""),
    ("Teacher", "compute", ""),
    ("Total", "compute", ""),
    ("kNN top-1", "final", ""),
]


def _league_table(league: League, table_id: str, cols, order: list[str], row) -> str:
    by_name = {m.name: m for m in league.members}
    ranks, budget = _ranks(league, order), budget_text(league.plan.get("budget"))
    rows = "\n".join(row(by_name[n], ranks.get(n), league.target, budget) for n in order)
    return (
        f'<div class="table-wrap"><table id="{table_id}" class="sortable"><thead>{_head_row(cols)}</thead>'
        f"<tbody>\n{rows}\n</tbody></table></div>"
    )


def _member_series(m: Member) -> Series:
    pts = [(h, v) for _, h, v in m.run.knn_curve if h is not None] if m.run else []
    note = "no eval points" if m.run else m.status
    return Series(m.name, m.index, pts, empty_note=note, tooltip="{label}: {y}% at {x} device-hours")


def _league_plots(league: League) -> str:
    """kNN top-1 vs device-hours: all members on one chart, then one small chart each on shared axes."""
    series = [_member_series(m) for m in league.members]
    t = league.target
    hline = (t, f"target {t:.2f}%") if t is not None else None
    pts = [p for s in series for p in s.points]
    ys = [y for _, y in pts] + ([t] if t is not None else [])
    x_range = (0.0, max(x for x, _ in pts)) if pts else None
    y_range = (min(ys), max(ys)) if pts else None
    chart = functools.partial(line_chart, x_label="device-hours", y_label="kNN top-1 (%)", markers=True, hline=hline)
    big = chart(series, chart_id="plot-league", title="kNN top-1 vs training device-hours")
    small = [
        chart(
            [s],
            chart_id=f"plot-member-{m.index}",
            title=m.name + ("" if m.finished else f" ({m.status})"),
            x_range=x_range,
            y_range=y_range,
            width=480,
            plot_h=220,
            no_data=f"no kNN evaluation ({m.status})",
        )
        for m, s in zip(league.members, series)
    ]
    finals = dot_chart(
        [(m.name, m.index, [m.knn_final, m.linear_top1]) for m in league.members],
        ["kNN top-1, final", "linear top-1, final"],
        chart_id="plot-finals",
        title="Final top-1 per member",
        x_label="top-1 (%)",
    )
    return (
        f'<div class="plots"><figure>{big}<figcaption>One curve per member; points are kNN evaluations '
        "(step 0 = random init) at the training device-hours of their step; teacher cost is not included."
        f"</figcaption></figure><figure>{finals}<figcaption>Filled: kNN top-1 at the end of training; hollow: "
        "linear-probe top-1 (when probed). Unfinished members: their latest values.</figcaption></figure></div>"
        '\n<h2>Per member (same axes)</h2>\n<div class="multiples">'
        + "".join(f"<figure>{svg}</figure>" for svg in small)
        + "</div>"
    )


def _teacher_section(league: League) -> str:
    if league.target is None:
        why = league.target_source or "no common target"
        return f'<p class="meta" id="no-common-target">{escape(why[:1].upper() + why[1:])}.</p>'
    return _league_table(league, "league-teacher", TEACHER_COLS, league.rank_with_teacher, _teacher_row)


def render_league(
    league: League, generated: str | None = None, bench: dict | None = None, refresh: float | None = None
) -> str:
    """The league report of a compare directory as one HTML document (``refresh``: as for :func:`render`, while
    a member is unfinished)."""
    generated = generated or _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    title = f"mimscale league — {league.plan.get('spec') or Path(league.path).name}"
    live = refresh if refresh and not all(m.finished for m in league.members) else None
    if live:
        done = sum(m.seeds_done for m in league.members)
        title += f" (live: {done} of {sum(m.seeds for m in league.members)} runs done)"
    notes = [*LEAGUE_NOTES, ("FLOPs / image", f"relative to {escape(league.flops_reference)}.")]
    paths = "".join(
        f"<li><code>{escape(m.name)}</code>: <code>{escape(m.run.path)}</code></li>" for m in league.members if m.run
    )
    return _page(
        title,
        f"""{_live_note(live)}<p class="meta">Generated {escape(generated)} &middot; <code>{escape(league.path)}</code></p>
{_league_meta(league)}
<h2>League, ranked by final kNN top-1</h2>
{_league_table(league, "league", LEAGUE_COLS, league.rank_knn, _league_row)}
<h2>Ranked by time to target, teacher cost included</h2>
{_teacher_section(league)}
<h2>Curves</h2>
{_league_plots(league)}
{bench_section(bench) if bench else ""}<h2>Notes</h2>
<dl class="notes">{"".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in notes)}</dl>
<h2>Member run directories</h2>
<ul class="paths">{paths}</ul>
""",
        refresh=live,
    )
