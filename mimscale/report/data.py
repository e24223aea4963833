"""Load run directories and derive the numbers the report shows.

A run directory (written by :func:`mimscale.pretrain.pretrain`) holds ``config.yaml`` (resolved
config + ``derived``), ``metrics.jsonl`` and, once training finished, ``summary.json``. Only
``metrics.jsonl`` is required; what is missing shows up as ``None`` (``—`` in the HTML).

Definitions (also printed in the report's notes):

- **device-hours**: ``time/device_hours`` logged by the loop (training wall time x world size,
  evaluation pauses inside the loop included). A resumed run restarts that clock; the attempts
  are added up so the curve keeps increasing.
- **device-hours at an eval step**: linear interpolation of the training log at that step
  (step 0 = random init = 0 h; an eval after the last training log gets the last value).
- **MAE-equivalent epochs**: ``epochs x flops_per_sample(run) / flops_per_sample(MAE)`` where
  the MAE reference has the same encoder (arch, patch, image size, channels) and MAE's default
  knobs (mask 0.75, decoder 512-d x 8 blocks) -- the compute yardstick of the EMAE paper.
- **time-to-target**: the device-hours of the first eval whose kNN top-1 >= the target.
- **throughput**: median of the logged ``perf/img_per_s`` (global images/s), so one slow
  window (an eval pause, start-up) does not decide it. **TFLOP/s per device** = flops_per_sample
  x img/s / world size. **MFU**: the last logged ``perf/mfu`` (a fraction), when the run logs it.
- **peak memory**: the maximum logged ``perf/mem_peak_gb`` (rank 0; GB = 2**30 bytes).
- **data**: ``data.train`` and, from its manifest, the image count and any write-time size cap
  (``mimscale data folder --max-side``), plus ``data.decode`` (:func:`describe_data`).
"""

from __future__ import annotations

import bisect
import functools
import json
import math
import os
import statistics
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import MimscaleError

KNN_KEY = "eval/knn_top1"
LINEAR_KEY = "eval/linear_top1"
FINETUNE_KEY = "eval/finetune_top1"
LOSS_KEY = "train/loss"


@dataclass
class Run:
    """Everything the report says about one run. Numbers are ``None`` when the run does not tell."""

    path: str
    label: str
    objective: str | None = None
    arch: str | None = None
    patch_size: int | None = None
    img_size: int | None = None
    in_chans: int | None = None
    params_total: int | None = None
    world_size: int | None = None
    batch_size: int | None = None
    steps: int | None = None
    total_steps: int | None = None
    finished: bool = False  # summary.json exists
    epochs: float | None = None  # epochs actually trained
    epochs_planned: float | None = None
    device_hours: float | None = None
    flops_per_sample: float | None = None
    mae_flops_per_sample: float | None = None
    mae_equiv_ratio: float | None = None
    mae_equiv_epochs: float | None = None
    knn_init: float | None = None  # at step 0 (random init), if evaluated
    knn_best: float | None = None
    knn_best_step: int | None = None
    knn_final: float | None = None
    linear_best: float | None = None  # the probe's best epoch (eval/linear.json), else the best logged value
    linear_final: float | None = None  # the probe's last epoch
    finetune_best: float | None = None  # `mimscale eval finetune` appends eval/finetune_top1
    finetune_final: float | None = None
    target: float | None = None
    time_to_target_h: float | None = None  # None: no target, or not reached (see target_reached)
    time_to_target_step: int | None = None
    target_reached: bool | None = None
    img_per_s: float | None = None
    tflops_per_device: float | None = None
    mfu: float | None = None
    mem_peak_gb: float | None = None
    data: str | None = None  # what the training data was (source, size cap, decode path)
    final_loss: float | None = None
    loss_nonfinite: int = 0  # logged NaN/inf losses
    knn_curve: list[list[Any]] = field(default_factory=list)  # [step, device_hours | None, top1]
    loss_curve: list[list[float]] = field(default_factory=list)  # [step, loss] (not in report.json)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("loss_curve")
        return {k: _json_safe(v) for k, v in d.items()}


def _json_safe(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, list):
        return [_json_safe(x) for x in v]
    return v


def _finite(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _read_yaml(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        warnings.warn(
            f"{path}: unreadable YAML ({e}); the report leaves its fields empty", RuntimeWarning, stacklevel=2
        )
        return {}
    return doc if isinstance(doc, dict) else {}


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        warnings.warn(
            f"{path}: unreadable JSON ({e}); the report leaves its fields empty", RuntimeWarning, stacklevel=2
        )
        return {}
    return doc if isinstance(doc, dict) else {}


@functools.cache
def mae_reference_flops(arch: str, img_size: int, patch_size: int, in_chans: int = 3) -> float | None:
    """Training FLOPs per image of MAE with its default knobs on this encoder (built on the meta device)."""
    import torch

    from ..models import build_vit
    from ..objectives.mae import MAE

    try:
        with torch.device("meta"):
            return float(MAE(build_vit(arch, img_size, patch_size, in_chans), MAE.Config()).flops_per_sample())
    except (ValueError, MimscaleError):  # an arch this version does not know
        return None


def _objective_flops(cfg: dict) -> float | None:
    """flops_per_sample of the run's own objective, rebuilt on the meta device from config.yaml."""
    import torch

    from .. import config as C
    from ..models import build_vit
    from ..objectives import build_objective, objective_class

    model, obj = cfg.get("model") or {}, dict(cfg.get("objective") or {})
    try:
        cls = objective_class(obj.pop("name"))
        knobs = C.from_dict(cls.Config, obj, "objective")
        with torch.device("meta"):
            enc = build_vit(model["arch"], model["img_size"], model["patch_size"], model.get("in_chans", 3))
            objective = build_objective(cls.name, enc, knobs)
            sched = (cfg.get("train") or {}).get("resolution_schedule")
            if sched:  # progressive resolution: the planned mean over the budget
                from ..engine.resolution import ResolutionSchedule

                return float(ResolutionSchedule(sched, model["img_size"]).mean_flops(objective.flops_per_sample_at))
            return float(objective.flops_per_sample())
    except Exception as e:  # best effort: a plugin objective may not be installed, or may not build on meta
        warnings.warn(
            f"cannot count the FLOPs of the run's objective from its config.yaml: {e}", RuntimeWarning, stacklevel=2
        )
        return None


def _device_hours_track(train: list[dict]) -> list[tuple[int, float]]:
    """(step, cumulative device-hours) from the training records; a resumed attempt restarts the
    logged clock, so each restart adds the previous attempt's last value as an offset."""
    track: list[tuple[int, float]] = []
    offset, prev = 0.0, None
    for r in train:
        dh = _finite(r.get("time/device_hours"))
        if dh is None:
            continue
        if prev is not None and dh < prev:
            offset += prev
        prev = dh
        track.append((int(r["step"]), offset + dh))
    track.sort()
    return track


def _interp(track: list[tuple[int, float]], step: int) -> float | None:
    if not track:
        return None
    if step <= 0:
        return 0.0
    steps = [s for s, _ in track]
    i = bisect.bisect_left(steps, step)
    if i < len(track) and track[i][0] == step:
        return track[i][1]
    if i >= len(track):
        return track[-1][1]
    s1, h1 = track[i]
    s0, h0 = track[i - 1] if i > 0 else (0, 0.0)
    return h0 + (h1 - h0) * (step - s0) / max(s1 - s0, 1)


def _last_per_step(records: list[dict], key: str) -> list[tuple[int, float]]:
    """(step, value) of ``key``, the last record per step, sorted by step; non-finite values dropped."""
    by_step: dict[int, float] = {}
    for r in records:
        v = _finite(r.get(key))
        if v is not None and "step" in r:
            by_step[int(r["step"])] = v
    return sorted(by_step.items())


def _best_and_final(records: list[dict], key: str, result: Path) -> tuple[float | None, float | None]:
    """(best, final) top-1 of a probe or fine-tuning run. metrics.jsonl only gets each evaluation's *final*
    top-1 (at the run's last step), so the best epoch comes from the evaluation's own result file
    (``eval/<kind>.json``: ``best_top1`` and ``top1``) when it is there."""
    logged = [v for _, v in _last_per_step(records, key)]
    doc = _read_json(result)
    final = _finite(doc.get("top1"))
    final = final if final is not None else (logged[-1] if logged else None)
    bests = [v for v in (*logged, _finite(doc.get("best_top1")), final) if v is not None]
    return (max(bests) if bests else None), final


def first_reach(knn_curve: list[list[Any]], target: float) -> tuple[int, float | None] | None:
    """(step, device-hours) of the first kNN evaluation in ``knn_curve`` whose top-1 >= ``target``."""
    return next(((int(s), h) for s, h, v in knn_curve if v >= target), None)


def describe_data(cfg: dict) -> str | None:
    """One line about a run's training data from its ``config.yaml``: the source, and when its shard
    manifest is at hand the image count and whether the images were capped at write time
    (``mimscale data folder --max-side N --quality Q``); then the decode path (``data.decode``)."""
    data = cfg.get("data") or {}
    train = data.get("train")
    if not train:
        return None
    parts = [str(train)]
    path = Path(str(train)).expanduser()
    manifest = path / "manifest.json" if path.is_dir() else None
    if manifest is not None and manifest.is_file():
        m = _read_json(manifest)
        if isinstance(m.get("num_samples"), int):
            parts.append(f"{m['num_samples']:,} images")
        if m.get("max_side"):
            parts.append(
                f"pre-resized to max side {m['max_side']} px (JPEG q{m.get('quality')}, "
                f"{int(m.get('resized') or 0):,} shrunk)"
            )
        elif m:
            parts.append("original image files")
    if data.get("decode"):
        parts.append(f"decode {data['decode']}")
    return ", ".join(parts)


def load_run(path: str | os.PathLike, target: float | None = None) -> Run:
    """Read one run directory. Raises :class:`MimscaleError` if it is missing or has no metrics."""
    from ..telemetry import read_jsonl

    p = Path(path)
    if not p.is_dir():
        raise MimscaleError(f"run directory '{path}' does not exist (pass the train.run_dir of a run)")
    mpath = p / "metrics.jsonl"
    if not mpath.is_file():
        raise MimscaleError(f"'{path}' has no metrics.jsonl: is it the train.run_dir of a `mimscale pretrain` run?")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # fragments left by killed attempts
        records = read_jsonl(mpath, drop_rewound=True)
    records = [r for r in records if isinstance(r.get("step"), (int, float))]
    if not records:
        raise MimscaleError(f"'{path}/metrics.jsonl' holds no metric records yet: wait for the first log step")

    cfg, summary = _read_yaml(p / "config.yaml"), _read_json(p / "summary.json")
    model, train_cfg = cfg.get("model") or {}, cfg.get("train") or {}
    derived, log_cfg = cfg.get("derived") or {}, cfg.get("log") or {}
    run = Run(path=str(p.resolve()), label=str(log_cfg.get("run_name") or p.resolve().name), target=target)
    run.objective = summary.get("objective") or (cfg.get("objective") or {}).get("name")
    run.arch = summary.get("arch") or model.get("arch")
    run.patch_size, run.img_size = model.get("patch_size"), model.get("img_size")
    run.in_chans = model.get("in_chans", 3) if model else None
    run.params_total = summary.get("params_total")
    run.world_size = summary.get("world_size") or derived.get("world_size")
    run.batch_size = train_cfg.get("batch_size")
    run.data = describe_data(cfg)
    run.finished = bool(summary)

    train = sorted((r for r in records if LOSS_KEY in r or "time/device_hours" in r), key=lambda r: r["step"])
    run.steps = summary.get("steps") or (int(train[-1]["step"]) if train else None)
    run.total_steps = summary.get("total_steps") or derived.get("total_steps")

    spe = derived.get("steps_per_epoch")
    epochs = [e for e in (_finite(r.get("train/epoch")) for r in train) if e is not None]
    if spe and run.steps is not None:
        run.epochs = run.steps / spe
    elif epochs:
        run.epochs = max(epochs)
    if spe and run.total_steps:
        run.epochs_planned = run.total_steps / spe
    else:
        run.epochs_planned = _finite(train_cfg.get("epochs"))

    track = _device_hours_track(train)
    run.device_hours = track[-1][1] if track else None
    if run.device_hours is None and _finite(summary.get("train_seconds")) and run.world_size:
        run.device_hours = summary["train_seconds"] * run.world_size / 3600.0

    # compute: the run's objective against MAE (default knobs) on the same encoder
    # (summary.json; else the logged cumulative PFLOPs; else rebuild the objective from config.yaml)
    run.flops_per_sample = _finite(summary.get("flops_per_sample"))
    pf, done = _finite(summary.get("train_pflops")), summary.get("steps")
    if train_cfg.get("resolution_schedule") and pf and done and run.batch_size:  # the sizes it actually ran at
        run.flops_per_sample = pf * 1e15 / (done * run.batch_size)
    if run.flops_per_sample is None and run.batch_size:
        for r in reversed(train):
            pf = _finite(r.get("perf/train_pflops"))
            if pf and r["step"] > 0:
                run.flops_per_sample = pf * 1e15 / (r["step"] * run.batch_size)
                break
    if run.flops_per_sample is None and cfg:
        run.flops_per_sample = _objective_flops(cfg)
    if run.arch and run.img_size and run.patch_size:
        run.mae_flops_per_sample = mae_reference_flops(
            run.arch, int(run.img_size), int(run.patch_size), int(run.in_chans or 3)
        )
    if run.flops_per_sample and run.mae_flops_per_sample:
        run.mae_equiv_ratio = run.flops_per_sample / run.mae_flops_per_sample
        if run.epochs is not None:
            run.mae_equiv_epochs = run.epochs * run.mae_equiv_ratio

    # accuracy
    knn = _last_per_step(records, KNN_KEY)
    run.knn_curve = [[s, _interp(track, s), v] for s, v in knn]
    if knn:
        run.knn_init = knn[0][1] if knn[0][0] == 0 else None
        best = max(knn, key=lambda sv: sv[1])  # the first step that reaches the maximum
        run.knn_best, run.knn_best_step = best[1], best[0]
        run.knn_final = knn[-1][1]
    run.linear_best, run.linear_final = _best_and_final(records, LINEAR_KEY, p / "eval" / "linear.json")
    run.finetune_best, run.finetune_final = _best_and_final(records, FINETUNE_KEY, p / "eval" / "finetune.json")
    if target is not None:
        hit = first_reach(run.knn_curve, target)
        run.target_reached = hit is not None
        run.time_to_target_step, run.time_to_target_h = hit if hit else (None, None)

    # throughput, memory, loss
    rates = [v for v in (_finite(r.get("perf/img_per_s")) for r in train) if v and v > 0]
    run.img_per_s = statistics.median(rates) if rates else _finite(summary.get("img_per_s"))
    if run.img_per_s and run.flops_per_sample and run.world_size:
        run.tflops_per_device = run.flops_per_sample * run.img_per_s / run.world_size / 1e12
    mfu = [v for v in (_finite(r.get("perf/mfu")) for r in train) if v is not None]
    run.mfu = mfu[-1] if mfu else _finite(summary.get("mfu"))
    mem = [v for v in (_finite(r.get("perf/mem_peak_gb")) for r in records) if v is not None]
    run.mem_peak_gb = max(mem) if mem else None
    by_step: dict[int, float] = {}
    for r in train:  # non-finite losses stay in: the plot breaks its line there
        v = r.get(LOSS_KEY)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            by_step[int(r["step"])] = float(v)
    run.loss_curve = [[s, v] for s, v in sorted(by_step.items())]
    run.loss_nonfinite = sum(1 for _, v in run.loss_curve if not math.isfinite(v))
    losses = [r.get(LOSS_KEY) for r in train if LOSS_KEY in r]
    run.final_loss = _finite(summary.get("final_loss")) or (_finite(losses[-1]) if losses else None)
    return run


def check_target(target: float | None) -> None:
    """A ``--target`` outside (0, 100] is a one-line :class:`MimscaleError`."""
    if target is not None and not 0.0 < target <= 100.0:
        raise MimscaleError(f"--target {target} must be a kNN top-1 in percent, in (0, 100]")


def load_runs(paths: Sequence[str | os.PathLike], target: float | None = None) -> list[Run]:
    """Load several runs; labels that collide get their parent folder (then a number) added."""
    check_target(target)
    runs = [load_run(p, target) for p in paths]
    counts: dict[str, int] = {}
    for r in runs:
        counts[r.label] = counts.get(r.label, 0) + 1
    for r in runs:
        if counts[r.label] > 1:
            r.label = "/".join(Path(r.path).parts[-2:])
    seen: dict[str, int] = {}
    for r in runs:
        n = seen[r.label] = seen.get(r.label, 0) + 1
        if n > 1:
            r.label = f"{r.label} #{n}"
    return runs
