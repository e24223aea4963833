"""Valid ranges: every numeric field of the run config and of every objective's knobs declares one (beside its
definition, with ``num(default, "range")``), and a value outside it is one line naming key, value and range.

The table is not written by hand: it is walked from the dataclasses, so a new numeric field without a range
fails ``test_every_numeric_field_declares_a_range``, and every declared range is exercised on both sides."""

from __future__ import annotations

import dataclasses
import math
import typing

import pytest
import yaml

from mimscale import config as C
from mimscale.errors import ConfigError
from mimscale.objectives import available
from mimscale.ranges import Range, numeric_type

SECTIONS = [
    f.name for f in dataclasses.fields(C.Config) if dataclasses.is_dataclass(typing.get_type_hints(C.Config)[f.name])
]


def _walk(cls: type, prefix: str):
    """``(key, field, type)`` of every field of dataclass ``cls`` and of the dataclasses nested in it."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _walk(tp, f"{prefix}.{f.name}")
        else:
            yield f"{prefix}.{f.name}", f, tp


def _fields():
    """(owner, key, field, type) for the run config's sections and every registered objective's knobs."""
    hints = typing.get_type_hints(C.Config)
    for s in SECTIONS:
        for key, f, tp in _walk(hints[s], s):
            yield "config", key, f, tp
    for name, cls in available().items():
        for key, f, tp in _walk(cls.Config, "objective"):
            yield name, key, f, tp


NUMERIC = [(o, k, f, tp) for o, k, f, tp in _fields() if numeric_type(tp)]


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _is_int(tp) -> bool:
    args = [a for a in typing.get_args(tp) if a is not type(None) and a is not Ellipsis]
    return tp is int or int in args or any(_is_int(a) for a in args if typing.get_origin(a) is tuple)


def _outside(rng: Range, integer: bool) -> list[float]:
    """Values just outside ``rng`` on each bounded side (NaN for an unbounded float range)."""
    step = 1 if integer else 0.5
    out = []
    if rng.lo is not None:
        out.append(rng.lo if rng.lo_open else rng.lo - step)
    if rng.hi is not None:
        out.append(rng.hi if rng.hi_open else rng.hi + step)
    if not out and not integer:
        out.append(float("nan"))
    return [int(v) if integer else float(v) for v in out]


def _as_override(f: dataclasses.Field, tp, bad):
    """The override value putting ``bad`` into field ``f`` (element 0 of a tuple), and the key suffix it hits."""
    if typing.get_origin(tp) is tuple or (
        typing.get_origin(tp) in (typing.Union,) and tuple in [typing.get_origin(a) for a in typing.get_args(tp)]
    ):
        d = list(_default(f)) or [bad]
        d[0] = bad
        return d, "[0]"
    return bad, ""


def _yaml(value) -> str:
    """``value`` as an override types it (``.nan``, ``-0.5``, ``[-1, 0.95]``)."""
    if isinstance(value, list):
        return "[" + ",".join(_yaml(v) for v in value) + "]"
    return ".nan" if isinstance(value, float) and math.isnan(value) else repr(value)


def _recipe(owner: str) -> tuple[str, list[str]]:
    """A recipe that uses ``owner``'s knobs (tiny_cpu for the config sections), with its ``???`` filled in."""
    name = "tiny_cpu" if owner == "config" else f"{owner}_vit_b16"
    raw = yaml.safe_load(C.recipe_path(name).read_text())
    return name, [f"{k}=/data/shards/train-000000.tar" for k, v in C._walk(raw) if v == "???"]


def test_the_walk_sees_every_section_and_objective():
    owners = {o for o, *_ in NUMERIC}
    assert owners == {"config", *available()}
    keys = {k for _, k, *_ in NUMERIC}
    assert {
        "optim.lr",
        "train.keep_last",
        "eval.knn_k",
        "data.num_workers",
        "objective.mask_ratio",
        "objective.teacher_aug.hue",
        "objective.decoder_depth",
        "train.rollback_lr_scale",
    } <= keys
    assert len(NUMERIC) > 100


@pytest.mark.parametrize("owner,key,f,tp", NUMERIC, ids=[f"{o}:{k}" for o, k, _, _ in NUMERIC])
def test_every_numeric_field_declares_a_range(owner, key, f, tp):
    rng = f.metadata.get("range")
    assert isinstance(rng, Range), f"{owner}: {key} is numeric but declares no range: use num(default, '...')"
    d = _default(f)
    for v in d if isinstance(d, tuple) else [d]:
        assert v is None or v in rng, f"{owner}: the default {key}={d!r} is outside its own range {rng}"


CASES = [
    (o, k, f, tp, bad)
    for o, k, f, tp in NUMERIC
    if "range" in f.metadata
    for bad in _outside(f.metadata["range"], _is_int(tp))
]


@pytest.mark.parametrize("owner,key,f,tp,bad", CASES, ids=[f"{o}:{k}={b}" for o, k, _, _, b in CASES])
def test_a_value_outside_the_range_is_one_line(owner, key, f, tp, bad):
    value, suffix = _as_override(f, tp, bad)
    recipe, required = _recipe(owner)
    with pytest.raises(ConfigError) as e:
        C.load(recipe, [*required, f"{key}={_yaml(value)}"])
    msg = str(e.value)
    rng = f.metadata["range"]
    shown = repr(float(bad)) if not _is_int(tp) else repr(bad)
    assert msg.startswith(f"{key}{suffix}={shown} must be "), msg
    assert msg.endswith(str(rng)) and "\n" not in msg, msg


@pytest.mark.parametrize(
    "text,inside,outside,words",
    [
        (">= 0", [0, 3.5], [-1e-9, float("inf")], ">= 0"),
        ("> 0", [1e-12], [0, -1], "> 0"),
        ("[0, 1)", [0, 0.999], [1, -0.1, float("nan")], "in [0, 1)"),
        ("(0, 1]", [1, 1e-6], [0, 1.01], "in (0, 1]"),
        ("[0, 3]", [0, 3], [-1, 4], "in [0, 3]"),
        ("any", [-1e30, 0], [float("nan"), float("-inf")], "any finite number"),
    ],
)
def test_range_parse_and_membership(text, inside, outside, words):
    r = Range.parse(text)
    assert all(v in r for v in inside) and not any(v in r for v in outside)
    assert str(r) == words


def test_a_malformed_range_is_a_programming_error():
    with pytest.raises(ValueError, match="not a range"):
        Range.parse("0..1")


def test_none_is_valid_where_the_type_allows_it_and_the_issue_examples_are_refused():
    C.load("tiny_cpu", ["optim.lr=null", "train.max_steps=null"])
    for override, line in [
        ("optim.lr=-0.001", "optim.lr=-0.001 must be > 0"),
        ("objective.mask_ratio=1.0", "objective.mask_ratio=1.0 must be in (0, 1)"),
        ("objective.mask_ratio=0", "objective.mask_ratio=0.0 must be in (0, 1)"),
        ("eval.knn_k=0", "eval.knn_k=0 must be >= 1"),
        ("objective.decoder_depth=-1", "objective.decoder_depth=-1 must be >= 0"),
        ("train.keep_last=-2", "train.keep_last=-2 must be >= 1"),
        ("train.epochs=.inf", "train.epochs=inf must be a finite number > 0"),
    ]:
        with pytest.raises(ConfigError) as e:
            C.load("tiny_cpu", [override])
        assert str(e.value) == line


@pytest.mark.parametrize("objective", ["mae", "emae", "mae_plus", "adpe"])
@pytest.mark.parametrize("ratio", ["0", "1.0"])
def test_mae_family_refuses_a_mask_ratio_that_leaves_nothing_to_predict_or_nothing_to_see(objective, ratio):
    with pytest.raises(ConfigError) as e:
        C.load("tiny_cpu", [f"objective.name={objective}", f"objective.mask_ratio={ratio}"])
    assert str(e.value) == f"objective.mask_ratio={float(ratio)} must be in (0, 1)"
