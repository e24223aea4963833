"""Where evaluation results go: printed, a JSON file, and the run's ``metrics.jsonl``.

With a run directory as SOURCE the result is written to ``RUN_DIR/eval/<kind>.json`` and its headline
metrics (``eval/linear_top1``, ``eval/finetune_top1``) are appended to ``RUN_DIR/metrics.jsonl`` at the
run's last training step, so ``mimscale report`` shows them. A kNN result is not appended: the run's own
``eval/knn_top1`` curve (logged during pre-training with the run's eval settings) stays as it was. For an exported ``.safetensors`` file the
JSON goes beside it (``<file stem>.<kind>.json``) unless ``--out`` says otherwise.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .source import Source


def result_path(source: Source, kind: str, out: str | None = None) -> Path:
    if out:
        return Path(out)
    if source.run_dir is not None:
        return source.run_dir / "eval" / f"{kind}.json"
    return source.weights.with_name(f"{source.weights.stem}.{kind}.json")


def record(source: Source, kind: str, result: dict, metrics: dict[str, float], out: str | None = None) -> Path:
    """Write ``result`` (plus ``metrics``) as JSON; append ``metrics`` to the run's metrics.jsonl. Rank 0 only."""
    from ..telemetry import MetricLogger

    path = result_path(source, kind, out)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"kind": kind, "source": str(source.weights), "arch": source.arch, "time": time.time(), **metrics, **result}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    tmp.replace(path)
    if source.run_dir is not None and metrics:
        with MetricLogger(source.run_dir, tensorboard=False, wandb="disabled") as logger:
            logger.log(metrics, step=int(source.step or 0))
    return path
