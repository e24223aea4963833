"""House rules of CONTRIBUTING.md that code review alone would let slip, checked on the package's source:
only ``engine/deepspeed.py`` and ``checkpoint.py`` import DeepSpeed; only ``dist.py`` names launcher
environment variables; the train loop (``engine/``) names no objective; every ``torch.load`` is
``weights_only=True``. Import floors and cycles: ``tests/test_imports.py``."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "mimscale"
LAUNCHER_VARS = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK"}
LAUNCHER_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "TORCHELASTIC_")


@functools.cache
def _trees() -> dict[str, ast.AST]:
    return {str(p.relative_to(PKG)): ast.parse(p.read_text()) for p in sorted(PKG.rglob("*.py"))}


def _imports_deepspeed(tree: ast.AST) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "deepspeed" for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "deepspeed":
            return True
    return False


def _strings(tree: ast.AST) -> set[str]:
    return {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}


def test_only_the_engine_and_checkpoints_import_deepspeed():
    found = {name for name, tree in _trees().items() if _imports_deepspeed(tree)}
    assert found <= {"engine/deepspeed.py", "checkpoint.py"}, found
    assert "engine/deepspeed.py" in found  # the check sees imports at all


def test_only_dist_names_launcher_environment_variables():
    offenders = {}
    for name, tree in _trees().items():
        if name == "dist.py":
            continue
        hits = {s for s in _strings(tree) if s in LAUNCHER_VARS or s.startswith(LAUNCHER_PREFIXES)}
        if hits:
            offenders[name] = sorted(hits)
    assert not offenders, f"launcher variables outside mimscale/dist.py: {offenders}"
    assert {"RANK", "WORLD_SIZE"} <= _strings(_trees()["dist.py"])  # the check would see them


def test_the_train_loop_names_no_objective():
    from mimscale.objectives import available

    names = set(available())
    offenders = {
        name: sorted(names & _strings(tree))
        for name, tree in _trees().items()
        if name.startswith("engine/") and names & _strings(tree)
    }
    assert not offenders, f"objective names in the train loop: {offenders}"


def _torch_load_calls(tree: ast.AST) -> list[ast.Call]:
    calls = []
    for node in ast.walk(tree):
        func = node.func if isinstance(node, ast.Call) else None
        if isinstance(func, ast.Attribute) and func.attr == "load" and ast.unparse(func.value) == "torch":
            calls.append(node)
    return calls


def test_every_torch_load_is_weights_only():
    seen, bad = 0, []
    for name, tree in _trees().items():
        for call in _torch_load_calls(tree):
            seen += 1
            kw = {k.arg: k.value for k in call.keywords}
            value = kw.get("weights_only")
            if not (isinstance(value, ast.Constant) and value.value is True):
                bad.append(f"{name}:{call.lineno}")
    assert not bad, f"torch.load without weights_only=True: {bad}"
    assert seen > 0  # the check finds calls at all


@pytest.mark.parametrize(
    "source,rule",
    [
        ("import deepspeed\n", _imports_deepspeed),
        ("def f():\n    from deepspeed.runtime import zero\n", _imports_deepspeed),
    ],
)
def test_the_checks_catch_a_violation(source, rule):
    assert rule(ast.parse(source))
    (call,) = _torch_load_calls(ast.parse("torch.load(path)\n"))
    assert "weights_only" not in {k.arg for k in call.keywords}


def _starts_an_engine(tree: ast.AST) -> bool:
    """``ds.initialize(...)`` (our engine builder) or ``Accelerator(...)`` called anywhere in the module."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = ast.unparse(node.func)
            if f in ("ds.initialize", "Accelerator") or f.endswith(".ds.initialize"):
                return True
    return False


def test_every_engine_start_binds_the_device_first():
    """DeepSpeed and accelerate take ``LOCAL_RANK`` as the GPU ordinal: under one-GPU-per-task binding that ordinal
    does not exist, so every module (package and benchmarks) that starts an engine calls ``dist.bind_device``
    (the Trainer does it for every task)."""
    root = Path(__file__).resolve().parent.parent
    files = [p for p in (root / "mimscale").rglob("*.py") if p.name != "deepspeed.py"]
    files += sorted((root / "benchmarks").glob("*.py"))
    starters = [p for p in files if _starts_an_engine(ast.parse(p.read_text()))]
    assert len(starters) >= 4  # the Trainer, bench throughput, eval, the benchmarks
    missing = [str(p.relative_to(root)) for p in starters if "bind_device(" not in p.read_text()]
    assert not missing, f"start an engine without dist.bind_device: {missing}"
    assert _starts_an_engine(ast.parse("engine = ds.initialize(m, cfg, dv, 'cuda')\n"))
