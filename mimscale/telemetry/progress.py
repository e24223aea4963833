"""Training progress display: step/total, images/s, ETA and a few scalars.

On a terminal it is a tqdm bar redrawn at most once a second. When the stream
is not a TTY (CI, ``slurm-%j.out``, ``nohup``) carriage-return redraws would
fill the log with one giant line, so :class:`Progress` prints a plain line at
most every ``plain_interval`` seconds instead, plus one on the first update and
one at :meth:`Progress.close`::

    pretrain: step 1200/50000 (2.4%) | 812.4 img/s | elapsed 0:10:02 | ETA 6:40:11 | loss=0.523 lr=1.2e-4

Throughput is measured between updates only: the first :meth:`Progress.update`
starts the clock, so start-up (model build, loader warm-up, the first compiled
step) never enters :meth:`Progress.rate` or the ETA. It is averaged over the
last ``window`` updates, so it follows speed changes (eval pauses, resumed
runs) within a few dozen steps.
"""

from __future__ import annotations

import collections
import math
import sys
import time
from typing import Any, TextIO

from tqdm import tqdm

__all__ = ["Progress", "format_value"]


def format_value(value: Any) -> str:
    """Short human form of a postfix value: ``0.523``, ``1.2e-4``, ``812``."""
    if hasattr(value, "item") and not isinstance(value, (int, float, str)):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if value == 0 or not math.isfinite(value):
        return str(value)
    if 1e-3 <= abs(value) < 1e5:
        return f"{value:.4g}"
    mantissa, exponent = f"{value:.2e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


class Progress:
    """Progress of a run of ``total_steps`` optimizer steps.

    Args:
        total_steps: the step count at the end of training.
        start_step: the step training starts (or resumes) from.
        images_per_step: global images per optimizer step (for img/s).
        enabled: ``False`` on non-zero ranks: nothing is printed, but
            :meth:`rate` still works.
        desc: the label in front of the line.
        file: the stream (default: ``sys.stderr`` at construction time).
        plain_interval: seconds between plain lines on a non-TTY stream.
        window: number of recent updates the rate is averaged over.
    """

    def __init__(
        self,
        total_steps: int,
        *,
        start_step: int = 0,
        images_per_step: int,
        enabled: bool = True,
        desc: str = "pretrain",
        file: TextIO | None = None,
        plain_interval: float = 30.0,
        window: int = 50,
    ) -> None:
        if images_per_step <= 0:
            raise ValueError(f"images_per_step must be positive, got {images_per_step}")
        if window < 2:
            raise ValueError(f"window must be >= 2, got {window}")
        self.total_steps = int(total_steps)
        self.images_per_step = images_per_step
        self.enabled = enabled
        self.desc = desc
        self.plain_interval = plain_interval
        self.step = int(start_step)
        self._file = file if file is not None else sys.stderr
        self._points: collections.deque[tuple[float, int]] = collections.deque(maxlen=window)
        self._t_first: float | None = None
        self._postfix: dict[str, Any] = {}
        self._last_print: float | None = None
        self._printed_step: int | None = None
        self._closed = False
        self._bar: tqdm | None = None
        isatty = getattr(self._file, "isatty", None)
        self.plain = not (callable(isatty) and isatty())
        if enabled and not self.plain:
            self._bar = tqdm(
                total=self.total_steps,
                initial=self.step,
                desc=desc,
                file=self._file,
                mininterval=1.0,
                dynamic_ncols=True,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]",
            )

    # ------------------------------------------------------------- numbers
    def rate(self) -> float:
        """Images/s over the recent updates; 0.0 until two updates have been seen."""
        if len(self._points) < 2:
            return 0.0
        (t0, s0), (t1, s1) = self._points[0], self._points[-1]
        if t1 <= t0:
            return 0.0
        return (s1 - s0) * self.images_per_step / (t1 - t0)

    def eta(self) -> float | None:
        """Seconds left at the current rate, or ``None`` while unknown."""
        r = self.rate()
        if r <= 0:
            return None
        return max(self.total_steps - self.step, 0) * self.images_per_step / r

    def elapsed(self) -> float:
        """Seconds since the first update (start-up excluded)."""
        return 0.0 if self._t_first is None else time.monotonic() - self._t_first

    # ------------------------------------------------------------- display
    def _stats(self) -> str:
        eta = self.eta()
        parts = [f"{self.rate():.1f} img/s", "ETA " + ("?" if eta is None else tqdm.format_interval(eta))]
        if self._postfix:
            parts.append(" ".join(f"{k}={format_value(v)}" for k, v in self._postfix.items()))
        return ", ".join(parts)

    def line(self) -> str:
        """The plain progress line for the current state."""
        pct = f" ({100.0 * self.step / self.total_steps:.1f}%)" if self.total_steps > 0 else ""
        eta = self.eta()
        parts = [
            f"{self.desc}: step {self.step}/{self.total_steps}{pct}",
            f"{self.rate():.1f} img/s",
            f"elapsed {tqdm.format_interval(self.elapsed())}",
            "ETA " + ("?" if eta is None else tqdm.format_interval(eta)),
        ]
        if self._postfix:
            parts.append(" ".join(f"{k}={format_value(v)}" for k, v in self._postfix.items()))
        return " | ".join(parts)

    def _print_plain(self, now: float) -> None:
        self._file.write(self.line() + "\n")
        self._file.flush()
        self._last_print = now
        self._printed_step = self.step

    def update(self, step: int, **postfix: Any) -> None:
        """Report that ``step`` optimizer steps are done; ``postfix`` scalars
        (e.g. ``loss=0.523, lr=1.2e-4``) are shown after the rate and ETA."""
        if self._closed:
            return
        now = time.monotonic()
        step = int(step)
        if self._t_first is None:
            self._t_first = now
        self._points.append((now, step))
        self.step = step
        self._postfix = postfix
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix_str(self._stats(), refresh=False)
            delta = step - self._bar.n
            if delta > 0:
                self._bar.update(delta)
            elif delta < 0:  # should not happen; keep the bar truthful anyway
                self._bar.n = step
                self._bar.refresh()
        elif self._last_print is None or now - self._last_print >= self.plain_interval:
            self._print_plain(now)

    def close(self) -> None:
        """Finish the display (a last plain line if the last step was not printed)."""
        if self._closed:
            return
        self._closed = True
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix_str(self._stats(), refresh=False)
            self._bar.close()
        elif self._t_first is not None and self._printed_step != self.step:
            self._print_plain(time.monotonic())

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
