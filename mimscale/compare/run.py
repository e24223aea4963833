"""Running a comparison: teacher steps, then per member calibrate -> train to the budget -> linear probe.

Every step is a ``mimscale`` command in a child process (what a user would type), so a member is an ordinary
run directory. Layout (``docs/guide/compare.md``): ``DIR/compare.json`` (the plan), ``DIR/teachers/<step>/``
(with ``cost.json`` once done), ``DIR/members/<name>/{calibrate,run}/`` and ``result.json`` once the member is
complete. A restart skips what is complete: a member with ``result.json`` is not rerun, an interrupted
member's training resumes from its last checkpoint (``train.resume=auto``, saved every
``SAVE_EVERY_MINUTES``), a calibration that finished is reused.

**The budget.** ``minutes``: a short calibration run measures the member's img/s on this machine; its run
gets ``epochs = minutes x 60 x img/s / train images`` so the cosine schedule ends at the budget, and
``train.max_minutes`` stops it there regardless. ``mae_epochs``: ``epochs = E x flops(MAE) / flops(member)``
(MAE with its default knobs on the same encoder: the report's MAE-equivalent epochs), no time limit.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from ..errors import MimscaleError
from .spec import Member, Plan, teacher_overrides

CALIBRATE_STEPS = 60
EXIT_REQUEUE = 42  # a child saved on a signal (mimscale.checkpoint.EXIT_REQUEUE, without importing deepspeed)
SAVE_EVERY_MINUTES = 2.0
LAUNCHES = ("none", "srun")


class Interrupted(MimscaleError):
    """A child saved and stopped on a signal (exit 42): the comparison resumes when started again."""


def say(msg: str) -> None:
    print(f"[compare {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- child processes


_child: subprocess.Popen | None = None
_signalled: int | None = None  # USR1 / TERM came: no further child starts; the comparison is interrupted


def _forward(signum, frame) -> None:  # SIGUSR1 / SIGTERM: the child saves and exits 42; we wait for it
    global _signalled
    _signalled = signum
    if _child is not None and _child.poll() is None:
        _child.send_signal(signum)


@contextmanager
def forwarding_signals() -> Iterator[None]:
    """USR1 / TERM during the whole comparison (also between two children) interrupt it, never kill it."""
    global _signalled
    _signalled = None
    old = {s: signal.signal(s, _forward) for s in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def mimscale(args: list[str], launch: str = "none", log: Path | None = None) -> None:
    """Run ``python -m mimscale.cli ARGS`` (under ``srun`` for ``launch=srun``); raise on failure."""
    global _child
    cmd = [sys.executable, "-m", "mimscale.cli", *args]
    if launch == "srun":
        cmd = ["srun", "--label", "--wait=120", *cmd]
    with forwarding_signals() if signal.getsignal(signal.SIGUSR1) is not _forward else nullcontext():
        if _signalled is not None:
            raise Interrupted(f"signal {_signalled} before `{' '.join(args[:2])}`; run the same command again")
        say("+ " + " ".join(cmd))
        try:
            with open(log, "a") if log else open(os.devnull, "w") as f:
                _child = subprocess.Popen(cmd, stdout=None if log is None else f, stderr=subprocess.STDOUT)
                rc = _child.wait()
        finally:
            _child = None
        signalled = _signalled
    if rc == EXIT_REQUEUE or (rc != 0 and signalled is not None):  # a step without a checkpoint is redone on resume
        raise Interrupted(
            f"`{' '.join(args[:2])}` stopped on a signal (exit {rc}); run the same command again to resume"
        )
    if rc != 0:
        where = f" (log: {log})" if log else ""
        raise MimscaleError(f"`mimscale {args[0]} {args[1] if len(args) > 1 else ''}` failed with exit {rc}{where}")


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise MimscaleError(f"{path}: unreadable ({e}); delete it to redo that step") from None


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock file: array tasks that need the same teacher build it once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------- teachers


def teacher_cost(plan: Plan, member: Member, root: Path) -> dict[str, Any]:
    """Device-hours of the teacher steps this member needed (each counted in full for every member using it:
    what the objective costs on its own)."""
    steps = {s: _read_json(root / "teachers" / s / "cost.json")["device_hours"] for s in member.teachers}
    return {"device_hours": sum(steps.values()), "steps": steps}


def prepare_teachers(plan: Plan, member: Member, root: Path) -> None:
    for step in member.teachers:
        out = root / "teachers" / step
        with _locked(root / "teachers" / f".{step}.lock"):
            if (out / "cost.json").is_file():
                continue
            out.mkdir(parents=True, exist_ok=True)
            say(f"teacher step '{step}' for {member.name} (its cost is counted in the teacher column)")
            parts = (_clip if step == "clip" else _kclip)(plan, member, root, out)
            seconds = sum(parts.values())
            doc = {"step": step, "seconds": seconds, "device_hours": seconds / 3600, "world_size": 1, "parts": parts}
            _write_json(out / "cost.json", doc)
            say(f"teacher step '{step}' done in {seconds:.0f} s")


def _timed(args: list[str], log: Path) -> float:
    t = time.perf_counter()
    mimscale(args, log=log)
    return time.perf_counter() - t


def _clip(plan: Plan, member: Member, root: Path, out: Path) -> dict[str, float]:
    knobs = plan.teachers.get("clip", {})
    args = ["teacher", "train-clip", str(out / "clip.pt"), "--train", str(plan.data["train"])]
    if plan.data.get("knn_test"):
        args += ["--test", str(plan.data["knn_test"])]
    for k, v in knobs.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return {"train-clip": _timed(args, out / "log.txt")}


def _kclip(plan: Plan, member: Member, root: Path, out: Path) -> dict[str, float]:
    from ..config import load
    from ..data import builtin

    cfg = load(plan.recipe, [*plan.overrides, *member.overrides])
    obj, train = cfg.objective, builtin.resolve(str(plan.data["train"]), cfg.data.root)
    size = str(obj.get("target_image_size") or cfg.model.img_size)
    clip, km, log = root / "teachers" / "clip" / "clip.pt", out / "km.pt", out / "log.txt"
    knobs = {"iters": 10, **plan.teachers.get("kclip", {})}
    fit = ["teacher", "fit-kmeans", train, "--teacher", str(clip), "--k", str(obj["vocab_size"])]
    fit += ["--out", str(km), "--image-size", size, *(f"--{k.replace('_', '-')}={v}" for k, v in knobs.items())]
    codes = ["data", "add-targets", train, "--teacher", str(clip), "--kind", "codes"]
    codes += ["--kmeans", str(km), "--out", str(out / "train"), "--image-size", size]
    codes += ["--crop-pct", str(obj.get("crop_pct", 1.0))]
    return {"fit-kmeans": _timed(fit, log), "add-targets": _timed(codes, log)}


# ----------------------------------------------------------------------------- members


def member_overrides(plan: Plan, member: Member, root: Path) -> list[str]:
    return [*plan.overrides, *member.overrides, *teacher_overrides(member, root / "teachers"), "log.wandb=disabled"]


def _train_images(plan: Plan, overrides: list[str]) -> int:
    from ..config import load
    from ..data import builtin
    from ..data.epoch import count_samples

    cfg = load(plan.recipe, overrides)
    return count_samples(builtin.resolve(cfg.data.train, cfg.data.root), cfg.data.samples_per_epoch)


def calibrate(plan: Plan, member: Member, root: Path, launch: str) -> dict[str, Any]:
    """A short run without evaluation: the member's img/s and FLOPs per image on this machine (cached)."""
    mdir = root / "members" / member.name
    cal = mdir / "calibrate"
    if (cal / "summary.json").is_file():
        return _read_json(cal / "summary.json")
    knobs = [f"train.max_steps={CALIBRATE_STEPS}", "eval.knn_at_start=false", "eval.knn_train=null"]
    knobs += ["eval.knn_test=null", f"train.run_dir={cal}", "train.resume=never", "train.save_every_minutes=null"]
    say(f"{member.name}: calibrating ({CALIBRATE_STEPS} steps)")
    mimscale(["pretrain", plan.recipe, *member_overrides(plan, member, root), *knobs], launch, mdir / "log.txt")
    return _read_json(cal / "summary.json")


def schedule(plan: Plan, cal: dict[str, Any], images: int, cfg) -> dict[str, Any]:
    """Epochs (and the kNN cadence) that make the member's schedule end at the budget."""
    from ..report import mae_reference_flops

    kind, value, evals = plan.budget["kind"], plan.budget["value"], plan.knn_evals
    if kind == "minutes":
        epochs = value * 60 * cal["img_per_s"] / images
        knobs = [f"train.max_minutes={value}"]
        knobs += [f"eval.knn_every_minutes={value / (evals + 1):.4f}"] if evals else []
    else:
        m = cfg.model
        ref = mae_reference_flops(m.arch, m.img_size, m.patch_size, m.in_chans)
        if not ref:
            raise MimscaleError(f"cannot count MAE's FLOPs on {m.arch}: use --budget-minutes")
        epochs = value * ref / cal["flops_per_sample"]
        steps = math.ceil(epochs * images / cfg.train.batch_size)
        knobs = [f"eval.knn_every={max(1, math.ceil(steps / (evals + 1)))}"] if evals else []
    return {"epochs": epochs, "knobs": [f"train.epochs={epochs:.6f}", *knobs]}


def run_member(plan: Plan, member: Member, root: Path, launch: str = "none") -> dict[str, Any]:
    """Teachers, calibration, the budgeted run and the linear probe of one member; returns its result."""
    mdir = root / "members" / member.name
    done = mdir / "result.json"
    if done.is_file():
        say(f"{member.name}: complete (result.json), not rerun")
        return _read_json(done)
    mdir.mkdir(parents=True, exist_ok=True)
    prepare_teachers(plan, member, root)
    ov = member_overrides(plan, member, root)
    cal = calibrate(plan, member, root, launch)
    from ..config import load

    cfg = load(plan.recipe, ov)
    sched = schedule(plan, cal, _train_images(plan, ov), cfg)
    run = mdir / "run"
    knobs = [f"train.run_dir={run}", f"train.save_every_minutes={SAVE_EVERY_MINUTES}", *sched["knobs"]]
    resumed = (run / "checkpoints").is_dir()
    say(
        f"{member.name}: training {sched['epochs']:.3f} epochs ({plan.budget['kind']} budget "
        f"{plan.budget['value']:g}; calibrated {cal['img_per_s']:.0f} img/s){' - resuming' if resumed else ''}"
    )
    mimscale(["pretrain", plan.recipe, *ov, *knobs], launch, mdir / "log.txt")
    summary = _read_json(run / "summary.json")
    linear = linear_probe(plan, run, launch, mdir / "log.txt")
    result = {
        "name": member.name,
        "objective": member.objective,
        "status": "done",
        "budget": plan.budget,
        "calibrated_img_per_s": cal["img_per_s"],
        "epochs_planned": sched["epochs"],
        "train_minutes": summary.get("train_seconds", 0.0) / 60,
        "linear_top1": linear,
        "teacher_cost": teacher_cost(plan, member, root),
        "summary": summary,
    }
    _write_json(done, result)
    say(f"{member.name}: done, kNN top-1 {summary.get('knn_top1_final')}, linear top-1 {linear}")
    return result


def linear_probe(plan: Plan, run: Path, launch: str, log: Path) -> float | None:
    """``mimscale eval linear`` on the member's final encoder (the same knobs for every member)."""
    if plan.linear is None or not plan.data.get("knn_train") or not plan.data.get("knn_test"):
        return None
    out = run / "eval" / "linear.json"
    if not out.is_file():
        args = ["eval", "linear", str(run), "--data", str(plan.data["knn_train"]), "--test", str(plan.data["knn_test"])]
        mimscale([*args, *(f"{k}={v}" for k, v in plan.linear.items())], launch, log)
    return _read_json(out).get("top1")
