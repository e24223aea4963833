"""A real pre-training run (``Trainer(cfg).fit()``, any launcher) with test hooks: fault injection and
counters of what the step loop costs. Rank 0 prints ``WORKER {json}`` at the end.

    python tests/engine/trainer_worker.py [--inject 2,4,4] [--count] key=value ...

``--inject S,S,..``: rank 0's loss of one micro-batch at each listed step becomes NaN (a step listed twice:
two micro-batches). ``--drop-batch I``: the run never sees its I-th micro-batch (0-based; the reference for a
dropped micro-batch). ``--count``: count, per optimizer step, the collectives (``torch.distributed.*``) and
host synchronisations (``Tensor.item/tolist/__bool__/__float__/__int__``) issued from mimscale's own code
(DeepSpeed's gradient collectives are the training's, not the loop's, and are not counted).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter

import torch
import torch.distributed as tdist

from mimscale import config as C
from mimscale.errors import MimscaleError
from mimscale.pretrain import trainer as pretrain_trainer

COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "broadcast",
    "barrier",
    "reduce",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "all_to_all_single",
    "gather",
    "scatter",
)
SYNCS = ("item", "tolist", "__bool__", "__float__", "__int__")


class Counts:
    def __init__(self):
        self.on, self.collectives, self.syncs, self.steps = False, Counter(), Counter(), 0

    def around(self, fn):
        def counted_step(*a, **k):
            self.on, self.steps = True, self.steps + 1
            try:
                return fn(*a, **k)
            finally:
                self.on = False

        return counted_step

    def wrap(self, owner, name: str, bucket: Counter) -> None:
        orig = getattr(owner, name)

        def counted(*a, **k):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if self.on and caller.startswith("mimscale."):
                bucket[f"{caller}.{name}"] += 1
            return orig(*a, **k)

        setattr(owner, name, counted)


def inject_at(steps: list[int], rank: int):
    left = Counter(steps)

    def hook(step: int, loss: torch.Tensor) -> torch.Tensor:
        if rank == 0 and left[step] > 0:
            left[step] -= 1
            return loss * float("nan")
        return loss

    return hook


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--inject", default="")
    p.add_argument("--count", action="store_true")
    p.add_argument("--drop-batch", type=int, default=None)
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    try:
        trainer = pretrain_trainer(C.load(None, a.overrides))
        if a.inject:
            trainer.loss_hooks.append(inject_at([int(s) for s in a.inject.split(",")], trainer.d.rank))
        if a.drop_batch is not None:
            batches, drop = trainer._batches, a.drop_batch
            trainer._batches = lambda: (b for i, b in enumerate(batches()) if i != drop)
        counts = Counts()
        if a.count:
            for name in COLLECTIVES:
                if hasattr(tdist, name):
                    counts.wrap(tdist, name, counts.collectives)
            for name in SYNCS:
                counts.wrap(torch.Tensor, name, counts.syncs)
            trainer._run_step = counts.around(trainer._run_step)  # the step, not evaluation or saving
        summary = trainer.fit()
    except MimscaleError as e:
        print(f"mimscale: error: {e}", file=sys.stderr, flush=True)
        return 2
    if trainer.d.is_main:
        print(
            "WORKER "
            + json.dumps(
                {
                    "summary": summary,
                    "steps_run": counts.steps,
                    "flag_collectives": trainer.flags.collectives,
                    "collectives": dict(counts.collectives),
                    "syncs": dict(counts.syncs),
                }
            ),
            flush=True,
        )
    return summary.get("exit_code", 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
