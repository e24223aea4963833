"""Valid ranges of numeric config fields, declared once beside each field: ``lr: float = num(1e-3, "> 0")``.

:func:`mimscale.config.from_dict` checks every dataclass it builds (the run config's sections and every
objective's knobs) with :func:`check_ranges`; a value outside gives one line naming the key, the value and
the range. A leaf module (imports nothing of mimscale but errors), so objectives can use it without a cycle.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import ConfigError

_BOUND = re.compile(r"^\s*(>=|>|<=|<)\s*(\S+)\s*$")
_INTERVAL = re.compile(r"^\s*([\[(])\s*([^,]+),\s*([^\])]+)([\])])\s*$")


@dataclass(frozen=True)
class Range:
    """The valid values of a numeric config field, written as in the docs: ``">= 0"``, ``"> 0"``, ``"[0, 1)"``,
    ``"(0, 1]"``, ``"[0, 3]"`` or ``"any"`` (any finite number). Non-finite values are never valid."""

    text: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    @classmethod
    def parse(cls, text: str) -> Range:
        if text.strip() == "any":
            return cls(text)
        m = _BOUND.match(text)
        if m:
            op, v = m.group(1), float(m.group(2))
            if op.startswith(">"):
                return cls(text, lo=v, lo_open=op == ">")
            return cls(text, hi=v, hi_open=op == "<")
        m = _INTERVAL.match(text)
        if not m:
            raise ValueError(f"not a range: {text!r} (use '>= 0', '> 0', '[0, 1)', 'any', ...)")
        return cls(
            text, lo=float(m.group(2)), hi=float(m.group(3)), lo_open=m.group(1) == "(", hi_open=m.group(4) == ")"
        )

    def __contains__(self, v: float) -> bool:
        if not math.isfinite(v):
            return False
        if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
            return False
        return not (self.hi is not None and (v > self.hi or (self.hi_open and v == self.hi)))

    def __str__(self) -> str:
        t = self.text.strip()
        return "any finite number" if t == "any" else (f"in {t}" if t[0] in "[(" else t)


def num(default: Any = dataclasses.MISSING, valid: str = "any", *, factory: Any = dataclasses.MISSING):
    """A numeric config field with its valid range declared once, beside its definition:
    ``lr: float = num(1e-3, "> 0")``. Checked for every value :func:`from_dict` builds (one line naming the
    key, the value and the range); tuples are checked element by element, ``None`` (where the type allows
    it) is always valid."""
    md = {"range": Range.parse(valid)}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=md)
    return field(default=default, metadata=md)


def check_ranges(obj: Any, prefix: str = "") -> None:
    """ConfigError (one line) for the first field of dataclass ``obj`` outside its declared :func:`num` range."""
    for f in dataclasses.fields(obj):
        rng = f.metadata.get("range")
        if rng is None:
            continue
        key = f"{prefix}.{f.name}" if prefix else f.name
        value = getattr(obj, f.name)
        items = list(enumerate(value)) if isinstance(value, (tuple, list)) else [(None, value)]
        for i, v in items:
            if v is None or isinstance(v, (bool, str)):
                continue
            if v not in rng:
                where = key if i is None else f"{key}[{i}]"
                finite = "" if math.isfinite(v) else "a finite number "
                raise ConfigError(f"{where}={v!r} must be {finite}{rng}")


def numeric_type(tp: Any) -> bool:
    """Whether a field type holds numbers (int/float, optional or in a flat tuple); bools are not numbers.
    Tuples of tuples (e.g. ``train.resolution_schedule``'s (fraction, size) pairs) are structured values with a
    check of their own, not a range."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp in (int, float):
        return True
    if origin is Literal:
        return False
    if origin is tuple:
        return any(a in (int, float) for a in args if a is not Ellipsis)
    if origin in (typing.Union, types.UnionType):
        return any(numeric_type(a) for a in args if a is not Ellipsis)
    return False
