"""The package's layers have no import cycles. The graph holds EVERY import in ``mimscale/`` -- module level
and inside functions (a function-level import that closes a cycle only hides it) -- and must be acyclic;
and the floors hold: each module imports only from its own floor or below (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "mimscale"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(current: str, is_pkg: bool, level: int, module: str | None) -> str:
    if level == 0:
        return module or ""
    base = current.split(".") if is_pkg else current.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        is_pkg = path.name == "__init__.py"
        for st in ast.walk(tree):
            if True:
                targets: list[str] = []
                if isinstance(st, ast.Import):
                    targets = [a.name for a in st.names]
                elif isinstance(st, ast.ImportFrom):
                    mod = _resolve(name, is_pkg, st.level, st.module)
                    targets = [mod] + [f"{mod}.{a.name}" for a in st.names]
                for t in targets:
                    while t and t not in modules:
                        t = t.rpartition(".")[0]
                    if t and t != name and t.startswith("mimscale"):
                        graph[name].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, f"import cycles in mimscale/: {found}"


FLOORS = {  # a module of this floor may import only its own floor and those below (docs/architecture.md)
    "mimscale.errors": 0,
    "mimscale.ranges": 0,
    "mimscale.amp": 0,
    "mimscale.dist": 1,
    "mimscale.data": 2,
    "mimscale.models": 2,
    "mimscale.masking": 2,
    "mimscale.telemetry": 2,
    "mimscale.objectives": 3,
    "mimscale.teachers": 3,
    "mimscale.config": 4,
    "mimscale.engine": 5,
    "mimscale.checkpoint": 5,
    "mimscale.eval": 6,
    "mimscale.pretrain": 7,
    "mimscale.bench": 7,
    "mimscale.report": 7,
    "mimscale.compare": 7,
    "mimscale.preflight": 7,
    "mimscale.export": 7,
    "mimscale.cli": 8,
    "mimscale.train": 8,
}


def _floor(module: str) -> int | None:
    while module:
        if module in FLOORS:
            return FLOORS[module]
        module = module.rpartition(".")[0]
    return None


def test_floors_are_respected():
    assert set(FLOORS) >= {
        _module_name(p).split(".")[0] + "." + _module_name(p).split(".")[1]
        for p in PKG.rglob("*.py")
        if p.parent != PKG or p.name != "__init__.py"
    }, "a new top-level module or package needs its floor in FLOORS (and docs/architecture.md)"
    bad = []
    for src, dsts in import_graph().items():
        fs = _floor(src)
        for dst in dsts:
            fd = _floor(dst)
            if fs is not None and fd is not None and fd > fs:
                bad.append(f"{src} (floor {fs}) imports {dst} (floor {fd})")
    assert not bad, "\n".join(bad)
