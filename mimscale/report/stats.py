"""Noise bands of a league with several seeds per member: mean ± standard deviation, and Welch's t-test.

Two members are **within the noise** of each other when Welch's two-sided t-test on their per-seed values
cannot tell their means apart at ``ALPHA`` = 0.05 (unequal variances; Welch-Satterthwaite degrees of
freedom). The p-value comes from Student's t distribution through the regularised incomplete beta function
(a continued fraction), so no statistics package is needed.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

ALPHA = 0.05


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """(mean, sample standard deviation); the deviation is ``None`` with fewer than two values."""
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz's method)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-12:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    ln = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(ln) * _betacf(a, b, x) / a
    return 1.0 - math.exp(ln) * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` degrees of freedom."""
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def welch_p(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Two-sided p-value of Welch's t-test that ``a`` and ``b`` have the same mean; ``None`` when either has
    fewer than two values (no noise estimate). Two noiseless samples: 1.0 if equal means, else 0.0."""
    if len(a) < 2 or len(b) < 2:
        return None
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    assert ma is not None and mb is not None and sa is not None and sb is not None
    va, vb = sa * sa / len(a), sb * sb / len(b)
    if va + vb == 0.0:
        return 1.0 if ma == mb else 0.0
    t = (ma - mb) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va * va / (len(a) - 1) + vb * vb / (len(b) - 1))
    return t_two_sided_p(t, df)


def within_noise(a: Sequence[float], b: Sequence[float], alpha: float = ALPHA) -> bool | None:
    """True when Welch's test cannot separate the two means at ``alpha``; ``None`` without a noise estimate."""
    p = welch_p(a, b)
    return None if p is None else p >= alpha


def kendall_tau(a: Sequence[str], b: Sequence[str]) -> float | None:
    """Kendall's rank correlation (tau-a) of two rankings (best first) over the items both hold: 1 = the same
    order, -1 = reversed; ``None`` with fewer than two common items."""
    common = [x for x in a if x in b]
    if len(common) < 2:
        return None
    pos = {x: i for i, x in enumerate(b)}
    pairs = [(x, y) for i, x in enumerate(common) for y in common[i + 1 :]]
    agree = sum(1 if pos[x] < pos[y] else -1 for x, y in pairs)
    return agree / len(pairs)
