"""Dashboards read back: a tiny real pre-training run logs to wandb (offline) and TensorBoard; both are read
back with no network (the ``.wandb`` transaction log parsed record by record; TensorBoard's own
``EventAccumulator``) and must hold the same metrics as ``metrics.jsonl``, grouped train/ eval/ perf/ time/."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import pytest
from launch_utils import run, tiny_overrides

pytestmark = pytest.mark.slow

GROUPS = ("train", "eval", "perf", "time")


def wandb_records(path: Path):
    """Protobuf ``Record``s of an offline ``.wandb`` file: a 7-byte header (``:W&B``, magic, version), then
    LevelDB-log chunks in 32 KiB blocks (crc32c, length, type FULL=1/FIRST=2/MIDDLE=3/LAST=4)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B" and data[4:6] == b"\xe1\xbe", data[:7]
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if n == 0 and kind == 0:  # zero padding up to the end of the block
            pos += left
            continue
        buf += data[pos + 7 : pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            yield rec


def wandb_history(path: Path) -> dict[int, dict[str, float]]:
    """``{step: {metric: value}}`` from the history records of an offline run."""
    import json

    out: dict[int, dict[str, float]] = {}
    for rec in wandb_records(path):
        if rec.WhichOneof("record_type") != "history":
            continue
        items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
        step = int(items.get("_step", rec.history.step.num))
        out.setdefault(step, {}).update({k: v for k, v in items.items() if not k.startswith("_")})
    return out


def test_wandb_offline_and_tensorboard_read_back(tmp_path, fmnist_small):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mimscale.telemetry import read_jsonl

    rd = tmp_path / "run"
    test_split = str(fmnist_small["test"])
    run(
        [
            sys.executable,
            "-m",
            "mimscale.cli",
            "pretrain",
            *tiny_overrides(
                fmnist_small,
                rd,
                log__wandb="offline",
                log__tensorboard="true",
                eval__knn_train=test_split,
                eval__knn_test=test_split,
            ),
        ],
        env={"WANDB_MODE": "offline"},
        timeout=300,
    )
    jsonl = [r for r in read_jsonl(rd / "metrics.jsonl") if "step" in r]
    logged = {k for r in jsonl for k in r if k not in ("step", "time")}
    assert {g for g in (k.split("/")[0] for k in logged)} >= set(GROUPS)
    assert {"train/loss", "train/lr", "eval/knn_top1", "perf/img_per_s", "time/elapsed_s"} <= logged

    # wandb, offline: the run's transaction log holds every metric at its step
    files = list((rd / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    hist = wandb_history(files[0])
    assert {k for v in hist.values() for k in v} == logged
    for r in jsonl:
        for k, v in r.items():
            if k not in ("step", "time"):
                assert hist[r["step"]][k] == pytest.approx(v, rel=1e-6), (r["step"], k)
    assert all(k.split("/")[0] in GROUPS + ("data",) for k in logged), logged

    # TensorBoard: the scalars, by tag, at the same steps and values
    acc = EventAccumulator(str(rd / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert tags == logged
    for tag in ("train/loss", "eval/knn_top1", "perf/img_per_s", "time/elapsed_s"):
        want = {r["step"]: r[tag] for r in jsonl if tag in r}
        got = {e.step: e.value for e in acc.Scalars(tag)}
        assert got.keys() == want.keys() and all(got[s] == pytest.approx(want[s], rel=1e-6) for s in want), tag
    assert [e.step for e in acc.Scalars("eval/knn_top1")] == [0, 4]  # random init and final
