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
from .spec import Plan, build_plan, merge_plans, parse_budget, read_spec

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
) -> Plan:
    """Resolve the spec and write (or check against, and extend) ``root/compare.json``."""
    label, spec = read_spec(spec_name)
    budget = parse_budget(spec.get("budget"), minutes, mae_epochs)
    plan = build_plan(label, spec, list(overrides), names, budget, list(member_sets))
    root = Path(root)
    if (root / PLAN_FILE).is_file():
        plan = merge_plans(load_plan(root), plan)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / (PLAN_FILE + ".tmp")
    tmp.write_text(json.dumps(plan.to_json(), indent=2) + "\n")
    os.replace(tmp, root / PLAN_FILE)
    return plan


def run_members(plan: Plan, root: str | os.PathLike, names: list[str], launch: str = "none") -> None:
    """Run the named members one after another, with progress (members done, ETA). USR1 / TERM go to the
    running step (it saves) and stop the comparison: :class:`~mimscale.compare.run.Interrupted`."""
    root, t0 = Path(root), time.monotonic()
    todo = [n for n in names if not (root / "members" / n / "result.json").is_file()]
    say(
        f"{len(names)} members, {len(names) - len(todo)} complete; budget {plan.budget['value']:g} {plan.budget['kind']}"
    )
    with forwarding_signals():
        for i, name in enumerate(todo):
            if i:
                eta = (time.monotonic() - t0) / i * (len(todo) - i)
                say(f"{i}/{len(todo)} members run, about {eta / 60:.0f} min to go")
            run_member(plan, plan.member(name), root, launch)
    say(f"all {len(names)} members complete: mimscale report {root}")
