"""What one optimizer step costs the device pipeline, for EVERY registered objective, through the real Trainer.

    torchrun --nproc_per_node 2 tests/engine/step_costs_worker.py OUT_JSON STAGES RUN_ROOT key=value ...

For each ZeRO stage in ``STAGES`` (comma-separated) and each objective of ``objectives.available()`` (its
``tiny_config`` knobs), a real ``Trainer`` (``mimscale.pretrain.trainer``) trains a few steps while three counters
watch two windows: ``step`` (``Trainer._run_step``: the batch's copy to the device, forward, backward,
``engine.step``; not the loader producing the batch: CPU work on host tensors) and ``hooks``
(the objective's ``before_step`` / ``after_optimizer_step``: EMA updates). Every event is attributed to the first
calling frame outside torch / ``deepspeed.comm`` / ``deepspeed.utils`` / ``deepspeed.accelerator`` (so a
collective issued by ``deepspeed.utils.safe_get_full_fp32_param`` for mimscale counts as mimscale's):

* collectives: calls of the ``torch.distributed`` functions (whoever calls them through the module);
* host synchronisations, seen by a ``TorchDispatchMode`` on every aten op: ``nonzero``, ``masked_select``,
  boolean-mask indexing (``index`` / ``index_put_`` with a bool index), ``_local_scalar_dense`` (``.item()``,
  ``bool()``, ``float()``, ``int()``), plus the host copies that bypass the dispatcher: ``Tensor.tolist`` /
  ``Tensor.numpy`` / ``Tensor.cpu``; on CUDA each of these blocks the host until the device has caught up;
* ``synchronize()`` calls: DeepSpeed's accelerator object (its throughput timer calls it), ``torch.cuda`` and
  ``torch.cpu``.

Rank 0 writes ``{stage: {objective: {...}}}`` to OUT_JSON: per step and per hook call, a Counter of
``window|owner|event`` plus the Trainer's own ``grad_accum``. An objective whose run raises records ``error``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import traceback
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as tdist
from torch.utils._python_dispatch import TorchDispatchMode

COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_object",
    "all_gather_into_tensor",
    "broadcast",
    "broadcast_object_list",
    "barrier",
    "reduce",
    "reduce_scatter_tensor",
    "all_to_all_single",
    "gather",
    "scatter",
)
HOST_COPIES = ("tolist", "numpy", "cpu")
SYNC_OPS = {"aten.nonzero.default", "aten.masked_select.default", "aten._local_scalar_dense.default"}
INDEX_OPS = {"aten.index.Tensor", "aten.index_put_.default", "aten.index_put.default"}
PASS_THROUGH = ("torch.", "torch", "deepspeed.comm", "deepspeed.utils", "deepspeed.accelerator", "contextlib")
HERE = __name__
HOST_TAG = "_step_costs_host"  # set on tensors known to be host data (see SyncMode)


def owner(depth: int = 2) -> tuple[str, int]:
    """Module and line of the first frame (outward from the caller) that is not torch / DeepSpeed plumbing /
    this file."""
    f = sys._getframe(depth)
    while f is not None:
        mod = f.f_globals.get("__name__", "")
        if mod != HERE and not mod.startswith(PASS_THROUGH):
            return mod, f.f_lineno
        f = f.f_back
    return "?", 0


class Counts:
    """Per-window event Counters; ``window`` is None outside the watched calls."""

    def __init__(self) -> None:
        self.window: str | None = None
        self.current: Counter = Counter()
        self.lines: Counter = Counter()  # "window|module:line|event" over the whole run (for the report)

    def add(self, event: str, depth: int = 3) -> None:
        if self.window is not None:
            mod, line = owner(depth)
            self.current[f"{self.window}|{mod}|{event}"] += 1
            if mod.startswith("mimscale."):
                self.lines[f"{self.window}|{mod}:{line}|{event}"] += 1

    def watch(self, window: str, fn, log: list):
        def watched(*a, **k):
            outer, self.window, self.current = self.window, window, Counter()
            try:
                with SyncMode(self):
                    return fn(*a, **k)
            finally:
                log.append(dict(self.current))
                self.window = outer

        return watched

    def unwatched_batches(self, batches):
        """The loader's stream with counting paused while it produces a batch: decoding, augmenting and mask
        collation are CPU work on host tensors (in loader workers when ``data.num_workers`` > 0), not device syncs."""
        it = batches()
        while True:
            outer, self.window = self.window, None
            try:
                batch = next(it)
            finally:
                self.window = outer
            yield batch

    def wrap(self, holder, name: str, event: str) -> None:
        orig = getattr(holder, name)

        def counted(*a, **k):
            self.add(event)
            return orig(*a, **k)

        setattr(holder, name, counted)


class SyncMode(TorchDispatchMode):
    """Counts the ops that wait for the device. A CPU box cannot tell host tensors from device tensors, so two
    kinds of HOST data are recognised and not counted: tensors drawn from a CPU ``torch.Generator`` (and what is
    computed from those alone: e.g. DTM's per-step merge schedule), and the step counters ``torch.optim`` keeps
    on the host (read inside ``torch.optim``; non-capturable optimizers)."""

    def __init__(self, counts: Counts):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        host_in = bool(tensors) and all(getattr(t, HOST_TAG, False) for t in tensors)
        gen = kwargs.get("generator")
        if name in SYNC_OPS and not host_in and not _in_optimizer():
            self.counts.add(name.split(".")[1], depth=4)
        elif name in INDEX_OPS and len(args) > 1 and not host_in:
            idx = args[1]
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in idx or ()):
                self.counts.add(f"bool_mask_{name.split('.')[1]}", depth=4)
        out = func(*args, **kwargs)
        if host_in or (gen is not None and gen.device.type == "cpu"):
            for o in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(o, torch.Tensor):
                    setattr(o, HOST_TAG, True)
        return out


def _in_optimizer() -> bool:
    f = sys._getframe(2)
    while f is not None:
        if f.f_globals.get("__name__", "").startswith("torch.optim."):
            return True
        f = f.f_back
    return False


def install(counts: Counts) -> None:
    for name in COLLECTIVES:
        if hasattr(tdist, name):
            counts.wrap(tdist, name, f"collective:{name}")
    for name in HOST_COPIES:
        counts.wrap(torch.Tensor, name, f"host_copy:{name}")
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    counts.wrap(acc, "synchronize", "synchronize:deepspeed_accelerator")
    counts.wrap(torch.cuda, "synchronize", "synchronize:torch.cuda")
    counts.wrap(torch.cpu, "synchronize", "synchronize:torch.cpu")


def run_one(stage: int, name: str, root: str, overrides: list[str], counts: Counts) -> dict:
    from mimscale import config as C
    from mimscale.objectives import available
    from mimscale.pretrain import trainer as pretrain_trainer

    knobs = dataclasses.asdict(available()[name].tiny_config())
    cfg = C.load(None, [*overrides, f"train.zero_stage={stage}", f"train.run_dir={root}/{stage}_{name}"])
    cfg = dataclasses.replace(cfg, objective={"name": name, **knobs})
    trainer = pretrain_trainer(cfg)
    steps: list[dict] = []
    hooks: list[dict] = []
    counts.lines.clear()
    trainer._run_step = counts.watch("step", trainer._run_step, steps)  # type: ignore[method-assign]
    batches = trainer._batches
    trainer._batches = lambda: counts.unwatched_batches(batches)  # type: ignore[method-assign]
    module = trainer.engine.module
    object.__setattr__(module, "before_step", counts.watch("hooks", module.before_step, hooks))
    object.__setattr__(module, "after_optimizer_step", counts.watch("hooks", module.after_optimizer_step, hooks))
    # per-rank randomness (before any step; not counted): identical initial weights, a different drop-path
    # stream (drop-path draws ``bernoulli_`` from the default generator of the device, as below)
    init = float(sum(p.detach().double().sum() for p in module.parameters())) if stage != 3 else None
    keep = torch.empty(64, device=trainer.device).bernoulli_(0.5).tolist()
    ranks = [None] * tdist.get_world_size()
    tdist.all_gather_object(ranks, {"init": init, "drop_path_keep": keep})
    summary = trainer.fit()
    return {
        "ranks": ranks,
        "mimscale_lines": dict(counts.lines),
        "grad_accum": trainer.derived.grad_accum,
        "steps": steps,
        "hooks": hooks,
        "final_loss": summary.get("final_loss"),
        "trainable_params": sum(1 for p in module.parameters() if p.requires_grad),
    }


def main(argv: list[str]) -> int:
    out, stages, root, overrides = argv[0], [int(s) for s in argv[1].split(",")], argv[2], argv[3:]
    from mimscale.objectives import available

    counts = Counts()
    result: dict = {}
    installed = False
    for stage in stages:
        only = [n for n in os.environ.get("STEP_COSTS_ONLY", "").split(",") if n]  # (debugging: a subset)
        for name in sorted(n for n in available() if not only or n in only):
            try:
                if not installed:  # after the first engine exists: DeepSpeed's accelerator is chosen then
                    from mimscale import dist

                    d = dist.detect()
                    dist.export(d)
                    install(counts)
                    installed = True
                result.setdefault(str(stage), {})[name] = run_one(stage, name, root, overrides, counts)
            except Exception as e:  # recorded; the test reports it (both ranks fail alike: no hang)
                result.setdefault(str(stage), {})[name] = {"error": f"{type(e).__name__}: {e}"}
                traceback.print_exc()
    if not tdist.is_initialized() or tdist.get_rank() == 0:
        Path(out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
