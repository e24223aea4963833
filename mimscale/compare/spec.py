"""What a comparison is: the spec a user gives and the plan stored in ``DIR/compare.json``.

A **spec** is a YAML file (``mimscale/configs/compare/<name>.yaml`` or a path) or just a recipe name::

    base: tiny_cpu                # optional: start from another spec, then this file's keys replace its
    recipe: tiny_cpu              # the base recipe of every member
    overrides: [key=value, ...]   # applied to every member
    budget: {minutes: 10}         # training minutes per member, or {mae_epochs: 4} (MAE-equivalent epochs)
    seeds: 1                      # runs per member (train.seed + k: init, data order, masks); --seeds K
    knn_evals: 5                  # kNN evaluations during training (plus random init and the end)
    calibrate_steps: 60           # steps of each member's calibration run (img/s, FLOPs per image)
    linear: {epochs: 20, ...}     # `mimscale eval linear` knobs at the end of each member, or null
    teachers: {clip: {samples: 60000}, kclip: {iters: 10}}
    members:                      # name -> the member's objective knobs and extra overrides
      mae: {}
      conmim: {objective: {proj_hidden: 256}}
      emae_sc0: {objective: {name: emae, sc_weight: 0}}
    default_members: [mae, conmim]

A plain recipe name means: every registered objective, each with its defaults plus the recipe's objective
knobs it accepts. Every member gets the same encoder, data, evaluation and budget; only the objective section
(and what its teachers produce) differs. The **plan** is the spec resolved: per member the exact overrides
and the teacher steps it needs. It is written once; a later start must agree with it (members may be added).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .. import config as C
from ..errors import ConfigError

SPEC_DIR = C.CONFIG_DIR / "compare"
PLAN_VERSION = 1
SPEC_KEYS = {
    "base",
    "recipe",
    "overrides",
    "budget",
    "seeds",
    "knn_evals",
    "calibrate_steps",
    "linear",
    "teachers",
    "members",
    "default_members",
}
BUDGET_KINDS = ("minutes", "mae_epochs")
CALIBRATE_STEPS = 60  # the calibration run's default length (spec key calibrate_steps)
TEACHER_STEPS = ("clip", "kclip")  # kclip needs clip (codes are k-means ids of CLIP patch features)


@dataclass
class Member:
    name: str
    objective: str
    overrides: list[str]  # the member's own overrides, after the spec's common ones
    teachers: list[str] = field(default_factory=list)  # teacher steps (TEACHER_STEPS) it needs, in order


@dataclass
class Plan:
    spec: str
    recipe: str
    overrides: list[str]
    budget: dict[str, Any]  # {"kind": "minutes" | "mae_epochs", "value": float}
    knn_evals: int
    linear: dict[str, Any] | None
    teachers: dict[str, dict[str, Any]]
    members: list[Member]
    data: dict[str, Any]  # train / knn_train / knn_test of the base recipe (after overrides)
    seeds: int = 1  # runs per member: seed k adds k to train.seed (members/<name>/seed<k>/ for k >= 1)
    calibrate_steps: int = CALIBRATE_STEPS  # steps of each member's calibration run (a plan without it: 60)
    version: int = PLAN_VERSION

    def member(self, name: str) -> Member:
        for m in self.members:
            if m.name == name:
                return m
        raise ConfigError(f"no member '{name}' in this comparison (members: {', '.join(self.names)})")

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.members]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Plan:
        d = dict(doc)
        d["members"] = [Member(**m) for m in d.get("members", [])]
        return cls(**d)


def read_spec(name_or_path: str) -> tuple[str, dict[str, Any]]:
    """(label, spec dict). A compare spec file, a spec name in mimscale/configs/compare, or a recipe."""
    path = Path(name_or_path)
    if not path.suffix and (SPEC_DIR / f"{name_or_path}.yaml").is_file():
        path = SPEC_DIR / f"{name_or_path}.yaml"
    if path.suffix in (".yaml", ".yml") and path.is_file():
        try:
            doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"compare spec {path}: unreadable YAML ({e})") from None
        if isinstance(doc, dict) and ("recipe" in doc or "base" in doc):
            bad = sorted(set(doc) - SPEC_KEYS)
            if bad:
                raise ConfigError(f"compare spec {path}: unknown key(s) {', '.join(bad)} (known: {sorted(SPEC_KEYS)})")
            if "base" in doc:  # another spec's members and knobs, with this file's keys on top
                base = read_spec(str(doc.pop("base")))[1]
                doc = {**base, **doc}
            return path.stem, doc
    C.recipe_path(name_or_path)  # a plain recipe (raises the usual one-line error when it is neither)
    return name_or_path, {"recipe": name_or_path}


def parse_budget(spec_budget: Any, minutes: float | None, mae_epochs: float | None) -> dict[str, Any]:
    """The command line's budget wins over the spec's; exactly one kind, a positive finite number."""
    if minutes is not None and mae_epochs is not None:
        raise ConfigError("give one budget: --budget-minutes or --budget-mae-epochs, not both")
    if minutes is not None:
        kind, value = "minutes", minutes
    elif mae_epochs is not None:
        kind, value = "mae_epochs", mae_epochs
    else:
        if not isinstance(spec_budget, dict) or len(spec_budget) != 1 or next(iter(spec_budget)) not in BUDGET_KINDS:
            raise ConfigError(
                "a comparison needs a budget: --budget-minutes M (training minutes per member) or "
                "--budget-mae-epochs E (training FLOPs as MAE-equivalent epochs), or budget: in the spec"
            )
        kind, value = next(iter(spec_budget.items()))
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"budget {kind}={value!r} must be a positive number")
    return {"kind": kind, "value": float(value)}


def parse_seeds(spec_seeds: Any, seeds: int | None) -> int:
    """The command line's ``--seeds`` wins over the spec's ``seeds:``; a positive integer (default 1)."""
    value = seeds if seeds is not None else (1 if spec_seeds is None else spec_seeds)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"seeds={value!r} must be a positive integer (runs per member)")
    return value


def _objective_section(recipe_objective: dict[str, Any], member: dict[str, Any], name: str) -> dict[str, Any]:
    """The member's objective dict: the recipe's knobs its objective accepts, then the member's own."""
    from ..objectives import available, objective_class  # late: `mimscale --help` need not import torch

    own = dict(member.get("objective") or {})
    obj_name = own.pop("name", name)
    if obj_name not in available():
        raise ConfigError(f"member '{name}': unknown objective '{obj_name}' (see `mimscale objectives`)")
    fields = {f.name for f in dataclasses.fields(objective_class(obj_name).Config)}
    base = {k: v for k, v in recipe_objective.items() if k in fields}
    return {"name": obj_name, **base, **own}


def teacher_steps(objective: dict[str, Any]) -> list[str]:
    """Which teacher steps a member needs, from its objective's knobs (no objective names here):
    ``clip`` when the objective has a ``teacher`` knob left unset (``???``); ``kclip`` (CLIP k-means codes
    cached in the shards) when it reads ``vocab_size`` codes from the shards (``target_source: shards``)."""
    from ..objectives import objective_class

    cls = objective_class(objective["name"])
    defaults = {f.name: f.default for f in dataclasses.fields(cls.Config)}
    knob = {**defaults, **objective}.get
    steps = []
    if "teacher" in defaults and knob("teacher") == "???":
        steps.append("clip")
    if "vocab_size" in defaults and knob("target_source") == "shards":
        steps = ["clip", "kclip"]
    return steps


def build_plan(
    spec_label: str,
    spec: dict[str, Any],
    overrides: list[str],
    names: list[str] | None,
    budget: dict[str, Any],
    member_sets: list[str],
    seeds: int = 1,
) -> Plan:
    """Resolve a spec (plus the command line's common overrides, member list and ``NAME:key=value`` sets)."""
    recipe = str(spec["recipe"])
    common = [*map(str, spec.get("overrides") or []), *overrides]
    base = C.load(recipe, common)  # a bad common key fails here, before anything runs
    spec_members: dict[str, Any] = dict(spec.get("members") or {})
    if names is None:
        from ..objectives import available

        names = list(spec.get("default_members") or spec_members or available())
    labels = [n.partition("=")[0] for n in names]
    extra: dict[str, list[str]] = {}
    for item in member_sets:
        who, sep, kv = item.partition(":")
        if not sep or "=" not in kv:
            raise ConfigError(f"--set '{item}': expected NAME:key=value (e.g. emae:objective.num_parts=2)")
        if who not in labels:
            raise ConfigError(f"--set '{item}': '{who}' is not a member (members: {', '.join(labels)})")
        extra.setdefault(who, []).append(kv)
    if len(set(labels)) != len(labels) or not labels:
        raise ConfigError(f"members must be distinct and at least one: {labels}")
    members = []
    for entry in names:
        name, _, obj_name = entry.partition("=")  # LABEL=OBJECTIVE: a variant under its own name
        m = dict(spec_members.get(name) or {})
        if obj_name:
            m["objective"] = {**(m.get("objective") or {}), "name": obj_name}
        if not isinstance(m, dict) or set(m) - {"objective", "overrides"}:
            raise ConfigError(f"member '{name}': expected {{objective: {{...}}, overrides: [...]}}, got {m!r}")
        obj = _objective_section(dict(base.objective), m, name)
        own = [f"objective={json.dumps(obj)}", *map(str, m.get("overrides") or []), *extra.get(name, [])]
        member = Member(name, obj["name"], own, teacher_steps(obj))
        stand_ins = placeholder_overrides(member)
        with config_notes_silenced(bool(stand_ins)):
            C.load(recipe, [*common, *own, *stand_ins])  # every key checked now
        members.append(member)
    knn_evals = int(spec.get("knn_evals", 4))
    if knn_evals < 0:
        raise ConfigError(f"knn_evals={knn_evals} must be >= 0")
    calibrate_steps = spec.get("calibrate_steps", CALIBRATE_STEPS)
    if isinstance(calibrate_steps, bool) or not isinstance(calibrate_steps, int) or calibrate_steps < 1:
        raise ConfigError(f"calibrate_steps={calibrate_steps!r} must be a positive integer (steps)")
    data = {"train": base.data.train, "knn_train": base.eval.knn_train, "knn_test": base.eval.knn_test}
    return Plan(
        spec=spec_label,
        recipe=recipe,
        overrides=common,
        budget=budget,
        knn_evals=knn_evals,
        linear=spec.get("linear", {}),
        teachers={k: dict(v or {}) for k, v in (spec.get("teachers") or {}).items()},
        members=members,
        data=data,
        seeds=seeds,
        calibrate_steps=calibrate_steps,
    )


@contextlib.contextmanager
def config_notes_silenced(on: bool = True) -> Iterator[None]:
    """Inside the block (when ``on``) config's notes (warnings about data paths, evaluation sets and
    normalisation) are not shown: for configs that point at stand-in teacher paths, whose notes would describe
    the stand-ins, not the run."""
    log = logging.getLogger("mimscale.config")
    level = log.level
    if on:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def placeholder_overrides(member: Member) -> list[str]:
    """What the member's teacher steps will set, with stand-in paths (for checking keys before they exist)."""
    return teacher_overrides(member, Path("/nonexistent-teacher"))


def teacher_overrides(member: Member, teachers_dir: Path) -> list[str]:
    """The overrides that point a member at its teachers' outputs under ``teachers_dir``."""
    out = []
    if "clip" in member.teachers and "kclip" not in member.teachers:
        out.append(f"objective.teacher={teachers_dir / 'clip' / 'clip.pt'}")
    if "kclip" in member.teachers:
        out.append(f"data.train={teachers_dir / 'kclip' / 'train'}")
    return out


def merge_plans(stored: Plan, new: Plan) -> Plan:
    """A restart: everything but the member list and the seeds must be the same; members may be added, never
    changed; the seeds may grow (a restart that asks for fewer keeps the stored count: finished seeds stay)."""
    for key in ("recipe", "overrides", "budget", "knn_evals", "calibrate_steps", "linear", "teachers"):
        a, b = getattr(stored, key), getattr(new, key)
        if a != b:
            raise ConfigError(
                f"this compare directory holds a comparison with another {key} (stored {a!r}, now {b!r}): "
                "use the same arguments to resume it, or another --out"
            )
    members = list(stored.members)
    for m in new.members:
        old = next((s for s in stored.members if s.name == m.name), None)
        if old is None:
            members.append(m)
        elif old != m:
            raise ConfigError(
                f"member '{m.name}' was planned with other settings (stored {old.overrides}, now {m.overrides}): "
                "give the new variant another name (e.g. --objectives NAME2=objective ...)"
            )
    return dataclasses.replace(stored, members=members, seeds=max(stored.seeds, new.seeds))
