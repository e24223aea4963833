"""Running a comparison: teacher steps, then per member calibrate -> train to the budget -> linear probe.

Every step is a ``mimscale`` command in a child process (what a user would type), so a member is an ordinary
run directory. Layout (``docs/guide/compare.md``): ``DIR/compare.json`` (the plan), ``DIR/teachers/<step>/``
(with ``cost.json`` once done), ``DIR/members/<name>/{calibrate,run}/`` and ``result.json`` once the member is
complete. A restart skips what is complete: a member with ``result.json`` is not rerun, an interrupted
member's training resumes from its last checkpoint (``train.resume=auto``, saved every
``SAVE_EVERY_MINUTES``), a calibration that finished is reused.

**The budget.** ``minutes``: the run gets ``train.max_minutes`` and ``train.schedule_by_time``, so its lr /
wd / EMA schedules follow the measured progress (position = max(step / total, training time / budget),
re-planned from the run's own throughput every ``log_every`` steps) and end at the budget whatever the
machine's load; a short calibration run measures the member's img/s to size ``epochs`` (a cap:
``EPOCH_CAP`` x the calibrated estimate, so a run faster than its calibration still trains to the budget).
``mae_epochs``: ``epochs = E x flops(MAE) / flops(member)`` (MAE with its default knobs on the same encoder:
the report's MAE-equivalent epochs), no time limit: exact by construction.

**Seeds.** ``plan.seeds`` = K runs per member; seed k adds k to ``train.seed`` (init, data order and masks
all follow it) and lives in ``members/<name>/seed<k>/`` (k >= 1); teachers and calibration are shared.
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
from .spec import Member, Plan, config_notes_silenced, placeholder_overrides, teacher_overrides

EPOCH_CAP = 10.0  # minutes budget: epochs = EPOCH_CAP x the calibrated estimate (a cap; the clock ends the run)
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
    """A short run (``plan.calibrate_steps`` steps) without evaluation or checkpoints before its end: the member's
    img/s and FLOPs per image on this machine (cached)."""
    mdir = root / "members" / member.name
    cal = mdir / "calibrate"
    if (cal / "summary.json").is_file():
        return _read_json(cal / "summary.json")
    knobs = [f"train.max_steps={plan.calibrate_steps}", "eval.knn_at_start=false", "eval.knn_train=null"]
    knobs += ["eval.knn_test=null", f"train.run_dir={cal}", "train.resume=never", "train.save_every_minutes=null"]
    knobs += ["train.save_every=0"]
    say(f"{member.name}: calibrating ({plan.calibrate_steps} steps)")
    mimscale(["pretrain", plan.recipe, *member_overrides(plan, member, root), *knobs], launch, mdir / "log.txt")
    return _read_json(cal / "summary.json")


def schedule(plan: Plan, cal: dict[str, Any], images: int, cfg) -> dict[str, Any]:
    """Epochs (and the kNN cadence) that make the member's schedule end at the budget."""
    from ..report import mae_reference_flops

    kind, value, evals = plan.budget["kind"], plan.budget["value"], plan.knn_evals
    if kind == "minutes":
        epochs = EPOCH_CAP * value * 60 * cal["img_per_s"] / images
        knobs = [f"train.max_minutes={value}", "train.schedule_by_time=true"]
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


def run_member(plan: Plan, member: Member, root: Path, launch: str = "none", seed: int = 0) -> dict[str, Any]:
    """Teachers, calibration, the budgeted run and the linear probe of one member's seed ``seed``; returns its
    result."""
    from ..report.league import seed_dir

    sdir = seed_dir(root, member.name, seed)
    who = member.name + (f" seed {seed}" if seed else "")
    done = sdir / "result.json"
    if done.is_file():
        say(f"{who}: complete (result.json), not rerun")
        return _read_json(done)
    sdir.mkdir(parents=True, exist_ok=True)
    prepare_teachers(plan, member, root)
    ov = member_overrides(plan, member, root)
    cal = calibrate(plan, member, root, launch)
    from ..config import load

    cfg = load(plan.recipe, ov)
    sched = schedule(plan, cal, _train_images(plan, ov), cfg)
    run = sdir / "run"
    knobs = [f"train.run_dir={run}", f"train.save_every_minutes={SAVE_EVERY_MINUTES}", *sched["knobs"]]
    knobs += [f"train.seed={cfg.train.seed + seed}"] if seed else []
    resumed = (run / "checkpoints").is_dir()
    say(
        f"{who}: training {sched['epochs']:.3f} epochs ({plan.budget['kind']} budget "
        f"{plan.budget['value']:g}; calibrated {cal['img_per_s']:.0f} img/s){' - resuming' if resumed else ''}"
    )
    mimscale(["pretrain", plan.recipe, *ov, *knobs], launch, sdir / "log.txt")
    summary = _read_json(run / "summary.json")
    linear = linear_probe(plan, run, launch, sdir / "log.txt")
    result = {
        "name": member.name,
        "objective": member.objective,
        "seed": seed,
        "train_seed": cfg.train.seed + seed,
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
    say(f"{who}: done, kNN top-1 {summary.get('knn_top1_final')}, linear top-1 {linear}")
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


# ----------------------------------------------------------------------------- the dry run's estimate


def _flops_per_sample(plan: Plan, member: Member, root: Path) -> float | None:
    """The member's training FLOPs per image: its cached calibration, else its objective built on the meta
    device (``None`` when it cannot be built without its teacher's files)."""
    import warnings

    from ..config import load, to_dict
    from ..report.data import _objective_flops

    cal = root / "members" / member.name / "calibrate" / "summary.json"
    if cal.is_file():
        return _read_json(cal).get("flops_per_sample")
    cfg = load(plan.recipe, [*plan.overrides, *member.overrides, *placeholder_overrides(member)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return _objective_flops(to_dict(cfg))


def estimate(plan: Plan, root: Path) -> list[dict[str, Any]]:
    """Per member, without running or storing anything: steps, epochs and training minutes per seed, and the
    minutes of its teacher steps. Throughput comes from the member's cached calibration, else from another
    member's calibration scaled by FLOPs per image (``rate_from`` says which), else it is unknown (``None``:
    the first real start calibrates); teacher minutes from ``teachers/<step>/cost.json`` once they ran."""
    from ..config import load
    from ..report import mae_reference_flops

    with config_notes_silenced():
        return _estimate(plan, root, load, mae_reference_flops)


def _estimate(plan: Plan, root: Path, load, mae_reference_flops) -> list[dict[str, Any]]:
    flops = {m.name: _flops_per_sample(plan, m, root) for m in plan.members}
    base_images = _train_images(plan, list(plan.overrides))
    rates = {}
    for m in plan.members:
        cal = root / "members" / m.name / "calibrate" / "summary.json"
        if cal.is_file():
            rates[m.name] = _read_json(cal).get("img_per_s")
    ref = next(((n, r) for n, r in rates.items() if r and flops.get(n)), None)
    out = []
    for m in plan.members:
        ov = [*plan.overrides, *m.overrides, *placeholder_overrides(m)]
        cfg = load(plan.recipe, ov)
        try:
            images: int | None = _train_images(plan, ov)
        except MimscaleError:  # a teacher-made copy of the training set (codes added) that does not exist yet
            images = base_images
        f, rate, rate_from = flops.get(m.name), rates.get(m.name), m.name if m.name in rates else None
        if rate is None and ref is not None and f:
            rate, rate_from = ref[1] * (flops[ref[0]] or 0.0) / f, f"{ref[0]} x FLOPs ratio"
        batch, kind, value = cfg.train.batch_size, plan.budget["kind"], plan.budget["value"]
        epochs = steps = minutes = None
        if kind == "minutes":
            minutes = value
            if rate and images:
                epochs = value * 60 * rate / images
        else:
            mm = cfg.model
            mae = mae_reference_flops(mm.arch, mm.img_size, mm.patch_size, mm.in_chans)
            epochs = value * mae / f if mae and f else None
            if epochs is not None and rate and images:
                minutes = epochs * images / rate / 60
        if epochs is not None and images:
            steps = math.ceil(epochs * images / batch)
        calib = None if m.name in rates or not rate else plan.calibrate_steps * batch / rate / 60
        costs = [root / "teachers" / step / "cost.json" for step in m.teachers]
        teacher = sum(_read_json(c)["seconds"] for c in costs) / 60 if all(c.is_file() for c in costs) else None
        out.append(
            {
                "name": m.name,
                "steps": steps,
                "epochs": epochs,
                "train_minutes": minutes,
                "calibrate_minutes": calib,
                "teacher_minutes": teacher,
                "teachers": list(m.teachers),
                "img_per_s": rate,
                "rate_from": rate_from,
                "seeds": plan.seeds,
            }
        )
    return out


def format_estimate(rows: list[dict[str, Any]], plan: Plan) -> list[str]:
    """The dry run's table: one line per member, then the whole comparison's training minutes."""

    def num(v: float | None, fmt: str) -> str:
        return "?" if v is None else format(v, fmt)

    seeds = f" x {plan.seeds} seeds" if plan.seeds > 1 else ""
    lines = [f"{'member':12s} {'steps':>8s} {'epochs':>8s} {'train min':>10s} {'teacher min':>12s}  throughput"]
    total, known = 0.0, True
    for r in rows:
        teacher = "-" if not r["teachers"] else num(r["teacher_minutes"], ".1f")
        if not r["teachers"]:
            teacher_note = ""
        elif r["teacher_minutes"] is None:
            teacher_note = f" ({'+'.join(r['teachers'])} not timed yet)"
        else:
            teacher_note = f" ({'+'.join(r['teachers'])}, shared)"
        rate = "not calibrated yet" if r["img_per_s"] is None else f"{r['img_per_s']:.0f} img/s ({r['rate_from']})"
        lines.append(
            f"{r['name']:12s} {num(r['steps'], ',d'):>8s} {num(r['epochs'], '.3f'):>8s} "
            f"{num(r['train_minutes'], '.1f'):>10s} {teacher:>12s}  {rate}{teacher_note}"
        )
        if r["train_minutes"] is None:
            known = False
        else:
            total += r["train_minutes"] * plan.seeds + (r["calibrate_minutes"] or 0.0)
    lines.append(
        f"training{seeds}: {'about ' + format(total, '.0f') if known else 'unknown (not calibrated)'} min in all, "
        "plus kNN evaluations, linear probes and the teacher steps not yet run"
    )
    return lines
