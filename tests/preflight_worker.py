"""Run each bad configuration through ``mimscale check-config`` and through the real launch, in one process.

Usage: ``python preflight_worker.py CASES_JSON OUT_JSON``. ``CASES_JSON`` is a list of
``{"id", "recipe", "overrides", "world_size"}``. For each case it records the error (type and one-line
message) of

* ``check``: :func:`mimscale.preflight.check` with ``--world-size``;
* ``launch``: what ``mimscale pretrain`` does — :func:`mimscale.config.load`, then
  :func:`mimscale.pretrain.pretrain` under a launcher environment of that world size (this process is rank
  0). Every bad case must fail before the first optimizer step; one that does not fails its row (the run then
  trains a few tiny steps and its "error" is ``None``).

Cases are run in the given order; those that reach DeepSpeed's engine (world size 1 only: a collective with
absent ranks would wait) should come last, since the process group stays initialised afterwards.
"""

from __future__ import annotations

import json
import os
import sys
from functools import partial
from pathlib import Path


def _error(fn) -> dict | None:
    from mimscale.errors import MimscaleError

    try:
        fn()
    except MimscaleError as e:
        return {"type": type(e).__name__, "message": str(e)}
    return None


def _launch(recipe, overrides) -> None:
    from mimscale import config as C
    from mimscale.pretrain import pretrain

    pretrain(C.load(recipe, overrides))


def main(cases_path: str, out_path: str) -> None:
    from mimscale.preflight import check

    results = {}
    for case in json.loads(Path(cases_path).read_text()):
        env = dict(os.environ)
        world = case["world_size"]
        if world > 1:  # rank 0 of a `torchrun`-style launch: the schedule is derived for this world size
            os.environ.update(
                RANK="0",
                WORLD_SIZE=str(world),
                LOCAL_RANK="0",
                LOCAL_WORLD_SIZE=str(world),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT="29999",
            )
        try:
            recipe, over = case["recipe"], case["overrides"]
            results[case["id"]] = {
                "check": _error(partial(check, recipe, over, world)),
                "launch": _error(partial(_launch, recipe, over)),
            }
        finally:
            os.environ.clear()
            os.environ.update(env)
        print(case["id"], results[case["id"]], flush=True)
    Path(out_path).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
