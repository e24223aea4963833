"""The league report of a ``mimscale compare`` directory: one row per member (objective), ranked.

A compare directory holds ``compare.json`` (the plan: recipe, budget, members), one
``teachers/<step>/cost.json`` per teacher step run there, and per member ``members/<name>/run/``
(its train.run_dir, read with :func:`mimscale.report.data.load_run`) and, once the member is complete,
``members/<name>/result.json``. A member without result.json is *unfinished* (shown with what its run
has so far) or *pending* (no metrics yet).

Definitions (also printed in the report's notes):

- **target**: the best kNN top-1 that every finished member reaches = the minimum over the finished
  members of their best kNN top-1 (``--target`` replaces it).
- **time-to-target**: device-hours (and step) of a member's first kNN evaluation at or above the target.
- **teacher cost**: device-hours of the teacher steps a member needs (CLIP training, k-means + codes):
  ``teacher_cost`` of its result.json, else the sum of the ``teachers/<step>/cost.json`` it lists.
- **total**: training device-hours + teacher device-hours.
- **FLOPs ratio**: FLOPs per image / those of the league's ``mae`` member (the member named ``mae``, else
  the first with objective ``mae``); without one, / those of MAE
  with its default knobs on the same encoder (:attr:`Run.mae_flops_per_sample`).
- **rankings**: finished members by final kNN top-1, and by time-to-target + teacher device-hours
  (members that never reach the target last); unfinished and pending members follow, in plan order.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import MimscaleError
from .data import Run, _finite, _read_json, first_reach, load_run

PLAN = "compare.json"


def is_compare_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` is a ``mimscale compare`` directory (it holds compare.json)."""
    return (Path(path) / PLAN).is_file()


@dataclass
class Member:
    """One league entry. Numbers are ``None`` when the member does not tell (yet)."""

    name: str
    objective: str | None
    status: str  # "done" (result.json), "unfinished" (run/ has metrics) or "pending" (nothing yet)
    teachers: list[str] = field(default_factory=list)
    index: int = 0  # position in the plan: colour and data-run attribute
    knn_final: float | None = None
    knn_best: float | None = None
    linear_top1: float | None = None
    ttt_step: int | None = None
    ttt_h: float | None = None  # time-to-target in training device-hours
    ttt_total_h: float | None = None  # time-to-target + teacher device-hours
    train_h: float | None = None
    teacher_h: float = 0.0
    total_h: float | None = None
    flops_per_sample: float | None = None
    flops_ratio: float | None = None
    img_per_s: float | None = None
    mfu: float | None = None
    mem_peak_gb: float | None = None
    run: Run | None = None

    @property
    def finished(self) -> bool:
        return self.status == "done"

    def to_json(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "run"}
        d["run"] = self.run.to_json() if self.run is not None else None
        return d


@dataclass
class League:
    path: str
    plan: dict[str, Any]
    members: list[Member]
    target: float | None = None
    target_source: str = ""
    flops_reference: str = ""
    rank_knn: list[str] = field(default_factory=list)
    rank_with_teacher: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "plan": self.plan,
            "target": self.target,
            "target_source": self.target_source,
            "flops_reference": self.flops_reference,
            "rank_knn": self.rank_knn,
            "rank_with_teacher": self.rank_with_teacher,
            "members": [m.to_json() for m in self.members],
        }


def read_plan(path: str | os.PathLike) -> dict[str, Any]:
    """compare.json of a compare directory; unreadable or not a plan is one :class:`MimscaleError` line."""
    p = Path(path) / PLAN
    try:
        plan = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise MimscaleError(f"{p}: unreadable ({e}); is it a `mimscale compare` directory?") from None
    members = plan.get("members") if isinstance(plan, dict) else None
    if not isinstance(members, list) or not all(isinstance(m, dict) and m.get("name") for m in members):
        raise MimscaleError(f"{p}: not a `mimscale compare` plan (needs a list of members, each with a name)")
    return plan


def _teacher_costs(root: Path) -> dict[str, float]:
    """Device-hours per teacher step that ran here (``teachers/<step>/cost.json``)."""
    costs = {}
    for p in sorted(root.glob("teachers/*/cost.json")):
        dh = _finite(_read_json(p).get("device_hours"))
        if dh is not None:
            costs[p.parent.name] = dh
    return costs


def _load_member(root: Path, entry: dict, index: int, teacher_costs: dict[str, float]) -> Member:
    name = str(entry["name"])
    mdir = root / "members" / name
    result = _read_json(mdir / "result.json")
    teachers = [str(t) for t in entry.get("teachers") or []]
    m = Member(name, result.get("objective") or entry.get("objective"), "pending", teachers, index)
    if (mdir / "run" / "metrics.jsonl").is_file():
        try:
            m.run = load_run(mdir / "run")
        except MimscaleError:  # metrics.jsonl without a record yet: still pending
            m.run = None
    m.status = str(result.get("status") or "done") if result else ("unfinished" if m.run else "pending")
    spent = sum(teacher_costs.get(t, 0.0) for t in teachers)
    paid = _finite((result.get("teacher_cost") or {}).get("device_hours"))
    m.teacher_h = paid if paid is not None else spent
    m.linear_top1 = _finite(result.get("linear_top1"))
    if m.run is not None:
        r = m.run
        m.run.label = name
        m.objective = m.objective or r.objective
        m.knn_final, m.knn_best, m.train_h = r.knn_final, r.knn_best, r.device_hours
        m.linear_top1 = m.linear_top1 if m.linear_top1 is not None else r.linear_best
        m.flops_per_sample, m.img_per_s, m.mfu, m.mem_peak_gb = r.flops_per_sample, r.img_per_s, r.mfu, r.mem_peak_gb
    m.total_h = m.train_h + m.teacher_h if m.train_h is not None else None
    return m


def _apply_target(members: list[Member], target: float | None) -> None:
    for m in members:
        hit = first_reach(m.run.knn_curve, target) if m.run is not None and target is not None else None
        m.ttt_step, m.ttt_h = hit if hit else (None, None)
        m.ttt_total_h = m.ttt_h + m.teacher_h if m.ttt_h is not None else None


def _apply_flops_reference(members: list[Member]) -> str:
    """Set each member's FLOPs ratio; returns which reference was used (for the report's notes)."""
    maes = [m for m in members if m.objective == "mae" and m.flops_per_sample]
    mae = next((m for m in maes if m.name == "mae"), maes[0] if maes else None)
    for m in members:
        ref = mae.flops_per_sample if mae else (m.run.mae_flops_per_sample if m.run else None)
        m.flops_ratio = m.flops_per_sample / ref if m.flops_per_sample and ref else None
    if mae is not None:
        return f"the league's MAE member '{mae.name}'"
    return "MAE with its default knobs (mask 0.75, 512-d x 8-block decoder) on the same encoder"


def _ranking(members: list[Member], key) -> list[str]:
    """Names: finished members sorted by ``key`` (missing values last), then the others in plan order."""
    done = [m for m in members if m.finished]
    done.sort(key=lambda m: (key(m) is None, key(m) if key(m) is not None else 0.0))
    return [m.name for m in done] + [m.name for m in members if not m.finished]


def load_league(path: str | os.PathLike, target: float | None = None) -> League:
    """Read a compare directory and derive the league numbers (``target`` overrides the league's own)."""
    root = Path(path)
    plan = read_plan(root)
    costs = _teacher_costs(root)
    members = [_load_member(root, e, i, costs) for i, e in enumerate(plan["members"])]
    league = League(str(root.resolve()), plan, members, target=target, target_source="--target")
    if target is None:
        bests = [m.knn_best for m in members if m.finished and m.knn_best is not None]
        league.target = min(bests) if bests else None
        league.target_source = "the lowest best kNN top-1 of the finished members"
    _apply_target(members, league.target)
    league.flops_reference = _apply_flops_reference(members)
    league.rank_knn = _ranking(members, lambda m: None if m.knn_final is None else -m.knn_final)
    league.rank_with_teacher = _ranking(members, lambda m: m.ttt_total_h)
    return league


def _md(v: float | None, fmt: str) -> str:
    return "—" if v is None else format(v, fmt)


def markdown_table(league: League) -> str:
    """The league as a Markdown table (``league.md``: paste it into a README or an issue), ranked by final kNN;
    times in device-minutes."""
    rows = [
        "| # | objective | kNN top-1 | linear top-1 | min to target | teacher min | img/s | FLOPs/img vs MAE | train min |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    done = [n for n in league.rank_knn if any(m.name == n and m.finished for m in league.members)]
    order = {name: i for i, name in enumerate(done)}

    def minutes(h: float | None) -> str:
        return _md(None if h is None else h * 60, ".1f")

    for m in sorted(league.members, key=lambda m: order.get(m.name, len(order) + m.index)):
        rows.append(
            f"| {order[m.name] + 1 if m.name in order else m.status} | {m.name} | {_md(m.knn_final, '.2f')} "
            f"| {_md(m.linear_top1, '.2f')} | {minutes(m.ttt_h)} | {minutes(m.teacher_h)} | {_md(m.img_per_s, '.0f')} "
            f"| {_md(m.flops_ratio, '.2f')} | {minutes(m.train_h)} |"
        )
    target = f"{league.target:.2f}%" if league.target is not None else "—"
    return "\n".join([*rows, "", f"Target (min to target): kNN top-1 {target}, {league.target_source}."]) + "\n"
