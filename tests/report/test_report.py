"""`mimscale report`: report.json numbers, self-contained report.html, and the page in a real headless Chromium.

The run directories are written with the project's own writers (``config.save_resolved`` for
config.yaml, ``MetricLogger`` for metrics.jsonl, the objectives' ``flops_per_sample`` for
summary.json), with numbers shaped like real runs: kNN at step 0 (random init) and every 100
steps, the training log every 20 steps, uneven step times, a NaN loss, an unfinished run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
import yaml

from mimscale import config as C
from mimscale.cli import main
from mimscale.models import build_vit
from mimscale.objectives import available, build_objective
from mimscale.objectives.mae import MAE
from mimscale.report import load_runs, write_report
from mimscale.report.data import _device_hours_track, _interp, _objective_flops
from mimscale.report.svg import run_style
from mimscale.telemetry import MetricLogger

CHROMIUM = "/usr/bin/chromium"
SAMPLES_PER_EPOCH = 12800  # batch 64 -> 200 steps per epoch; 2 epochs -> 400 steps
DEFAULT_KNOBS = ["objective.decoder_dim=512", "objective.decoder_depth=8", "objective.decoder_heads=16"]
SECOND = "emae" if "emae" in available() else "mae"
TARGET = 55.0


def _flops(cfg: C.Config) -> float:
    with torch.device("meta"):
        enc = build_vit(cfg.model.arch, cfg.model.img_size, cfg.model.patch_size, cfg.model.in_chans)
        return build_objective(cfg.objective["name"], enc, C.objective_knobs(cfg)).flops_per_sample()


def _mae_default_flops() -> float:
    with torch.device("meta"):
        return MAE(build_vit("vit_micro", 32, 4, 3), MAE.Config()).flops_per_sample()


def make_run(
    rd: Path,
    objective: str,
    knobs: list[str],
    *,
    world: int,
    steps: int,
    sec_per_step: float,
    knn: dict[int, float],
    finished: bool,
    loss: tuple[float, float, float],
    nan_loss_at: int | None = None,
    mfu: float | None = None,
) -> dict:
    """A run directory as the train loop leaves it; returns what the test needs to check against."""
    cfg = C.load(
        "tiny_cpu",
        [
            f"train.run_dir={rd}",
            "model.arch=vit_micro",
            f"objective.name={objective}",
            "train.epochs=2",
            "train.batch_size=64",
            f"train.micro_batch_size={64 // world}",
            "log.wandb=disabled",
            *knobs,
        ],
    )
    derived = C.derive(cfg, world, SAMPLES_PER_EPOCH)
    C.save_resolved(cfg, derived, rd / "config.yaml")
    flops = _flops(cfg)
    logged = []  # (step, device_hours) of the training log
    elapsed, peak = 0.0, 1.5
    with MetricLogger(rd, tensorboard=False, wandb="disabled") as log:
        if 0 in knn:
            log.log({"eval/knn_top1": knn[0], "eval/knn_bank": 5000.0, "eval/knn_queries": 5000.0}, step=0)
        for step in range(1, steps + 1):
            elapsed += sec_per_step * (1.3 if step % 7 == 0 else 1.0)  # uneven steps: interpolation matters
            if step % 20 == 0 or step == steps:
                floor, scale, decay = loss
                value = float("nan") if step == nan_loss_at else floor + scale * decay**step
                peak = max(peak, 1.5 + 0.01 * (step % 50))
                log.log(
                    {
                        "train/loss": value,
                        "train/lr": 1e-3,
                        "train/wd": 0.05,
                        "train/epoch": step / derived.steps_per_epoch,
                        "perf/img_per_s": 64 / sec_per_step * (0.97 if step % 60 else 1.0),
                        "perf/step_time_s": sec_per_step,
                        "perf/mem_allocated_gb": 1.2,
                        "perf/mem_peak_gb": peak,
                        "perf/mem_reserved_gb": 1.3,
                        "time/elapsed_s": elapsed,
                        "time/device_hours": elapsed * world / 3600.0,
                        "perf/train_pflops": flops * step * 64 / 1e15,
                        **({"perf/mfu": mfu} if mfu is not None else {}),
                    },
                    step=step,
                )
                logged.append((step, elapsed * world / 3600.0))
            if step in knn and step != 0:
                log.log({"eval/knn_top1": knn[step], "eval/knn_bank": 5000.0, "eval/knn_queries": 5000.0}, step=step)
    if finished:
        (rd / "summary.json").write_text(
            json.dumps(
                {
                    "objective": objective,
                    "arch": "vit_micro",
                    "world_size": world,
                    "total_steps": derived.total_steps,
                    "flops_per_sample": flops,
                    "params_total": 214_000,
                    "params_per_rank": [214_000] * world,
                    "knn_top1_init": knn.get(0),
                    "final_loss": 0.41,
                    "steps": steps,
                    "train_seconds": elapsed,
                    "img_per_s": 64 / sec_per_step,
                    "knn_top1_final": knn.get(steps),
                }
            )
        )
    return {
        "dir": rd,
        "flops": flops,
        "logged": logged,
        "world": world,
        "peak": peak,
        "steps_per_epoch": derived.steps_per_epoch,
        "total_steps": derived.total_steps,
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[dict]:
    root = tmp_path_factory.mktemp("runs")
    return [
        # MAE with its default knobs: MAE-equivalent epochs == epochs
        make_run(
            root / "mae_micro",
            "mae",
            DEFAULT_KNOBS,
            world=8,
            steps=400,
            sec_per_step=4.0,
            knn={0: 10.2, 100: 31.0, 200: 44.5, 300: 51.0, 400: 55.6},
            finished=True,
            loss=(0.42, 0.9, 0.985),
        ),
        # EMAE (K=4 parts): ~4x the compute per image, reaches the target earlier in steps
        make_run(
            root / f"{SECOND}_micro",
            SECOND,
            DEFAULT_KNOBS,
            world=8,
            steps=400,
            sec_per_step=11.0,
            knn={0: 10.2, 100: 42.0, 200: 56.5, 300: 60.1, 400: 61.8},
            finished=True,
            loss=(0.55, 1.2, 0.99),
            mfu=0.412,
        ),  # an engine that knows the device peak logs MFU
        # killed early, no kNN configured, one diverged log line, small decoder: degrades gracefully
        make_run(
            root / "mae_nodecoder_killed",
            "mae",
            [],
            world=2,
            steps=130,
            sec_per_step=1.5,
            knn={},
            finished=False,
            loss=(0.7, 0.8, 0.975),
            nan_loss_at=60,
        ),
    ]


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("report")
    rc = main(["report", *(str(r["dir"]) for r in runs), "--out", str(out), "--target", str(TARGET)])
    assert rc == 0
    return {"out": out, "html": out / "report.html", "json": json.loads((out / "report.json").read_text())}


# ----------------------------------------------------------------------------------------- report.json


def test_json_one_entry_per_run(runs, report):
    doc = report["json"]
    assert doc["target"] == TARGET
    assert [e["path"] for e in doc["runs"]] == [str(r["dir"].resolve()) for r in runs]
    assert [e["label"] for e in doc["runs"]] == ["mae_micro", f"{SECOND}_micro", "mae_nodecoder_killed"]
    assert [e["objective"] for e in doc["runs"]] == ["mae", SECOND, "mae"]
    for e, r in zip(doc["runs"], runs):
        assert e["arch"] == "vit_micro" and e["patch_size"] == 4 and e["img_size"] == 32
        assert e["world_size"] == r["world"]
        assert e["device_hours"] == pytest.approx(r["logged"][-1][1])
        assert e["mem_peak_gb"] == pytest.approx(r["peak"])
        assert e["flops_per_sample"] == pytest.approx(r["flops"])
    mae, second, killed = doc["runs"]
    assert mae["finished"] and second["finished"] and not killed["finished"]
    assert mae["epochs"] == pytest.approx(2.0) and mae["steps"] == 400 == mae["total_steps"]
    assert killed["steps"] == 130 and killed["epochs"] == pytest.approx(130 / 200) and killed["epochs_planned"] == 2
    assert mae["knn_init"] == 10.2 and mae["knn_best"] == 55.6 and mae["knn_best_step"] == 400
    assert second["knn_best"] == 61.8 and killed["knn_best"] is None and killed["knn_curve"] == []
    assert all(e["linear_best"] is None for e in doc["runs"])
    assert mae["mfu"] is None and second["mfu"] == pytest.approx(0.412) and killed["mfu"] is None
    assert mae["img_per_s"] == pytest.approx(64 / 4.0 * 0.97)  # median of the logged rate
    assert mae["tflops_per_device"] == pytest.approx(runs[0]["flops"] * mae["img_per_s"] / 8 / 1e12)
    assert killed["final_loss"] == pytest.approx(0.7 + 0.8 * 0.975**130)  # no summary: last logged loss
    assert killed["loss_nonfinite"] == 1 and mae["loss_nonfinite"] == 0


def test_json_mae_equivalent_epochs(runs, report):
    mae_ref = _mae_default_flops()
    for e, r in zip(report["json"]["runs"], runs):
        assert e["mae_flops_per_sample"] == pytest.approx(mae_ref)
        assert e["mae_equiv_ratio"] == pytest.approx(r["flops"] / mae_ref)
        assert e["mae_equiv_epochs"] == pytest.approx(e["epochs"] * r["flops"] / mae_ref)
    mae, second, killed = report["json"]["runs"]
    assert mae["mae_equiv_ratio"] == pytest.approx(1.0) and mae["mae_equiv_epochs"] == pytest.approx(2.0)
    if SECOND == "emae":  # K = 4 parts, each an MAE-sized pass (patch embedding shared): a bit under 4x
        assert 3.0 < second["mae_equiv_ratio"] < 4.0
    # the killed run has no summary.json: its FLOPs come from the logged perf/train_pflops
    assert killed["mae_equiv_ratio"] < 0.5  # 128-d x 2-block decoder instead of 512-d x 8


def test_flops_from_config_alone(runs):
    """Last resort for a run without summary.json or perf/train_pflops: rebuild its objective (meta device)."""
    for r in runs:
        cfg = yaml.safe_load((r["dir"] / "config.yaml").read_text())
        assert _objective_flops(cfg) == pytest.approx(r["flops"])
    with pytest.warns(RuntimeWarning, match="no_such_objective"):
        assert _objective_flops({"objective": {"name": "no_such_objective"}, "model": {}}) is None


def test_json_time_to_target(runs, report):
    mae, second, killed = report["json"]["runs"]
    # MAE first reaches 55% at its last eval (step 400): the last logged device-hours
    assert mae["target_reached"] and mae["time_to_target_step"] == 400
    assert mae["time_to_target_h"] == pytest.approx(runs[0]["logged"][-1][1])
    # the second run at step 200, which is a log step too
    assert second["target_reached"] and second["time_to_target_step"] == 200
    assert second["time_to_target_h"] == pytest.approx(dict(runs[1]["logged"])[200])
    assert killed["target_reached"] is False and killed["time_to_target_h"] is None
    # eval points sit at the device-hours of their step (step 0 = random init = 0 h)
    assert [p[0] for p in mae["knn_curve"]] == [0, 100, 200, 300, 400]
    assert mae["knn_curve"][0][1] == 0.0
    assert mae["knn_curve"][2][1] == pytest.approx(dict(runs[0]["logged"])[200])


def test_json_no_target(runs, tmp_path):
    write_report([runs[0]["dir"]], tmp_path, target=None)
    e = json.loads((tmp_path / "report.json").read_text())["runs"][0]
    assert e["target"] is None and e["time_to_target_h"] is None and e["target_reached"] is None
    assert "Time to target" in (tmp_path / "report.html").read_text()


def test_device_hours_interpolation_and_restart():
    # a resumed attempt restarts the logged clock: the track keeps increasing
    train = [
        {"step": 10, "time/device_hours": 1.0},
        {"step": 20, "time/device_hours": 2.0},
        {"step": 30, "time/device_hours": 0.5},
        {"step": 40, "time/device_hours": 1.5},
    ]
    track = _device_hours_track(train)
    assert track == [(10, 1.0), (20, 2.0), (30, 2.5), (40, 3.5)]
    assert _interp(track, 0) == 0.0 and _interp(track, 5) == pytest.approx(0.5)
    assert _interp(track, 25) == pytest.approx(2.25) and _interp(track, 50) == 3.5
    assert _interp([], 10) is None


def test_duplicate_run_names_get_told_apart(tmp_path, runs):
    for parent in ("a", "b"):
        shutil.copytree(runs[2]["dir"], tmp_path / parent / "run")
    labels = [r.label for r in load_runs([tmp_path / "a" / "run", tmp_path / "b" / "run"])]
    assert labels == ["a/run", "b/run"]


# ----------------------------------------------------------------------------------------- report.html


class _Page(HTMLParser):
    """Collects what the tests look at: table rows, SVG curves/markers/legend per chart, attributes."""

    def __init__(self):
        super().__init__()
        self.rows, self.charts, self.attrs = [], {}, {}
        self.tables: dict[str | None, list[dict]] = {}  # tbody rows per table id
        self.chart = None
        self.in_tbody = False
        self.title = ""
        self._in_title = self._in_tick = False
        self._table = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.attrs.setdefault(tag, []).append(a)
        if tag == "title" and self.chart is None:
            self._in_title = True
        if tag == "table":
            self._table = a.get("id")
        if tag == "tbody":
            self.in_tbody = True
        if tag == "tr" and self.in_tbody:
            self.rows.append(a)
            self.tables.setdefault(self._table, []).append(a)
        if tag == "svg":
            self.chart = self.charts.setdefault(
                a.get("id"), {"curves": [], "markers": 0, "legend": [], "ticks": 0, "tick_labels": []}
            )
        if self.chart is not None:
            cls = (a.get("class") or "").split()
            if tag == "path" and "curve" in cls:
                self.chart["curves"].append(a)
            if tag == "circle" and "marker" in cls:
                self.chart["markers"] += 1
            if "legend-item" in cls:
                self.chart["legend"].append(a)
            if tag == "text" and "tick" in cls:
                self.chart["ticks"] += 1
                self._in_tick = True

    def handle_endtag(self, tag):
        if tag == "tbody":
            self.in_tbody = False
        if tag == "svg":
            self.chart = None
        if tag == "title":
            self._in_title = False
        if tag == "text":
            self._in_tick = False

    def handle_data(self, data):
        if self._in_title:
            self.title += data
        if self._in_tick and self.chart is not None:
            self.chart["tick_labels"].append(data)


def _parse(text: str) -> _Page:
    p = _Page()
    p.feed(text)
    return p


def _check_page(page: _Page, n_runs: int) -> None:
    assert page.title.startswith("mimscale report")
    assert len(page.rows) == n_runs
    acc, loss = page.charts["plot-acc"], page.charts["plot-loss"]
    # one curve per run that has points; the run without kNN evals is in the legend, marked empty
    assert [c["data-run"] for c in loss["curves"]] == ["0", "1", "2"]
    assert [c["data-run"] for c in acc["curves"]] == ["0", "1"]
    assert acc["markers"] == 10
    assert len(acc["legend"]) == len(loss["legend"]) == n_runs
    assert "empty" in acc["legend"][2]["class"] and "empty" not in loss["legend"][2]["class"]
    assert acc["ticks"] >= 6 and loss["ticks"] >= 6
    for chart in (acc, loss):
        for c in chart["curves"]:
            assert c["stroke"] == run_style(int(c["data-run"]))[0]
    # the NaN loss breaks the killed run's line into two pieces
    assert loss["curves"][2]["d"].count("M") == 2


def test_html_self_contained_and_readable(report):
    text = report["html"].read_text(encoding="utf-8")
    assert "http://" not in text and "https://" not in text
    assert not re.search(r"""(src|href)\s*=|@import|url\(""", text), "no external resource of any kind"
    page = _parse(text)
    _check_page(page, 3)
    for unit in ("device-hours", "img/s", "GB", "best, %"):
        assert unit in text
    assert f"Time to {TARGET:g}%" in text and "not reached" not in text and "no eval" in text
    assert re.search(r'data-sort="41\.(2|19+\d*)">41\.2</td>', text)  # MFU in percent
    assert "kNN top-1 (%)" in text and "optimizer step" in text  # axis titles


def test_report_default_out_is_first_run_dir(runs, tmp_path, capsys):
    rd = tmp_path / "run"
    shutil.copytree(runs[0]["dir"], rd)
    assert main(["report", str(rd)]) == 0
    out = capsys.readouterr().out
    assert str(rd / "report.html") in out and str(rd / "report.json") in out
    assert (rd / "report.html").exists() and json.loads((rd / "report.json").read_text())["runs"][0]["label"] == "run"


def test_missing_run_dir_is_one_error_line(capsys, tmp_path):
    assert main(["report", "/nonexistent"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mimscale: error:") and "/nonexistent" in err[0]
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "metrics.jsonl" in capsys.readouterr().err
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "no metric records" in capsys.readouterr().err


def test_bad_target_is_one_error_line(runs, capsys, tmp_path):
    assert main(["report", str(runs[0]["dir"]), "--out", str(tmp_path), "--target", "150"]) == 2
    assert "--target" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- real browser

# Injected into a copy of the page: records JS errors from the very start, then (after the report's own
# script) measures what the browser laid out, and finally throws once on purpose so the test can check
# that both error detectors (window.onerror and Chromium's console log) actually see errors.
PROBE_HEAD = """<script>window.__errors = [];
window.addEventListener("error", function (e) { window.__errors.push(String(e.message)); });</script>"""
PROBE_TAIL = """<script>(function () {
  var out = {ready: document.documentElement.getAttribute("data-report-ready"),
             rows: document.querySelectorAll("#runs tbody tr").length, errors: window.__errors.slice(), charts: {}};
  var wrap = document.querySelector(".table-wrap");
  out.table_overflow = wrap.scrollWidth - wrap.clientWidth;
  ["plot-acc", "plot-loss"].forEach(function (id) {
    var svg = document.getElementById(id), bg = svg.querySelector(".plot-bg").getBoundingClientRect();
    out.charts[id] = {plot: [bg.left, bg.top, bg.right, bg.bottom],
      curves: Array.prototype.map.call(svg.querySelectorAll("path.curve"), function (p) {
        var b = p.getBoundingClientRect();
        return {run: p.getAttribute("data-run"), length: p.getTotalLength(), w: b.width, h: b.height,
                stroke: getComputedStyle(p).stroke, visible: getComputedStyle(p).visibility};
      })};
  });
  // the report's own interactions: sort by a column, highlight a run on hover
  function order() {
    return Array.prototype.map.call(document.querySelectorAll("#runs tbody tr"),
                                    function (r) { return r.getAttribute("data-run"); });
  }
  var knnHeader = Array.prototype.filter.call(document.querySelectorAll("#runs thead th"),
                                              function (th) { return th.textContent.indexOf("kNN top-1") === 0; })[0];
  knnHeader.click(); out.sort_asc = order();
  knnHeader.click(); out.sort_desc = order();
  var row = document.querySelector('#runs tbody tr[data-run="1"]'), loss = document.getElementById("plot-loss");
  row.dispatchEvent(new MouseEvent("mouseenter"));
  out.hover = {dimmed: loss.classList.contains("dimmed"), hl: Array.prototype.map.call(
    loss.querySelectorAll(".run.hl"), function (g) { return g.getAttribute("data-run"); })};
  row.dispatchEvent(new MouseEvent("mouseleave"));
  out.hover.after = loss.classList.contains("dimmed");
  document.body.setAttribute("data-probe", JSON.stringify(out));
})();</script>
<script>probeDeliberateError();</script>"""


def _chromium(url: str, profile: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        "--enable-logging=stderr",
        "--v=0",
        "--window-size=1280,2000",
        *extra,
        url,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def _console_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if re.search(r":CONSOLE[:(]|Uncaught", line)]


def _rgb(colour: str) -> tuple[int, int, int]:
    return tuple(int(colour[i : i + 2], 16) for i in (1, 3, 5))


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"needs Debian's chromium at {CHROMIUM} (CI installs it)")
def test_report_in_headless_chromium(report, tmp_path):
    import numpy as np
    from PIL import Image

    html = report["html"]
    # 1. the report as written: no console output at all, DOM after scripts ran, screenshot
    png = tmp_path / "report.png"
    p = _chromium(html.as_uri(), tmp_path / "profile1", "--dump-dom", f"--screenshot={png}")
    assert p.returncode == 0, p.stderr[-2000:]
    assert _console_lines(p.stderr) == [], "JS errors / console output in the report"
    dom = _parse(p.stdout)
    assert dom.attrs["html"][0].get("data-report-ready") == "1", "the report's script did not run to its end"
    _check_page(dom, 3)

    # 2. a probe copy: layout measured by the browser itself, and proof that the error detectors work
    probe = tmp_path / "probe.html"
    text = html.read_text(encoding="utf-8")
    probe.write_text(
        text.replace("<head>", "<head>" + PROBE_HEAD, 1).replace("</body>", PROBE_TAIL + "</body>", 1), encoding="utf-8"
    )
    q = _chromium(probe.as_uri(), tmp_path / "profile2", "--dump-dom")
    assert q.returncode == 0, q.stderr[-2000:]
    console = _console_lines(q.stderr)
    assert len(console) == 1 and "probeDeliberateError" in console[0], console  # detector sees errors
    m = json.loads(_parse(q.stdout).attrs["body"][0]["data-probe"])
    assert m["errors"] == [] and m["ready"] == "1" and m["rows"] == 3
    assert m["sort_asc"] == ["0", "1", "2"] and m["sort_desc"] == ["1", "0", "2"]  # runs without kNN last
    assert m["hover"] == {"dimmed": True, "hl": ["1"], "after": False}
    for chart_id, runs_drawn in (("plot-acc", ["0", "1"]), ("plot-loss", ["0", "1", "2"])):
        chart = m["charts"][chart_id]
        assert [c["run"] for c in chart["curves"]] == runs_drawn
        x0, y0, x1, y1 = chart["plot"]
        assert x1 - x0 > 300 and y1 - y0 > 150, chart["plot"]
        for c in chart["curves"]:
            assert c["length"] > 100 and c["w"] > 50 and c["visible"] == "visible", c
            assert c["stroke"] == "rgb({}, {}, {})".format(*_rgb(run_style(int(c["run"]))[0]))

    # 3. the screenshot is not blank, and each run's colour is drawn inside each plot area
    img = Image.open(png).convert("RGB")
    assert img.size == (1280, 2000)
    px = np.asarray(img).astype(int)  # [H, W, 3]
    non_white = float((px.min(axis=2) < 245).mean())
    assert non_white > 0.01, f"screenshot looks blank ({non_white:.2%} non-white)"
    assert len(img.getcolors(maxcolors=1 << 20) or ()) > 50
    for chart_id, runs_drawn in (("plot-acc", [0, 1]), ("plot-loss", [0, 1, 2])):
        x0, y0, x1, y1 = (int(round(v)) for v in m["charts"][chart_id]["plot"])
        crop = px[y0 + 1 : y1 - 1, x0 + 1 : x1 - 1]
        for i in runs_drawn:
            n = int((np.abs(crop - np.array(_rgb(run_style(i)[0]))).sum(axis=2) < 60).sum())
            assert n > 80, f"run {i}'s colour barely appears in {chart_id} ({n} px)"
    # the whole table fits the 1280-px window (no horizontal scrolling needed to read it)
    assert m["table_overflow"] <= 0, m["table_overflow"]


def test_data_line_says_what_the_data_was(tmp_path):
    """The report's data line: the source, the manifest's image count and write-time size cap, the decode path."""
    from mimscale.data import write_manifest
    from mimscale.report.data import describe_data

    capped, plain = tmp_path / "capped", tmp_path / "plain"
    for d, extra in ((capped, {"max_side": 320, "quality": 85, "resized": 1200}), (plain, {})):
        d.mkdir()
        write_manifest(d, [{"name": "train-000000.tar", "count": 1281}], source="folder:/x", **extra)
    line = describe_data({"data": {"train": str(capped), "decode": "device"}})
    assert line == f"{capped}, 1,281 images, pre-resized to max side 320 px (JPEG q85, 1,200 shrunk), decode device"
    assert (
        describe_data({"data": {"train": str(plain), "decode": "auto"}})
        == f"{plain}, 1,281 images, original image files, decode auto"
    )
    assert (
        describe_data({"data": {"train": "fashion-mnist:train", "decode": "cpu"}}) == "fashion-mnist:train, decode cpu"
    )
    assert describe_data({}) is None


def test_best_and_final_columns_when_the_best_is_not_the_last(tmp_path):
    """A probe and a fine-tuning whose best epoch is not their last: `mimscale eval` logs only the final top-1
    into metrics.jsonl; the report's "best" columns take the best from eval/<kind>.json and show the final too."""
    from mimscale.eval.results import record
    from mimscale.eval.source import Source

    rd = tmp_path / "run"
    make_run(rd, "mae", [], world=1, steps=60, sec_per_step=1.0, knn={0: 10.0, 60: 30.0}, finished=True, loss=(1, 1, 1))
    src = Source(None, {}, "vit_micro", 32, 4, 3, "sincos", (0.5,), (0.5,), rd / "model.safetensors", rd, 60)  # type: ignore[arg-type]
    for kind, curve in (("linear", [[1, 55.0], [2, 60.98], [3, 58.54]]), ("finetune", [[1, 37.4], [2, 36.59]])):
        result = {"top1": curve[-1][1], "best_top1": max(a for _, a in curve), "curve": curve}
        record(src, kind, result, {f"eval/{kind}_top1": result["top1"]})
    run = load_runs([rd])[0]
    assert (run.linear_best, run.linear_final) == (60.98, 58.54)
    assert (run.finetune_best, run.finetune_final) == (37.4, 36.59)
    write_report([rd], tmp_path / "out")
    text = (tmp_path / "out" / "report.html").read_text()
    assert '<td data-sort="60.98">60.98<br><span class="sub">final&nbsp;58.54</span></td>' in text
    assert '<td data-sort="37.4">37.40<br><span class="sub">final&nbsp;36.59</span></td>' in text


# ----------------------------------------------------------------------------- live dashboards


def _append_eval(rd: Path, step: int, knn: float, device_hours: float) -> None:
    """What the training loop logs at a later step: a training record, then a kNN evaluation."""
    with MetricLogger(rd, tensorboard=False, wandb="disabled") as log:
        log.log({"train/loss": 0.5, "time/device_hours": device_hours, "perf/img_per_s": 16.0}, step=step)
        log.log({"eval/knn_top1": knn, "eval/knn_bank": 5000.0, "eval/knn_queries": 5000.0}, step=step)


def _finish(rd: Path, steps: int) -> None:
    (rd / "summary.json").write_text(json.dumps({"objective": "mae", "steps": steps, "world_size": 1}))


def test_live_report_reloads_only_while_the_run_trains(tmp_path):
    from mimscale.report import write_live_report

    rd = tmp_path / "run"
    make_run(
        rd, "mae", [], world=1, steps=40, sec_per_step=1.0, knn={0: 10.0, 40: 20.0}, finished=False, loss=(1, 1, 1)
    )
    text = write_live_report(rd, refresh=7).read_text()  # type: ignore[union-attr]
    assert '<meta http-equiv="refresh" content="7">' in text and "(live: step 40)</title>" in text
    assert 'id="live"' in text
    _append_eval(rd, 60, 25.0, 60 / 3600)
    _finish(rd, 60)
    text = write_live_report(rd, refresh=7).read_text()  # type: ignore[union-attr]
    assert "http-equiv" not in text and "live" not in text.split("</title>")[0] and 'id="live"' not in text
    assert write_report([rd], tmp_path / "plain")[0].read_text().count("http-equiv") == 0  # `mimscale report`: static


def test_watch_rewrites_until_every_run_has_finished(tmp_path, monkeypatch, capsys):
    rd = tmp_path / "run"
    make_run(
        rd, "mae", [], world=1, steps=40, sec_per_step=1.0, knn={0: 10.0, 40: 20.0}, finished=False, loss=(1, 1, 1)
    )
    seen: list[str] = []

    def sleep(seconds: float) -> None:  # the run trains on while --watch sleeps
        assert seconds == 2
        seen.append((rd / "report.html").read_text())
        if len(seen) == 1:
            _append_eval(rd, 60, 25.0, 60 / 3600)
        else:
            _finish(rd, 60)

    monkeypatch.setattr("mimscale.report.cli._sleep", sleep)
    assert main(["report", "--watch", "2", str(rd)]) == 0
    assert len(seen) == 2 and "(live: step 40)" in seen[0] and "(live: step 60)" in seen[1]
    assert all('http-equiv="refresh" content="2"' in t for t in seen)
    final = (rd / "report.html").read_text()
    assert "http-equiv" not in final and '<td data-sort="25.0">25.00' in final  # the newest evaluation, static
    assert "all finished" in capsys.readouterr().out
    assert main(["report", "--watch", "0", str(rd)]) == 2
    assert main(["report", "--watch", "1", str(tmp_path / "nosuch")]) == 2


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"needs Debian's chromium at {CHROMIUM} (CI installs it)")
def test_live_report_refreshes_in_headless_chromium(tmp_path):
    """A run in progress: Chromium shows its report; the run logs a newer evaluation and the report is rewritten
    (as the training loop does); the open page reloads itself and shows it. Once the run has finished the page
    is static. The page's title is read through Chromium's DevTools HTTP endpoint (/json)."""
    import time
    import urllib.request

    from launch_utils import free_port

    from mimscale.report import write_live_report

    rd = tmp_path / "run"
    make_run(
        rd, "mae", [], world=1, steps=40, sec_per_step=1.0, knn={0: 10.0, 40: 20.0}, finished=False, loss=(1, 1, 1)
    )
    html = write_live_report(rd, refresh=1)
    assert html is not None
    port = free_port()
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
    cmd += [f"--user-data-dir={tmp_path / 'profile'}", f"--remote-debugging-port={port}", html.as_uri()]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def title_when(pred, timeout: float = 90.0) -> str:
        deadline, last = time.time() + timeout, ""
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as r:
                    pages = [p for p in json.load(r) if p.get("type") == "page"]
                last = pages[0]["title"] if pages else ""
                if pred(last):
                    return last
            except OSError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"page title never matched; last: {last!r}")

    try:
        title_when(lambda t: "(live: step 40)" in t)  # the page as first loaded
        _append_eval(rd, 60, 25.0, 60 / 3600)
        write_live_report(rd, refresh=1)
        title_when(lambda t: "(live: step 60)" in t)  # reloaded by itself: the newer evaluation
        _finish(rd, 60)
        write_live_report(rd, refresh=1)
        final = title_when(lambda t: t and "live" not in t)  # the static page, once the run has finished
        assert final == "mimscale report — 1 run"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
