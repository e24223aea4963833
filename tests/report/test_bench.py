"""`mimscale report` with benchmark results: none by default, --bench FILE, a bare --bench (the newest
benchmarks/results sweep), bad files."""

from __future__ import annotations

import json
import os

import pytest

from mimscale import config as C
from mimscale.bench.throughput import write_sweep
from mimscale.cli import main
from mimscale.errors import ConfigError
from mimscale.report import write_report
from mimscale.report.bench import bench_section, latest_bench_file, resolve_bench
from mimscale.telemetry import MetricLogger


def _row(zero, ckpt, mb, img_s):
    return {
        "objective": "mae",
        "arch": "vit_micro",
        "img": 32,
        "patch": 4,
        "zero": zero,
        "ckpt": ckpt,
        "micro_batch": mb,
        "world_size": 1,
        "precision": "fp32",
        "device": "cpu",
        "device_name": "AMD EPYC",
        "img_per_s": img_s,
        "step_time_s": mb / img_s,
        "mfu": 0.2,
        "mem_peak_gb": 0.9,
    }


ROWS = [_row(0, 0, 32, 200.0), _row(3, 0, 32, 150.0), _row(0, 1, 32, 160.0), _row(3, 1, 32, 120.0)]


@pytest.fixture()
def run_dir(tmp_path):
    rd = tmp_path / "run"
    cfg = C.load("tiny_cpu", [f"train.run_dir={rd}", "log.wandb=disabled", "train.epochs=1"])
    C.save_resolved(cfg, C.derive(cfg, 1, 1280), rd / "config.yaml")
    with MetricLogger(rd, tensorboard=False, wandb="disabled") as log:
        for step in (5, 10):
            log.log(
                {
                    "train/loss": 1.0 / step,
                    "perf/img_per_s": 500.0,
                    "perf/mem_peak_gb": 1.0,
                    "time/elapsed_s": step * 0.2,
                    "time/device_hours": step * 0.2 / 3600,
                },
                step=step,
            )
    return rd


def test_newest_sweep_file_is_found_and_foreign_files_ignored(tmp_path):
    assert latest_bench_file(tmp_path) is None and resolve_bench(None, tmp_path) is None
    with pytest.raises(ConfigError, match="no throughput-"):
        resolve_bench(True, tmp_path)
    old, _ = write_sweep(ROWS[:2], tmp_path / "throughput-vm-2026-01-01.json", {}, 1)
    new, _ = write_sweep(ROWS, tmp_path / "throughput-vm-2026-02-01.json", {}, 1)
    for p, date in ((old, "2026-01-01"), (new, "2026-02-01")):
        doc = json.loads(p.read_text())
        doc["date"] = date
        p.write_text(json.dumps(doc))
    os.utime(old, (2e9, 2e9))  # newer mtime, older date: the date decides
    (tmp_path / "throughput-broken.json").write_text("{not json")
    (tmp_path / "throughput-other.json").write_text(json.dumps({"benchmark": "engine_overhead"}))
    assert latest_bench_file(tmp_path) == new
    assert len(resolve_bench(True, tmp_path)["results"]) == 4
    assert resolve_bench(None, tmp_path) is None and resolve_bench(False, tmp_path) is None  # only when asked


@pytest.mark.parametrize(
    "content, match",
    [(None, "cannot read"), ("{oops", "not JSON"), ('{"benchmark": "zero_memory"}', "not a `mimscale bench")],
)
def test_bad_bench_file_is_one_config_error(tmp_path, content, match):
    p = tmp_path / "b.json"
    if content is not None:
        p.write_text(content)
    with pytest.raises(ConfigError, match=match):
        resolve_bench(p)


def test_report_shows_the_bench_table_and_plot(run_dir, tmp_path):
    sweep, _ = write_sweep(ROWS, tmp_path / "sweep.json", {"zero": [0, 3]}, 2)
    html_path, json_path = write_report([run_dir], tmp_path / "out", bench=sweep)
    text = html_path.read_text(encoding="utf-8")
    assert "<h2>Benchmarks</h2>" in text and 'id="bench"' in text and 'id="plot-bench"' in text
    section = text[text.index('<table id="bench">') : text.index("</table>", text.index('<table id="bench">'))]
    assert section.count("<tr>") == 1 + len(ROWS) and "0.750" in section and "0.600" in section  # vs ZeRO-0
    assert "http://" not in text and "https://" not in text  # the report stays self-contained
    assert 'data-run="' not in bench_section(json.loads(json_path.read_text())["bench"])
    assert json.loads(json_path.read_text())["bench"]["results"] == ROWS


def test_bench_only_when_asked_and_bare_bench_is_the_newest_results_file(run_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert main(["report", str(run_dir), "--out", str(out), "--bench"]) == 2  # nothing to show
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "benchmarks/results" in err
    write_sweep(ROWS, tmp_path / "benchmarks" / "results", {}, 1)
    assert main(["report", str(run_dir), "--out", str(out)]) == 0
    assert "<h2>Benchmarks</h2>" not in (out / "report.html").read_text()  # stored results are not the run's
    assert "bench" not in json.loads((out / "report.json").read_text())
    assert main(["report", str(run_dir), "--out", str(out), "--bench"]) == 0
    assert "<h2>Benchmarks</h2>" in (out / "report.html").read_text()
    assert json.loads((out / "report.json").read_text())["bench"]["results"] == ROWS
    capsys.readouterr()
    assert main(["report", str(run_dir), "--out", str(out), "--bench", str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "missing.json" in err
