"""``mimscale compare``: every objective on the same encoder, data, evaluation and budget.

:func:`start` resolves a spec into a plan (``DIR/compare.json``; see :mod:`.spec`), then runs the members one
after another here (:func:`mimscale.compare.run.run_member`), or submits one SLURM array task per member
(``slurm/compare.sh``). ``mimscale report DIR`` turns the directory into the league table.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ..errors import ConfigError
from .run import LAUNCHES, forwarding_signals, run_member, say
from .spec import Plan, build_plan, merge_plans, parse_budget, parse_seeds, read_spec

__all__ = ["Plan", "load_plan", "plan_compare", "run_members", "LAUNCHES"]

PLAN_FILE = "compare.json"


def load_plan(root: str | os.PathLike) -> Plan:
    path = Path(root) / PLAN_FILE
    if not path.is_file():
        raise ConfigError(f"'{root}' is not a compare directory (no {PLAN_FILE}): start one with `mimscale compare`")
    try:
        return Plan.from_json(json.loads(path.read_text()))
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{path}: not a comparison plan this version can read ({e})") from None


def plan_compare(
    root: str | os.PathLike,
    spec_name: str,
    overrides: list[str],
    names: list[str] | None = None,
    minutes: float | None = None,
    mae_epochs: float | None = None,
    member_sets: list[str] = (),  # type: ignore[assignment]
    seeds: int | None = None,
    write: bool = True,
) -> Plan:
    """Resolve the spec and write (or check against, and extend) ``root/compare.json``. ``write=False`` (a dry
    run) resolves and checks the same way but stores nothing: not the plan, not even ``root``."""
    label, spec = read_spec(spec_name)
    budget = parse_budget(spec.get("budget"), minutes, mae_epochs)
    n_seeds = parse_seeds(spec.get("seeds"), seeds)
    plan = build_plan(label, spec, list(overrides), names, budget, list(member_sets), n_seeds)
    root = Path(root)
    if (root / PLAN_FILE).is_file():
        plan = merge_plans(load_plan(root), plan)
    if not write:
        return plan
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / (PLAN_FILE + ".tmp")
    tmp.write_text(json.dumps(plan.to_json(), indent=2) + "\n")
    os.replace(tmp, root / PLAN_FILE)
    return plan


def run_members(plan: Plan, root: str | os.PathLike, names: list[str], launch: str = "none") -> None:
    """Run the named members (every seed of each: seed 0 of all members first, then seed 1, ...) one after
    another, with progress (runs done, ETA). USR1 / TERM go to the running step (it saves) and stop the
    comparison: :class:`~mimscale.compare.run.Interrupted`."""
    from ..report.league import seed_dir

    root, t0 = Path(root), time.monotonic()
    runs = [(n, k) for k in range(plan.seeds) for n in names]
    todo = [(n, k) for n, k in runs if not (seed_dir(root, n, k) / "result.json").is_file()]
    seeds = f" x {plan.seeds} seeds" if plan.seeds > 1 else ""
    say(
        f"{len(names)} members{seeds}, {len(runs) - len(todo)} of {len(runs)} runs complete; "
        f"budget {plan.budget['value']:g} {plan.budget['kind']}"
    )
    with forwarding_signals():
        for i, (name, seed) in enumerate(todo):
            if i:
                eta = (time.monotonic() - t0) / i * (len(todo) - i)
                say(f"{i}/{len(todo)} runs done, about {eta / 60:.0f} min to go")
            run_member(plan, plan.member(name), root, launch, seed)
    say(f"all {len(names)} members complete: mimscale report {root}")
