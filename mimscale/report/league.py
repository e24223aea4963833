"""The league report of a ``mimscale compare`` directory: one row per member (objective), ranked.

A compare directory holds ``compare.json`` (the plan: recipe, budget, members), one
``teachers/<step>/cost.json`` per teacher step run there, and per member ``members/<name>/run/``
(its train.run_dir, read with :func:`mimscale.report.data.load_run`) and, once the member is complete,
``members/<name>/result.json``. A member without result.json is *unfinished* (shown with what its run
has so far) or *pending* (no metrics yet).

With ``seeds: K`` in the plan every member runs K times (``train.seed`` + k: other init, data order and
masks); seed 0 lives in ``members/<name>/``, seed k >= 1 in ``members/<name>/seed<k>/`` (each with its own
``run/`` and ``result.json``). A member is finished when all its seeds are.

Definitions (also printed in the report's notes):

- **per-member numbers**: the mean over its seeds, with the sample standard deviation and each seed's value;
  rankings use the mean.
- **within the noise**: Welch's two-sided t-test on the per-seed final kNN top-1 of two members cannot
  separate their means at p = 0.05 (:mod:`.stats`); needs >= 2 seeds on both sides.
- **target**: the best kNN top-1 that every finished run reaches = the minimum over the finished members'
  seeds of their best kNN top-1 (``--target`` replaces it) -- but only when it is above the best random-init
  kNN top-1 of the league; otherwise there is **no common target** and no time-to-target ranking.
- **time-to-target**: device-hours (and step) of a run's first kNN evaluation at or above the target; a
  member's is the mean over its seeds when every seed reaches it.
- **achieved training minutes**: the training time each run really had (``result.json``'s
  ``train_minutes``), shown beside the budget.
- **budget used**: what each run spent in the budget's own unit -- its training minutes (a ``minutes``
  budget) or the MAE-equivalent epochs it trained (a ``mae_epochs`` FLOP budget: epochs x its FLOPs per
  image / MAE's); a member's deviation is its worst seed's, relative to the budget.
- **teacher cost**: device-hours of the teacher steps a member needs (CLIP training, k-means + codes):
  ``teacher_cost`` of its result.json, else the sum of the ``teachers/<step>/cost.json`` it lists.
- **total**: training device-hours + teacher device-hours.
- **FLOPs ratio**: FLOPs per image / those of the league's ``mae`` member (the member named ``mae``, else
  the first with objective ``mae``); without one, / those of MAE
  with its default knobs on the same encoder (:attr:`Run.mae_flops_per_sample`).
- **rankings**: finished members by mean final kNN top-1, and by time-to-target + teacher device-hours
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
from .stats import kendall_tau, mean_std, within_noise

PLAN = "compare.json"
BUDGET_UNITS = {"minutes": "min", "mae_epochs": "MAE-eq. epochs"}  # a plan's budget kind -> its unit


def is_compare_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` is a ``mimscale compare`` directory (it holds compare.json)."""
    return (Path(path) / PLAN).is_file()


def seed_dir(root: str | os.PathLike, name: str, seed: int) -> Path:
    """Where seed ``seed`` of member ``name`` lives: ``members/<name>`` (seed 0) or ``members/<name>/seed<k>``."""
    base = Path(root) / "members" / name
    return base if seed == 0 else base / f"seed{seed}"


@dataclass
class SeedRun:
    """One seed of a member: its run directory's numbers and its result.json (when complete)."""

    seed: int
    status: str  # "done" | "unfinished" | "pending"
    run: Run | None = None
    knn_final: float | None = None
    knn_best: float | None = None
    knn_init: float | None = None
    linear_top1: float | None = None
    train_minutes: float | None = None  # achieved training time
    budget_used: float | None = None  # in the budget's unit: training minutes or MAE-eq. epochs
    train_h: float | None = None
    ttt_step: int | None = None
    ttt_h: float | None = None

    def to_json(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "run"}
        d["path"] = self.run.path if self.run is not None else None
        return d


@dataclass
class Member:
    """One league entry: the mean over its seeds (``*_std``: sample standard deviation, ``None`` for one
    seed; ``*_seeds``: each seed's value). Numbers are ``None`` when the member does not tell (yet)."""

    name: str
    objective: str | None
    status: str  # "done" (every seed's result.json), "unfinished" (some run has metrics) or "pending"
    teachers: list[str] = field(default_factory=list)
    index: int = 0  # position in the plan: colour and data-run attribute
    seeds: int = 1  # planned
    seeds_done: int = 0
    knn_final: float | None = None
    knn_final_std: float | None = None
    knn_final_seeds: list[float] = field(default_factory=list)
    knn_best: float | None = None
    knn_best_std: float | None = None
    linear_top1: float | None = None
    linear_std: float | None = None
    linear_seeds: list[float] = field(default_factory=list)
    train_minutes: float | None = None  # achieved, mean over seeds
    train_minutes_std: float | None = None
    train_minutes_seeds: list[float] = field(default_factory=list)
    budget_used: float | None = None  # mean over seeds, in budget_unit
    budget_unit: str | None = None  # "min" (minutes budget) or "MAE-eq. epochs" (FLOP budget)
    budget_dev: float | None = None  # the worst seed's (budget used / budget - 1)
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
    noise_peers: list[str] = field(default_factory=list)  # members whose final kNN is within the noise
    run: Run | None = None  # the first seed with a run (curves)
    seed_runs: list[SeedRun] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.status == "done"

    def to_json(self) -> dict[str, Any]:
        skip = ("run", "seed_runs")
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        d["run"] = self.run.to_json() if self.run is not None else None
        d["seed_runs"] = [s.to_json() for s in self.seed_runs]
        return d


@dataclass
class League:
    path: str
    plan: dict[str, Any]
    members: list[Member]
    target: float | None = None
    target_source: str = ""
    init_best: float | None = None  # the best random-init kNN top-1 of any run
    flops_reference: str = ""
    noise_test: str = "Welch's two-sided t-test on the per-seed final kNN top-1, p >= 0.05"
    rank_knn: list[str] = field(default_factory=list)
    rank_with_teacher: list[str] = field(default_factory=list)

    @property
    def seeds(self) -> int:
        return max((m.seeds for m in self.members), default=1)

    @property
    def budget_dev(self) -> float | None:
        """The largest |budget used / budget - 1| of any finished member's seeds (None: nothing to tell)."""
        devs = [abs(m.budget_dev) for m in self.members if m.finished and m.budget_dev is not None]
        return max(devs) if devs else None

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "plan": self.plan,
            "seeds": self.seeds,
            "target": self.target,
            "target_source": self.target_source,
            "init_best": self.init_best,
            "flops_reference": self.flops_reference,
            "noise_test": self.noise_test,
            "rank_knn": self.rank_knn,
            "rank_with_teacher": self.rank_with_teacher,
            "budget_dev": self.budget_dev,
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


def _load_seed(sdir: Path, seed: int, budget_kind: str | None = None) -> tuple[SeedRun, dict]:
    result = _read_json(sdir / "result.json")
    s = SeedRun(seed, "pending")
    if (sdir / "run" / "metrics.jsonl").is_file():
        try:
            s.run = load_run(sdir / "run")
        except MimscaleError:  # metrics.jsonl without a record yet: still pending
            s.run = None
    s.status = str(result.get("status") or "done") if result else ("unfinished" if s.run else "pending")
    s.linear_top1 = _finite(result.get("linear_top1"))
    s.train_minutes = _finite(result.get("train_minutes"))
    if s.run is not None:
        r = s.run
        s.knn_final, s.knn_best, s.knn_init, s.train_h = r.knn_final, r.knn_best, r.knn_init, r.device_hours
        s.linear_top1 = s.linear_top1 if s.linear_top1 is not None else r.linear_final
        if s.train_minutes is None and r.device_hours is not None:
            s.train_minutes = r.device_hours * 60 / (r.world_size or 1)
    s.budget_used = s.train_minutes if budget_kind == "minutes" else None
    if budget_kind == "mae_epochs" and s.run is not None:
        s.budget_used = _finite(s.run.mae_equiv_epochs)
    return s, result


def _values(seeds: list[SeedRun], attr: str) -> list[float]:
    return [v for v in (getattr(s, attr) for s in seeds) if v is not None]


def _load_member(
    root: Path, entry: dict, index: int, teacher_costs: dict[str, float], seeds: int, budget: dict | None = None
) -> Member:
    name = str(entry["name"])
    teachers = [str(t) for t in entry.get("teachers") or []]
    kind = (budget or {}).get("kind")
    loaded = [_load_seed(seed_dir(root, name, k), k, kind) for k in range(seeds)]
    m = Member(name, entry.get("objective"), "pending", teachers, index, seeds=seeds)
    m.budget_unit = BUDGET_UNITS.get(str(kind))
    m.seed_runs = [s for s, _ in loaded]
    results = [r for _, r in loaded if r]
    m.objective = next((r.get("objective") for r in results if r.get("objective")), None) or m.objective
    m.seeds_done = sum(s.status == "done" for s in m.seed_runs)
    if m.seeds_done == seeds:
        m.status = "done"
    elif m.seeds_done or any(s.run is not None for s in m.seed_runs):
        m.status = "unfinished"
    spent = sum(teacher_costs.get(t, 0.0) for t in teachers)
    paid = [_finite((r.get("teacher_cost") or {}).get("device_hours")) for r in results]
    paid_h = next((h for h in paid if h is not None), None)
    m.teacher_h = paid_h if paid_h is not None else spent
    # a finished member: its seeds; an unfinished one: what its runs have so far
    use = m.seed_runs if not m.finished else [s for s in m.seed_runs if s.status == "done"]
    m.knn_final_seeds = _values(use, "knn_final")
    m.knn_final, m.knn_final_std = mean_std(m.knn_final_seeds)
    m.knn_best, m.knn_best_std = mean_std(_values(use, "knn_best"))
    m.linear_seeds = _values(use, "linear_top1")
    m.linear_top1, m.linear_std = mean_std(m.linear_seeds)
    m.train_minutes_seeds = _values(use, "train_minutes")
    m.train_minutes, m.train_minutes_std = mean_std(m.train_minutes_seeds)
    used, value = _values(use, "budget_used"), _finite((budget or {}).get("value"))
    m.budget_used = mean_std(used)[0]
    if used and value:
        m.budget_dev = max((u / value - 1.0 for u in used), key=abs)
    m.train_h = mean_std(_values(use, "train_h"))[0]
    m.run = next((s.run for s in m.seed_runs if s.run is not None), None)
    if m.run is not None:
        r = m.run
        r.label = name
        m.objective = m.objective or r.objective
        m.flops_per_sample, m.img_per_s, m.mfu, m.mem_peak_gb = r.flops_per_sample, r.img_per_s, r.mfu, r.mem_peak_gb
    m.total_h = m.train_h + m.teacher_h if m.train_h is not None else None
    return m


def _apply_target(members: list[Member], target: float | None) -> None:
    for m in members:
        for s in m.seed_runs:
            hit = first_reach(s.run.knn_curve, target) if s.run is not None and target is not None else None
            s.ttt_step, s.ttt_h = hit if hit else (None, None)
        runs = [s for s in m.seed_runs if s.run is not None]
        hits = [s for s in runs if s.ttt_h is not None]
        if runs and len(hits) == len(runs):  # every seed reached it: the mean over them
            m.ttt_h = mean_std([s.ttt_h for s in hits if s.ttt_h is not None])[0]
            m.ttt_step = round(sum(s.ttt_step or 0 for s in hits) / len(hits))
        else:
            m.ttt_step, m.ttt_h = None, None
        m.ttt_total_h = m.ttt_h + m.teacher_h if m.ttt_h is not None else None


def common_target(members: list[Member]) -> tuple[float | None, float | None, str]:
    """(target, best random-init kNN top-1, how the target came about). The target is the lowest best kNN
    top-1 of the finished members' runs, but never at or below the best random-init score: a target that
    random weights reach says nothing, and then there is no common target."""
    bests = [b for m in members if m.finished for b in _values(m.seed_runs, "knn_best")]
    inits = [i for m in members for i in _values(m.seed_runs, "knn_init")]
    init_best = max(inits) if inits else None
    if not bests:
        return None, init_best, "no common target: no finished member has a kNN evaluation"
    low = min(bests)
    if init_best is not None and low <= init_best:
        return (
            None,
            init_best,
            f"no common target: the lowest best kNN top-1 of the finished members ({low:.2f}%) is not above "
            f"the best random-init kNN top-1 ({init_best:.2f}%)",
        )
    return low, init_best, "the lowest best kNN top-1 of the finished members, above every random-init score"


def _apply_noise(members: list[Member]) -> None:
    """Each finished member's peers whose final kNN top-1 is within the noise (Welch, p >= 0.05)."""
    done = [m for m in members if m.finished]
    for m in done:
        m.noise_peers = [o.name for o in done if o is not m and within_noise(m.knn_final_seeds, o.knn_final_seeds)]


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
    seeds = int(plan.get("seeds") or 1)
    costs = _teacher_costs(root)
    budget = plan.get("budget") if isinstance(plan.get("budget"), dict) else None
    members = [_load_member(root, e, i, costs, seeds, budget) for i, e in enumerate(plan["members"])]
    league = League(str(root.resolve()), plan, members, target=target, target_source="--target")
    own, league.init_best, source = common_target(members)
    if target is None:
        league.target, league.target_source = own, source
    _apply_target(members, league.target)
    _apply_noise(members)
    league.flops_reference = _apply_flops_reference(members)
    league.rank_knn = _ranking(members, lambda m: None if m.knn_final is None else -m.knn_final)
    if league.target is not None:
        league.rank_with_teacher = _ranking(members, lambda m: m.ttt_total_h)
    return league


def pm(mean: float | None, std: float | None, digits: int = 2, unit: str = "") -> str:
    """``61.80 ± 0.42 %``: a value with its unit, and its standard deviation when there are seeds."""
    if mean is None:
        return "—"
    sp = "" if unit in ("", "×") else " "
    if std is None:
        return f"{mean:.{digits}f}{sp}{unit}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}{sp}{unit}"


def budget_text(budget: dict[str, Any] | None) -> str:
    """``10 min`` / ``4 MAE-eq. epochs``: a member's budget, for the achieved-minutes cell."""
    b = budget or {}
    value = b.get("value")
    if not isinstance(value, (int, float)):
        return "—"
    return f"{value:g} min" if b.get("kind") == "minutes" else f"{value:g} MAE-eq. epochs"


def training_text(m: Member) -> str:
    """A member's training cell: its achieved minutes (± over seeds), for a FLOP budget also the MAE-eq.
    epochs it trained, and the worst seed's deviation from the budget: ``0.0102 MAE-eq. epochs (+0.1 %);
    12.25 ± 8.66 min`` / ``9.95 ± 0.05 min (-0.5 %)``."""
    minutes = pm(m.train_minutes, m.train_minutes_std, 2, "min")
    dev = "" if m.budget_dev is None else f" ({100 * m.budget_dev:+.1f} %)"
    if m.budget_unit == BUDGET_UNITS["mae_epochs"] and m.budget_used is not None:
        return f"{m.budget_used:.4g} {m.budget_unit}{dev}; {minutes}"
    return minutes + dev


def budget_note(league: League) -> str | None:
    """``Budget held: every finished run within 0.1 % of ...``, or None before any member finished."""
    dev = league.budget_dev
    if dev is None:
        return None
    unit = (
        "MAE-eq. epochs trained"
        if (league.plan.get("budget") or {}).get("kind") == "mae_epochs"
        else "training minutes"
    )
    return f"Budget held: every finished run within {100 * dev:.1f} % of its budget ({unit})."


def markdown_table(league: League) -> str:
    """The league as a Markdown table (``league.md``: paste it into a README or an issue), ranked by mean final
    kNN; every number with its unit, ± one standard deviation over the seeds when there are several."""
    seeds = league.seeds
    rows = [
        "| # | objective | kNN top-1 | linear top-1 | to target | teacher | throughput | FLOPs/img | training "
        f"(budget {budget_text(league.plan.get('budget'))}) |" + (" within noise of |" if seeds > 1 else ""),
        "|---|---|---|---|---|---|---|---|---|" + ("---|" if seeds > 1 else ""),
    ]
    done = [n for n in league.rank_knn if any(m.name == n and m.finished for m in league.members)]
    order = {name: i for i, name in enumerate(done)}

    def minutes(h: float | None) -> str:
        return pm(None if h is None else h * 60, None, 1, "min")

    for m in sorted(league.members, key=lambda m: order.get(m.name, len(order) + m.index)):
        knn = pm(m.knn_final, m.knn_final_std, 2, "%")
        if seeds > 1 and m.knn_final_seeds:
            knn += " (" + ", ".join(f"{v:.2f}" for v in m.knn_final_seeds) + ")"
        of = f" ({m.seeds_done}/{m.seeds} seeds)" if seeds > 1 else ""
        rank = order[m.name] + 1 if m.name in order else f"{m.status}{of}"
        rate = pm(m.img_per_s, None, 0, "img/s")
        line = (
            f"| {rank} | {m.name} | {knn} | {pm(m.linear_top1, m.linear_std, 2, '%')} | {minutes(m.ttt_h)} "
            f"| {minutes(m.teacher_h)} | {rate} | {pm(m.flops_ratio, None, 2, '×')} MAE "
            f"| {training_text(m)} |"
        )
        if seeds > 1:
            line += f" {', '.join(m.noise_peers) or '—'} |"
        rows.append(line.replace("— MAE", "—"))
    if league.target is not None:
        target = f"Target (to target): kNN top-1 {league.target:.2f}%, {league.target_source}."
    else:
        target = f"Target: none. {league.target_source[:1].upper()}{league.target_source[1:]}."
    notes = [target, *filter(None, [budget_note(league)])]
    if seeds > 1:
        notes.append(
            f"{seeds} seeds per member: mean ± standard deviation (each seed's final kNN in brackets); "
            f"within noise: {league.noise_test}."
        )
    return "\n".join([*rows, "", *notes]) + "\n"


def side_by_side(leagues: list[tuple[str, League]]) -> str:
    """Several leagues of the same members (e.g. one per data set) as one Markdown table: each member's mean
    final kNN top-1 (± over seeds) and its rank in every league, then its linear top-1 in each; rows in the
    first league's kNN order. Under the table: Kendall's tau of each league's kNN ranking against the first's,
    and every pair of members the two rankings order differently, with whether the pair is within the noise
    in each league (a swap inside the noise is not a disagreement)."""
    if not leagues:
        return ""
    finished = [[n for n in lg.rank_knn if _member(lg, n).finished] for _, lg in leagues]
    names = list(dict.fromkeys([*leagues[0][1].rank_knn, *(n for _, lg in leagues[1:] for n in lg.rank_knn)]))
    head = ["objective"] + [f"{t} kNN top-1 | rank" for t, _ in leagues] + [f"{t} linear top-1" for t, _ in leagues]
    rows = ["| " + " | ".join(head) + " |", "|---" * (1 + 3 * len(leagues)) + "|"]
    for name in names:
        knn, lin = [], []
        for (_, lg), order in zip(leagues, finished):
            m = _member_or_none(lg, name)
            knn.append(
                f"{pm(m.knn_final, m.knn_final_std, 2, '%') if m else '—'} | "
                f"{order.index(name) + 1 if name in order else '—'}"
            )
            lin.append(pm(m.linear_top1, m.linear_std, 2, "%") if m else "—")
        rows.append("| " + " | ".join([name, *knn, *lin]) + " |")
    notes = []
    first_title, first = leagues[0]
    for (title, lg), order in zip(leagues[1:], finished[1:]):
        tau = kendall_tau(finished[0], order)
        if tau is None:
            continue
        swaps = []
        common = [n for n in finished[0] if n in order]
        for i, x in enumerate(common):
            for y in common[i + 1 :]:
                if order.index(x) > order.index(y):
                    noise = [t for t, g in ((first_title, first), (title, lg)) if y in _member(g, x).noise_peers]
                    how = f"within the noise on {' and '.join(noise)}" if noise else "outside the noise on both"
                    swaps.append(f"{x} / {y} ({how})")
        agree = "the same order" if not swaps else "pairs ordered differently: " + "; ".join(swaps)
        notes.append(f"kNN rankings, {first_title} vs {title}: Kendall's tau {tau:+.2f}, {agree}.")
    return "\n".join([*rows, "", *notes]) + "\n"


def _member_or_none(league: League, name: str) -> Member | None:
    return next((m for m in league.members if m.name == name), None)


def _member(league: League, name: str) -> Member:
    m = _member_or_none(league, name)
    assert m is not None, name
    return m
