"""Shared fixtures (small real Fashion-MNIST shards, a tiny CLIP), the tiers, the parallel schedule and the
time guard."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import resource
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def built_once(tmp_path_factory, name: str) -> Iterator[tuple[Path, bool]]:
    """``(directory, must_build)`` for a session fixture that all pytest-xdist workers share: the first worker
    to get here builds it (``must_build`` True; the directory counts as built when the block exits without an
    error), the others wait on the lock and reuse it. Without xdist it is just a fresh directory."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's directory, above every worker's own
    out, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if done.exists():
            yield out, False
            return
        out.mkdir(exist_ok=True)
        yield out, True
        done.touch()


@pytest.fixture(scope="session")
def fmnist_small(tmp_path_factory) -> dict[str, Path]:
    """Real Fashion-MNIST (Debian package) as shards: 2048 train samples in 8 shards, 512 test."""
    with built_once(tmp_path_factory, "fmnist") as (out, build):
        if build:
            from mimscale.data.shards import write_fashion_mnist

            write_fashion_mnist(out, splits=("train",), shard_size=256, limit=2048)
            write_fashion_mnist(out, splits=("test",), shard_size=256, limit=512)
    return {"train": out / "train", "test": out / "test"}


@pytest.fixture(scope="session")
def tiny_clip(fmnist_small, tmp_path_factory) -> Path:
    """Path of a tiny real CLIP (open_clip, ``TINY_CLIP_CFG``: 32 px, patch 4 -> 8x8 grid, ``D_out`` 64), trained
    for 4096 images on ``fmnist_small`` (train: 3-4x chance zero-shot; ~15 s idle). Load it with
    ``mimscale.teachers.clip.CLIPTeacher(path)``; its zero-shot result is beside it (``clip.json``)."""
    with built_once(tmp_path_factory, "tiny_clip") as (out, build):
        if build:
            from mimscale.teachers.train_clip import TrainCLIPConfig, train_clip

            cfg = TrainCLIPConfig(samples=4096, batch_size=32, lr=3e-3, num_workers=0, test_samples=512)
            train_clip(out / "clip.pt", str(fmnist_small["train"]), str(fmnist_small["test"]), cfg, progress=False)
    return out / "clip.pt"


# ----------------------------------------------------------------------------- tiers
# unit: in-process, seconds.  multirank: launches several real ranks (torchrun / deepspeed / accelerate).
# system: real outside parts (the SLURM daemons, headless Chromium, the README demo).  `slow` stays as
# the marker of everything that launches processes or trains on real data.
#   pytest -m unit          pytest -m "not system"          pytest -m multirank
_MULTIRANK = ("ranks=2", "ranks=3", "ranks=ranks", "nproc_per_node", "--num_processes")


def pytest_collection_modifyitems(config, items):
    import inspect

    for item in items:
        path = str(item.path)
        fn = getattr(item, "function", None)
        try:
            src = inspect.getsource(fn) if fn is not None else ""
        except (OSError, TypeError):
            src = ""
        system = "/tests/slurm/" in path or path.endswith("test_demo.py") or "chromium" in src.lower()
        if system:
            item.add_marker(pytest.mark.system)
        if any(m in src for m in _MULTIRANK) or (
            path.endswith("test_launch_zero.py") and "runs" in getattr(item, "fixturenames", ())
        ):
            item.add_marker(pytest.mark.multirank)
        if not system and not item.get_closest_marker("slow") and not item.get_closest_marker("multirank"):
            item.add_marker(pytest.mark.unit)
    _parallel_schedule(items)


# ----------------------------------------------------------------------------- parallel schedule
# `scripts/test.sh` runs the suite on two pytest-xdist workers (`-n 2 --no-loadscope-reorder`; the scheduler
# below replaces --dist). Each test goes to whichever worker is free, except that a group runs whole on one
# worker: the SLURM tests (one local cluster per session) and every module with a module-scoped fixture (built
# once). Modules run longest-first: the SLURM tests (they mostly wait on the cluster), then the modules that
# launch processes, largest time allowance first, then the in-process unit tests, which fill the gaps at
# the end; a module stays contiguous, so without xdist its fixtures are still built once. Each worker's own
# torch uses one thread: the parallelism is the workers'.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
_ROOT = Path(__file__).resolve().parent.parent


def _group(nodeid: str) -> str:
    """The unit of work a test belongs to: ``slurm``, its module (module-scoped fixtures), or itself."""
    path = nodeid.split("::", 1)[0]
    if path.startswith("tests/slurm/"):
        return "slurm"
    return path if _shares_module_fixture(path) else nodeid


@functools.cache
def _shares_module_fixture(path: str) -> bool:
    try:
        return 'scope="module"' in (_ROOT / path).read_text(encoding="utf-8")
    except OSError:
        return False


def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist's scope scheduler with the groups of :func:`_group` (its own ``--dist loadgroup`` marks do
    not reach the node ids under pytest 9)."""
    from xdist.scheduler import LoadScopeScheduling

    class Groups(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _group(nodeid)

    return Groups(config, log)


def _parallel_schedule(items) -> None:
    def rank(item) -> int:
        if "/tests/slurm/" in str(item.path):
            return 0
        return 2 if item.get_closest_marker("unit") else 1

    first: dict[Path, int] = {}
    module_rank: dict[Path, int] = {}
    weight: dict[Path, float] = {}  # the largest time allowance among its tests: the long modules start first
    for i, item in enumerate(items):
        first.setdefault(item.path, i)
        module_rank[item.path] = min(module_rank.get(item.path, 9), rank(item))
        weight[item.path] = max(weight.get(item.path, 0.0), _limit_s(item))
    items.sort(key=lambda it: (module_rank[it.path], -weight[it.path], first[it.path]))  # a module keeps its order


# ----------------------------------------------------------------------------- time guard
# A test may not grow slow unnoticed: its setup and its call are each held to LIMIT_CPU_S seconds of CPU
# (this process plus the subprocesses it waited for, so launches count and a busy machine barely does; 120 s
# of CPU is about a minute of both cores) and to WALL_FACTOR times that in wall time (hangs and sleeps;
# generous, CI boxes are noisy). Over either, the test fails with a line saying so, unless it is allowed more:
# ``@pytest.mark.allow_slow("why", limit_s=N)`` on the test, or an entry of ALLOW_SLOW below (node-id prefix ->
# (CPU limit, why)) for tests in files that are better left alone; tests/README.md lists them.
# MIMSCALE_TEST_LIMIT_S changes LIMIT_CPU_S (0 turns the guard off); MIMSCALE_TEST_TIMES=path appends one JSON
# line per phase (nodeid, phase, wall_s, cpu_s): the source of the slowest-20 list in tests/README.md.
LIMIT_CPU_S = float(os.environ.get("MIMSCALE_TEST_LIMIT_S", "120"))
WALL_FACTOR = 5.0
ALLOW_SLOW: dict[str, tuple[float, str]] = {
    "tests/test_demo.py::": (600, "the README's first command: a real epoch of Fashion-MNIST"),
    "tests/objectives/test_mapet.py::test_learns_": (600, "learning: k-CLIP codes, then 96 steps and kNN"),
    "tests/objectives/test_conmim.py::test_learns_": (400, "learning: 128 steps and kNN"),
    "tests/objectives/test_adpe.py::test_learns_": (600, "learning: 128 steps of 4 crops and kNN"),
    "tests/objectives/test_dtm.py::test_learns_": (600, "learning from a tiny CLIP teacher"),
    "tests/objectives/test_dtm.py::test_relative_position_student_zero3": (400, "ZeRO-0 vs ZeRO-3, 2 ranks"),
    "tests/eval/test_eval_runs.py::": (900, "pre-training, linear probes and a fine-tune through the CLI"),
    "tests/eval/test_finetune_resume.py::": (400, "fine-tune killed and resumed, against a reference"),
    "tests/engine/test_launch_zero.py::": (600, "the module's launches (every launcher and ZeRO stage, 2 ranks)"),
    "tests/test_checkpoint.py::test_bf16_zero123_checkpoints_reshard": (600, "ZeRO 1/2/3 x 3 world sizes"),
    "tests/test_preflight.py::test_check_config_raises_what_the_launch_raises": (400, "launches every bad case"),
    "tests/compare/test_compare.py::test_two_objectives_killed_mid_member": (600, "a compare killed and resumed"),
    "tests/test_docs.py::": (600, "runs the README's and guides' runnable blocks"),
    "tests/engine/test_trainer.py::test_step_syncs_and_collectives_within_budget": (600, "every objective x 2 stages"),
    # SLURM jobs run under slurmd (their CPU is not counted here) and wait out credential expiry on requeue:
    # the wall limit (5x) is what holds them
    "tests/slurm/": (240, "jobs on the local SLURM cluster: waits, requeues"),
}


def _cpu_s() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _limit_s(item) -> float:
    mark = item.get_closest_marker("allow_slow")
    if mark is None:
        allowed = [v for k, v in ALLOW_SLOW.items() if item.nodeid.startswith(k)]
        return allowed[0][0] if allowed else LIMIT_CPU_S
    if not (mark.args and isinstance(mark.args[0], str) and mark.args[0].strip()):
        raise pytest.UsageError(f"{item.nodeid}: allow_slow needs a reason: @pytest.mark.allow_slow('why', limit_s=N)")
    return float(mark.kwargs.get("limit_s", mark.args[1] if len(mark.args) > 1 else 600))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    item._cpu0 = _cpu_s()
    yield
    item._cpu_setup = _cpu_s() - item._cpu0


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    cpu0 = _cpu_s()
    yield
    item._cpu_call = _cpu_s() - cpu0


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if call.when not in ("setup", "call"):
        return
    cpu = getattr(item, f"_cpu_{call.when}", 0.0)
    path = os.environ.get("MIMSCALE_TEST_TIMES")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(
                json.dumps(
                    {
                        "nodeid": item.nodeid,
                        "phase": call.when,
                        "wall_s": round(call.duration, 2),
                        "cpu_s": round(cpu, 2),
                    }
                )
                + "\n"
            )
    limit = _limit_s(item)
    if not rep.passed or LIMIT_CPU_S <= 0 or limit <= 0:
        return
    wall_limit = WALL_FACTOR * limit
    if cpu > limit or call.duration > wall_limit:
        rep.outcome = "failed"
        rep.longrepr = (
            f"time guard: {call.when} took {cpu:.1f} s CPU / {call.duration:.1f} s wall, over the limit of "
            f"{limit:g} s CPU / {wall_limit:g} s wall (tests/conftest.py): make it faster, or mark it "
            "@pytest.mark.allow_slow('why', limit_s=N) and list it in tests/README.md"
        )
