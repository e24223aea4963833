"""Metric logging to three sinks: a JSONL file, TensorBoard and wandb.

One :class:`MetricLogger` per run, created on every rank; only rank 0 passes
``enabled=True``. On the other ranks every method is a no-op and nothing is
imported, created or written.

Sinks (all under ``run_dir``):

- ``metrics.jsonl`` -- one JSON object per :meth:`MetricLogger.log` call::

      {"step": 120, "time": 1732412345.12, "train/loss": 0.523, "perf/img_per_s": 812.4}

  ``time`` is the Unix time of the call. The file is opened in append mode and
  line-buffered, so a killed run keeps every line it logged and a resumed run
  appends (the file is never truncated). Non-finite floats are written as the
  JSON *strings* ``"nan"``, ``"inf"`` and ``"-inf"`` (plain JSON has no NaN);
  every line therefore stays strict JSON, and :func:`read_jsonl` turns those
  strings back into floats, so a diverging loss stays visible as NaN/inf instead
  of vanishing as ``null``. A logger created with ``purge_step=S`` (resume)
  first appends a marker line ``{"step": S, "time": .., "event": "purge"}``;
  it carries no metrics and :func:`read_jsonl` does not return it.
- ``tb/`` -- TensorBoard scalars written by
  :class:`torch.utils.tensorboard.SummaryWriter`, one tag per metric name.
- ``wandb/`` -- a wandb run (``dir=run_dir``). Its id is kept in
  ``run_dir/wandb_id.txt`` and reused when the logger is created again on the
  same ``run_dir`` (resume after preemption continues the same wandb run).

Metric names are ``<group>/<name>``; the groups the engine uses are
``train/``, ``eval/``, ``perf/`` and ``time/`` (:data:`METRIC_GROUPS`). Other
groups are accepted so a plugin can add its own (e.g. ``data/``), but a name
without a ``/`` is a programming error and raises :class:`ValueError`.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import secrets
import string
import sys
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["METRIC_GROUPS", "MetricLogger", "read_jsonl", "resolve_wandb_mode"]

#: The metric groups (name prefixes) the engine logs under.
METRIC_GROUPS = ("train", "eval", "perf", "time")

JSONL_NAME = "metrics.jsonl"
TB_DIRNAME = "tb"
WANDB_ID_NAME = "wandb_id.txt"

_WANDB_MODES = ("auto", "online", "offline", "disabled")
_NONFINITE_TO_STR = {math.inf: "inf", -math.inf: "-inf"}
_STR_TO_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}

# "Warn once" per process for a sink whose package cannot be imported.
_warned_missing: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned_missing:
        _warned_missing.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def resolve_wandb_mode(wandb: str) -> str:
    """Turn the ``wandb=`` argument into a concrete wandb mode.

    ``"auto"``: the ``WANDB_MODE`` environment variable if it is set (the user's
    explicit choice, e.g. ``disabled`` on a cluster), else ``"online"`` when
    ``WANDB_API_KEY`` is set and ``"offline"`` otherwise (no network attempt;
    sync later with ``wandb sync run_dir/wandb/offline-run-*``).
    Explicit ``"online" | "offline" | "disabled"`` are returned unchanged.
    """
    if wandb not in _WANDB_MODES:
        raise ValueError(f"wandb must be one of {_WANDB_MODES}, got {wandb!r}")
    if wandb != "auto":
        return wandb
    env_mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if env_mode in ("online", "offline", "disabled"):
        return env_mode
    if env_mode == "dryrun":  # wandb's old spelling of offline
        return "offline"
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def _check_name(name: Any) -> str:
    if not isinstance(name, str):
        raise ValueError(f"metric name must be a str, got {type(name).__name__}: {name!r}")
    group, sep, rest = name.partition("/")
    if not sep or not group or not rest:
        raise ValueError(
            f"metric name {name!r} must be '<group>/<name>' with a group such as "
            + ", ".join(g + "/" for g in METRIC_GROUPS)
        )
    return name


def _to_number(name: str, value: Any) -> int | float:
    """A Python int/float from an int, float, bool, 0-d/1-element tensor or numpy scalar."""
    if hasattr(value, "item") and not isinstance(value, (int, float)):
        value = value.item()  # torch.Tensor / numpy scalar (syncs a CUDA tensor)
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    raise TypeError(f"metric {name!r}: expected a number or a 1-element tensor, got {type(value).__name__}")


def _json_value(value: int | float) -> int | float | str:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else _NONFINITE_TO_STR[value]
    return value


def read_jsonl(path: str | os.PathLike, *, drop_rewound: bool = False) -> list[dict]:
    """Read a ``metrics.jsonl`` file written by :class:`MetricLogger`.

    Returns one dict per line, in file order. ``"nan"``/``"inf"``/``"-inf"``
    strings are turned back into floats. A truncated last line (the run was
    killed mid-write) is skipped silently; an unparsable line elsewhere (the
    fragment a killed run left before a resumed run appended after it) is
    skipped with a :class:`RuntimeWarning`.

    Purge markers (written by ``MetricLogger(purge_step=S)`` on resume) are
    never returned. ``drop_rewound=True`` applies them: at a marker, the
    records before it with ``step >= S`` -- logged by the attempt that was
    killed after its last checkpoint -- are dropped, so every step appears as
    the resumed run logged it.
    """
    text = Path(path).read_text(encoding="utf-8")
    lines = text.split("\n")
    records: list[dict] = []
    last_index = max(i for i, line in enumerate(lines) if line.strip()) if text.strip() else -1
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("not an object")
        except ValueError:
            if i != last_index:
                warnings.warn(
                    f"{path}:{i + 1}: skipping an unparsable line (left by a killed run?)", RuntimeWarning, stacklevel=2
                )
            continue
        if rec.get("event") == "purge":
            if drop_rewound:
                records = [r for r in records if r.get("step", -math.inf) < rec["step"]]
            continue
        for key, value in rec.items():
            if isinstance(value, str) and value in _STR_TO_NONFINITE:
                rec[key] = _STR_TO_NONFINITE[value]
        records.append(rec)
    return records


def _new_run_id() -> str:
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def _close_wandb_service() -> None:
    """Shut down this process's wandb service once no MetricLogger here has a run open.

    ``run.finish()`` returns before the service has written the run's ``run-<id>.wandb``
    file: it only *informs* the service, which flushes and closes the file later (on a
    loaded machine the file can still hold just its 7-byte header when ``finish`` returns).
    ``wandb.teardown()`` waits for the service to exit, i.e. for every file to be complete,
    so a closed logger leaves a run directory that can be read or synced at once. An open
    run of another logger in this process keeps the service alive (it then closes at exit).
    """
    global _open_wandb_runs
    _open_wandb_runs -= 1
    if _open_wandb_runs == 0:
        import wandb

        wandb.teardown()


_open_wandb_runs = 0  # wandb runs opened by MetricLoggers of this process and not yet finished


class MetricLogger:
    """Log scalar metrics to ``run_dir/metrics.jsonl``, TensorBoard and wandb.

    Args:
        run_dir: the run directory (created if missing; only when enabled).
        enabled: ``False`` on non-zero ranks: every method does nothing.
        jsonl / tensorboard: turn those sinks on or off.
        wandb: ``"auto" | "online" | "offline" | "disabled"``, see
            :func:`resolve_wandb_mode`. ``"disabled"`` does not import wandb.
        project / run_name / config: passed to ``wandb.init``; ``config`` is
            also logged like :meth:`log_config`.
        resume_id: the wandb run id to continue. When ``None``, the id stored
            in ``run_dir/wandb_id.txt`` is reused if present, else a new one is
            made and stored there.
        purge_step: on resume, the first step the resumed run will log.
            What the killed attempt logged at ``step >= purge_step`` (after its
            last checkpoint) is superseded: TensorBoard hides those events, and
            the JSONL, which is never rewritten, gets a purge marker line that
            ``read_jsonl(path, drop_rewound=True)`` applies. (wandb has no
            purge: a resumed online run ignores steps below the last one it
            already holds.)

    If ``tensorboard`` or ``wandb`` cannot be imported, or ``wandb.init``
    fails, a :class:`RuntimeWarning` is issued once and the run goes on
    without that sink. ``WANDB_SILENT`` defaults to ``true``.

    Use as a context manager or call :meth:`close`.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        enabled: bool = True,
        jsonl: bool = True,
        tensorboard: bool = True,
        wandb: str = "auto",
        project: str = "mimscale",
        run_name: str | None = None,
        config: Mapping[str, Any] | None = None,
        resume_id: str | None = None,
        purge_step: int | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = bool(enabled)
        self.wandb_mode = resolve_wandb_mode(wandb)
        self.wandb_id: str | None = None
        self._jsonl_file = None
        self._tb_writer = None
        self._wandb_run = None
        self._closed = False
        if not self.enabled:
            return

        self.run_dir.mkdir(parents=True, exist_ok=True)
        if jsonl:
            self._jsonl_file = self._open_jsonl(self.run_dir / JSONL_NAME)
            if purge_step is not None:
                marker = {"step": int(purge_step), "time": time.time(), "event": "purge"}
                self._jsonl_file.write(json.dumps(marker) + "\n")
        if tensorboard:
            self._tb_writer = self._open_tensorboard(purge_step)
        if self.wandb_mode != "disabled":
            self._wandb_run = self._open_wandb(project, run_name, config, resume_id)
        if config:
            self._config_to_tensorboard(config)

    # ------------------------------------------------------------------ sinks
    @staticmethod
    def _open_jsonl(path: Path):
        # If a killed run left a partial last line, start on a fresh line so the
        # fragment does not swallow the first new record.
        needs_newline = False
        if path.exists() and path.stat().st_size > 0:
            with open(path, "rb") as tail:
                tail.seek(-1, os.SEEK_END)
                needs_newline = tail.read(1) != b"\n"
        f = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 - line-buffered, open for the whole run
        if needs_newline:
            f.write("\n")
        return f

    def _open_tensorboard(self, purge_step: int | None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # tensorboard not installed
            _warn_once("tensorboard", f"TensorBoard logging disabled: {e}")
            return None
        return SummaryWriter(log_dir=str(self.run_dir / TB_DIRNAME), purge_step=purge_step, flush_secs=10)

    def _open_wandb(self, project, run_name, config, resume_id):
        os.environ.setdefault("WANDB_SILENT", "true")
        try:
            import wandb
        except ImportError as e:
            _warn_once("wandb", f"wandb logging disabled: cannot import wandb ({e})")
            return None
        id_file = self.run_dir / WANDB_ID_NAME
        run_id = resume_id
        if run_id is None and id_file.exists():
            run_id = id_file.read_text(encoding="utf-8").strip() or None
        if run_id is None:
            run_id = _new_run_id()
        tmp = id_file.with_suffix(".tmp")
        tmp.write_text(run_id + "\n", encoding="utf-8")
        os.replace(tmp, id_file)
        try:
            run = wandb.init(
                project=project,
                name=run_name,
                config=dict(config) if config else None,
                id=run_id,
                resume="allow",
                dir=str(self.run_dir),
                mode=self.wandb_mode,
                reinit="create_new",  # never hand back (or finish) another logger's run
            )
        except Exception as e:  # e.g. online without network: keep training
            _warn_once("wandb-init", f"wandb logging disabled: wandb.init failed ({type(e).__name__}: {e})")
            return None
        global _open_wandb_runs
        _open_wandb_runs += 1
        self.wandb_id = run_id
        return run

    def _config_to_tensorboard(self, cfg: Mapping[str, Any]) -> None:
        if self._tb_writer is not None:
            text = json.dumps(dict(cfg), indent=2, sort_keys=True, default=str)
            # Indent by 4 spaces: TensorBoard renders text as markdown.
            self._tb_writer.add_text("config", "\n".join("    " + line for line in text.splitlines()))

    # ------------------------------------------------------------------ API
    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log scalars at ``step``. Values: int, float, bool or 1-element tensor.

        Raises ``ValueError`` for a name without a ``/`` group prefix.
        """
        if not self.enabled:
            return
        if self._closed:
            raise RuntimeError("MetricLogger.log() called after close()")
        if isinstance(step, bool) or not isinstance(step, numbers.Integral):
            raise TypeError(f"step must be an int, got {type(step).__name__}")
        step = int(step)
        values = {_check_name(k): _to_number(k, v) for k, v in metrics.items()}
        if not values:
            return
        if self._jsonl_file is not None:
            record: dict[str, Any] = {"step": step, "time": time.time()}
            record.update((k, _json_value(v)) for k, v in values.items())
            self._jsonl_file.write(json.dumps(record, allow_nan=False) + "\n")
        if self._tb_writer is not None:
            for k, v in values.items():
                self._tb_writer.add_scalar(k, v, global_step=step)
        if self._wandb_run is not None:
            self._wandb_run.log(values, step=step)

    def log_config(self, cfg: Mapping[str, Any]) -> None:
        """Record the run configuration (wandb config; TensorBoard text ``config``)."""
        if not self.enabled or self._closed:
            return
        if self._wandb_run is not None:
            self._wandb_run.config.update(dict(cfg), allow_val_change=True)
        self._config_to_tensorboard(cfg)

    def flush(self) -> None:
        """Push buffered data to disk (call before a save-on-signal exit)."""
        if not self.enabled or self._closed:
            return
        if self._jsonl_file is not None:
            self._jsonl_file.flush()
            try:
                os.fsync(self._jsonl_file.fileno())
            except OSError:
                pass
        if self._tb_writer is not None:
            self._tb_writer.flush()

    def close(self, exit_code: int = 0) -> None:
        """Flush and finish every sink. Idempotent. A non-zero ``exit_code``
        marks the wandb run as failed (the context manager passes 1 on an exception)."""
        if not self.enabled or self._closed:
            return
        self.flush()
        self._closed = True
        if self._jsonl_file is not None:
            self._jsonl_file.close()
            self._jsonl_file = None
        if self._tb_writer is not None:
            self._tb_writer.close()
            self._tb_writer = None
        if self._wandb_run is not None:
            run, self._wandb_run = self._wandb_run, None
            try:
                run.finish(exit_code=exit_code)
            except Exception as e:  # never lose the other sinks to a wandb hiccup
                print(f"mimscale: wandb finish failed: {e}", file=sys.stderr)
            try:
                _close_wandb_service()
            except Exception as e:
                print(f"mimscale: wandb teardown failed: {e}", file=sys.stderr)

    def __enter__(self) -> MetricLogger:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(exit_code=0 if exc_type is None else 1)
