"""MetricLogger against its real sinks: a JSONL file, TensorBoard event files and
an offline wandb run whose binary ``run-<id>.wandb`` log is read back."""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from mimscale.telemetry import MetricLogger, read_jsonl, resolve_wandb_mode
from mimscale.telemetry import logger as logger_mod

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """No API key, no WANDB_MODE, wandb's side directories inside tmp_path."""
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_PROJECT"):
        monkeypatch.delenv(var, raising=False)
    side = tmp_path / "wandb-home"
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(side / var.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    return tmp_path


# ----------------------------------------------------------------- wandb reader
# A run-<id>.wandb file is a ":W&B" header (4s magic, uint16 0xBEE1, uint8 version)
# then a LevelDB-style log: 32 KiB blocks of records, each with a 7-byte header
# (uint32 crc32c, uint16 length, uint8 type: 1 full, 2 first, 3 middle, 4 last);
# a block tail shorter than a header is zero padding. Each record is a
# serialized wandb.proto.wandb_internal_pb2.Record.
_BLOCK = 32 * 1024


def read_wandb_records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0)
    pos, pending, records = 7, b"", []
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        if kind == 0:  # zero padding at the end of a block
            pos += left - 7
            continue
        chunk = data[pos : pos + length]
        pos += length
        if kind == 1:
            records.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            records.append(pending + chunk)
            pending = b""
        else:
            raise AssertionError(f"bad record type {kind} at {pos}")
    out = []
    for raw in records:
        rec = pb.Record()
        rec.ParseFromString(raw)
        out.append(rec)
    return out


def wandb_history(path: Path) -> list[dict]:
    """[{'_step': .., 'train/loss': ..}, ...] from the history records."""
    rows = []
    for rec in read_wandb_records(path):
        if rec.WhichOneof("record_type") == "history":
            row = {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in rec.history.item}
            rows.append(row)
    return rows


def wandb_config(path: Path) -> dict:
    cfg = {}
    for rec in read_wandb_records(path):
        if rec.WhichOneof("record_type") == "config":
            for item in rec.config.update:
                key = "/".join(item.nested_key) or item.key
                cfg[key] = json.loads(item.value_json)
        elif rec.WhichOneof("record_type") == "run":
            for item in rec.run.config.update:
                key = "/".join(item.nested_key) or item.key
                cfg[key] = json.loads(item.value_json)
    return cfg


def offline_runs(run_dir: Path, run_id: str) -> list[Path]:
    # a run started within the same second as an earlier one with its id gets a "-1" suffix
    return sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}*/run-{run_id}.wandb"))


# ------------------------------------------------------------------------ JSONL
def test_jsonl_values_round_trip(tmp_path):
    import time as _time

    run, t0 = tmp_path / "run", _time.time()
    with MetricLogger(run, tensorboard=False, wandb="disabled") as log:
        log.log(
            {
                "train/loss": 0.5,
                "train/steps": 7,
                "train/flag": True,
                "perf/t0": torch.tensor(1.25),
                "perf/t1": torch.tensor([2.5], dtype=torch.float64),
                "perf/ti": torch.tensor(3),
            },
            step=10,
        )
        log.log({"eval/nan": float("nan"), "eval/inf": math.inf, "eval/ninf": -math.inf}, step=11)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2

    def strict(const):
        raise AssertionError(f"non-standard JSON constant {const}")

    raw = [json.loads(line, parse_constant=strict) for line in lines]
    assert list(raw[0])[:2] == ["step", "time"]
    assert raw[1]["eval/nan"] == "nan" and raw[1]["eval/inf"] == "inf" and raw[1]["eval/ninf"] == "-inf"

    recs = read_jsonl(run / "metrics.jsonl")
    assert recs[0]["step"] == 10 and abs(recs[0]["time"] - raw[0]["time"]) == 0
    assert recs[0]["train/loss"] == 0.5
    assert recs[0]["train/steps"] == 7 and isinstance(recs[0]["train/steps"], int)
    assert recs[0]["train/flag"] == 1
    assert recs[0]["perf/t0"] == 1.25 and recs[0]["perf/t1"] == 2.5
    assert recs[0]["perf/ti"] == 3 and isinstance(recs[0]["perf/ti"], int)
    assert math.isnan(recs[1]["eval/nan"])
    assert recs[1]["eval/inf"] == math.inf and recs[1]["eval/ninf"] == -math.inf
    assert t0 <= recs[0]["time"] <= recs[1]["time"] <= _time.time()  # wall-clock stamps taken while logging


def test_jsonl_appends_on_second_instance(tmp_path):
    run = tmp_path / "run"
    with MetricLogger(run, tensorboard=False, wandb="disabled") as log:
        log.log({"train/loss": 1.0}, step=1)
        # line-buffered: visible before close, as a killed run would leave it
        assert len(read_jsonl(run / "metrics.jsonl")) == 1
    with MetricLogger(run, tensorboard=False, wandb="disabled") as log:
        log.log({"train/loss": 0.5}, step=2)
    assert [(r["step"], r["train/loss"]) for r in read_jsonl(run / "metrics.jsonl")] == [(1, 1.0), (2, 0.5)]


def test_read_jsonl_tolerates_truncated_last_line(tmp_path):
    run = tmp_path / "run"
    with MetricLogger(run, tensorboard=False, wandb="disabled") as log:
        log.log({"train/loss": 1.0}, step=1)
        log.log({"train/loss": 0.9}, step=2)
    path = run / "metrics.jsonl"
    with open(path, "a") as f:
        f.write('{"step": 3, "time": 17324.5, "train/lo')  # killed mid-write
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a truncated *last* line is silent
        assert [r["step"] for r in read_jsonl(path)] == [1, 2]

    # A resumed run starts on a fresh line; the fragment is then skipped with a warning.
    with MetricLogger(run, tensorboard=False, wandb="disabled") as log:
        log.log({"train/loss": 0.8}, step=3)
    with pytest.warns(RuntimeWarning, match="unparsable"):
        recs = read_jsonl(path)
    assert [(r["step"], r["train/loss"]) for r in recs] == [(1, 1.0), (2, 0.9), (3, 0.8)]


def test_read_jsonl_drop_rewound(tmp_path):
    run = tmp_path / "run"
    with MetricLogger(run, tensorboard=False, wandb="disabled") as log:
        for s in (10, 20, 30):
            log.log({"train/loss": float(s)}, step=s)
        log.log({"eval/acc": 0.5}, step=30)
    # resumed from the step-20 checkpoint: the attempt's steps >= 21 are superseded
    with MetricLogger(run, tensorboard=False, wandb="disabled", purge_step=21) as log:
        log.log({"train/loss": 31.0}, step=30)
        log.log({"eval/acc": 0.6}, step=30)
        log.log({"train/loss": 40.0}, step=40)
    path = run / "metrics.jsonl"
    assert len(read_jsonl(path)) == 7  # the marker line is not a record
    assert sum('"event": "purge"' in line for line in path.read_text().splitlines()) == 1
    kept = [(r["step"], r.get("train/loss"), r.get("eval/acc")) for r in read_jsonl(path, drop_rewound=True)]
    assert kept == [(10, 10.0, None), (20, 20.0, None), (30, 31.0, None), (30, None, 0.6), (40, 40.0, None)]


@pytest.mark.parametrize("name", ["loss", "/loss", "train/", "", 3])
def test_names_without_group_are_rejected(tmp_path, name):
    run = tmp_path / "run"
    with MetricLogger(run, tensorboard=False, wandb="disabled") as log:
        with pytest.raises(ValueError):
            log.log({"train/ok": 1.0, name: 1.0}, step=1)
        log.log({"data/corrupt": 2, "time/step_s": 0.1}, step=2)  # any group is fine
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [2]  # nothing half-written


def test_bad_values_and_use_after_close(tmp_path):
    log = MetricLogger(tmp_path / "run", tensorboard=False, wandb="disabled")
    with pytest.raises(TypeError):
        log.log({"train/x": "high"}, step=1)
    with pytest.raises(TypeError):
        log.log({"train/x": 1.0}, step=1.5)
    log.log({}, step=1)  # nothing to log: no line
    log.close()
    log.close()  # idempotent
    with pytest.raises(RuntimeError):
        log.log({"train/x": 1.0}, step=2)
    assert not (tmp_path / "run" / "metrics.jsonl").read_text()


def test_disabled_logger_writes_and_imports_nothing(tmp_path):
    code = f"""
import sys
from mimscale.telemetry import MetricLogger
run = {str(tmp_path / "run")!r}
with MetricLogger(run, enabled=False, wandb="online", config={{"a": 1}}) as log:
    log.log({{"train/loss": 1.0, "no_group": 2.0}}, step=1)
    log.log_config({{"b": 2}})
    log.flush()
bad = [m for m in ("wandb", "tensorboard", "torch.utils.tensorboard") if m in sys.modules]
print("IMPORTED", bad)
"""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "IMPORTED []" in out.stdout
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ TensorBoard
def _scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(logdir))
    ea.Reload()
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


def test_tensorboard_scalars_read_back(tmp_path):
    run = tmp_path / "run"
    with MetricLogger(run, wandb="disabled", config={"lr": 1e-3}) as log:
        for s in range(5):
            log.log({"train/loss": 1.0 / (s + 1), "perf/img_per_s": torch.tensor(100.0 + s)}, step=s * 10)
        log.log({"eval/knn_top1": 0.25}, step=40)
    sc = _scalars(run / "tb")
    assert set(sc) == {"train/loss", "perf/img_per_s", "eval/knn_top1"}
    assert [st for st, _ in sc["train/loss"]] == [0, 10, 20, 30, 40]
    assert [v for _, v in sc["train/loss"]] == pytest.approx([1.0, 0.5, 1 / 3, 0.25, 0.2])
    assert sc["perf/img_per_s"][-1] == (40, pytest.approx(104.0))
    assert sc["eval/knn_top1"] == [(40, pytest.approx(0.25))]


def test_tensorboard_purge_step_on_resume(tmp_path):
    run = tmp_path / "run"
    with MetricLogger(run, wandb="disabled") as log:
        for s in range(6):
            log.log({"train/loss": float(s)}, step=s)
    with MetricLogger(run, wandb="disabled", purge_step=3) as log:  # resumed from a step-3 checkpoint
        for s in range(3, 5):
            log.log({"train/loss": 100.0 + s}, step=s)
    assert _scalars(run / "tb")["train/loss"] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 103.0), (4, 104.0)]


# ------------------------------------------------------------------------ wandb
def test_resolve_wandb_mode(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert resolve_wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_wandb_mode("auto") == "disabled"
    assert resolve_wandb_mode("offline") == "offline"
    with pytest.raises(ValueError):
        resolve_wandb_mode("cloud")


def test_wandb_offline_history_and_resume(wandb_env):
    run = wandb_env / "run"
    with MetricLogger(run, tensorboard=False, run_name="t", config={"model": "vit_tiny", "blr": 1.5e-4}) as log:
        assert log.wandb_mode == "offline"
        run_id = log.wandb_id
        log.log_config({"epochs": 3})
        for s in range(4):
            log.log({"train/loss": 1.0 / (s + 1), "perf/img_per_s": 10.0 * s}, step=s)
        log.log({"eval/knn_top1": 0.5}, step=3)
    assert run_id and (run / "wandb_id.txt").read_text().strip() == run_id
    (first,) = offline_runs(run, run_id)
    hist = wandb_history(first)
    assert [h["_step"] for h in hist] == [0, 1, 2, 3]
    assert [h["train/loss"] for h in hist] == pytest.approx([1.0, 0.5, 1 / 3, 0.25])
    assert hist[3]["perf/img_per_s"] == 30.0 and hist[3]["eval/knn_top1"] == 0.5  # same step: one row
    cfg = wandb_config(first)
    assert cfg["model"] == {"value": "vit_tiny"} or cfg["model"] == "vit_tiny"
    assert "epochs" in cfg and "blr" in cfg
    # nothing outside run_dir besides the side dirs the fixture placed in tmp_path
    assert {p.name for p in wandb_env.iterdir()} <= {"run", "wandb-home"}

    # Resume: the id stored in run_dir is reused automatically.
    with MetricLogger(run, tensorboard=False) as log:
        assert log.wandb_id == run_id
        log.log({"train/loss": 0.2}, step=4)
    runs = offline_runs(run, run_id)
    assert len(runs) == 2
    resumed = [p for p in runs if p != first][0]
    assert [(h["_step"], h["train/loss"]) for h in wandb_history(resumed)] == [(4, 0.2)]
    assert run_id in resumed.parent.name


def test_wandb_explicit_resume_id_wins(wandb_env):
    run = wandb_env / "run"
    (run).mkdir()
    (run / "wandb_id.txt").write_text("oldid123\n")
    with MetricLogger(run, tensorboard=False, jsonl=False, wandb="offline", resume_id="newid456") as log:
        log.log({"train/loss": 1.0}, step=0)
        assert log.wandb_id == "newid456"
    assert (run / "wandb_id.txt").read_text().strip() == "newid456"
    assert len(offline_runs(run, "newid456")) == 1
    assert not offline_runs(run, "oldid123")


def test_wandb_disabled_and_missing(wandb_env, monkeypatch):
    with MetricLogger(wandb_env / "off", tensorboard=False, wandb="disabled") as log:
        log.log({"train/loss": 1.0}, step=0)
    assert not (wandb_env / "off" / "wandb").exists()
    assert not (wandb_env / "off" / "wandb_id.txt").exists()

    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    monkeypatch.setattr(logger_mod, "_warned_missing", set())
    with pytest.warns(RuntimeWarning, match="wandb logging disabled") as record:
        for name in ("a", "b"):
            with MetricLogger(wandb_env / name, tensorboard=False, wandb="offline") as log:
                log.log({"train/loss": 1.0}, step=0)
    assert len([w for w in record if "wandb" in str(w.message)]) == 1  # warned once
    assert read_jsonl(wandb_env / "b" / "metrics.jsonl")[0]["train/loss"] == 1.0
