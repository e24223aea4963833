"""Every command the README, CONTRIBUTING.md and the guides (docs/guide/) show works as written.

Each fenced ``bash`` block is one of two kinds, and ``console`` blocks are a third:

- **runnable**: a ``<!-- runnable -->`` (or ``<!-- runnable slow -->``) line right before the fence. The block
  runs as written, with ``bash -e -o pipefail``, in a scratch directory, with this venv's ``mimscale`` first
  on PATH; it must exit 0. These launch processes, so they are marked slow.
- **checked** (every other bash block): each command is checked without running it. ``mimscale ...`` is
  parsed by the real CLI parser (an unknown option or subcommand fails), and wherever a recipe and
  ``key=value`` overrides reach the config (``pretrain``, ``check-config``, ``python -m mimscale.train`` under
  any launcher, ``sbatch slurm/pretrain*.sh``) they are loaded as the launch loads them (unknown keys, types,
  ranges, combinations). Scripts a command names must exist. A command this file does not know fails the
  test: teach it here, or make the block runnable.
- **console**: ``$ mimscale ...`` lines, each followed by what it prints. Each command runs in this process
  (``mimscale.cli.main``, no new interpreter), and every line shown must be a line of its output (a shown
  line ending in ``...`` matches the start of one). A shown ``mimscale: error:`` line means exit code 2,
  otherwise 0.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = sorted(
    [REPO / "README.md", REPO / "CONTRIBUTING.md", *(REPO / "docs" / "guide").glob("*.md")],
    key=lambda p: str(p),
)
FENCE = re.compile(r"^```(\S*)\s*(.*)$")
MARKER = re.compile(r"^<!--\s*runnable(\s+slow)?\s*-->$")
OPERATORS = {"|", "||", "&&", ";", "&"}
# commands a block may use that need no check (shell built-ins and plain tools; pip / pre-commit set-up)
PLAIN = {"ls", "cat", "head", "tail", "grep", "echo", "true", "cd", "source", "export", "test", "du", "wc"}
SET_UP = {".venv/bin/pip", "pip", ".venv/bin/pre-commit", "pre-commit"}


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    text: str
    runnable: bool
    slow: bool
    console: bool = False

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """The fenced bash blocks of ``path``, with their kind."""
    out: list[Block] = []
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        lang, info = m.group(1), m.group(2)
        j = i + 1
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        if lang == "console":
            out.append(Block(path, i + 1, "\n".join(lines[i + 1 : j]), False, False, console=True))
        if lang in ("bash", "sh", "shell"):
            prev = next((lines[k].strip() for k in range(i - 1, -1, -1) if lines[k].strip()), "")
            marker = MARKER.match(prev)
            runnable = bool(marker) or "runnable" in info.split()
            slow = bool(marker and marker.group(1)) or "slow" in info.split()
            out.append(Block(path, i + 1, "\n".join(lines[i + 1 : j]), runnable, slow))
        i = j + 1
    return out


ALL = [b for p in DOCS if p.exists() for b in blocks(p)]


def commands(text: str) -> list[list[str]]:
    """Shell commands of a block: continuation lines joined, comments dropped, split at | || && ; &."""
    joined = re.sub(r"\\\n\s*", " ", text)
    cmds: list[list[str]] = []
    for line in joined.splitlines():
        lex = shlex.shlex(line, posix=True, punctuation_chars="|&;")
        lex.whitespace_split = True
        lex.commenters = "#"
        cur: list[str] = []
        for tok in lex:
            if tok in OPERATORS:
                if cur:
                    cmds.append(cur)
                cur = []
            else:
                cur.append(tok)
        if cur:
            cmds.append(cur)
    return cmds


# ----------------------------------------------------------------------------- checks


def check_config(args: list[str]) -> None:
    """Load a recipe + overrides as `mimscale pretrain` / the launch does (ConfigError on anything wrong)."""
    from mimscale import config as C

    args = [a for a in args if not a.startswith("--")]
    recipe = args[0] if args and "=" not in args[0] else None
    C.load(recipe, args[1:] if recipe is not None else args)


def check_mimscale(args: list[str]) -> None:
    from mimscale import cli

    err = io.StringIO()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            ns = cli._parser().parse_args(args)
    except SystemExit as e:
        assert e.code == 0, f"mimscale {shlex.join(args)}: {err.getvalue().strip()}"
        return  # --help
    if ns.cmd in ("pretrain", "check-config"):
        check_config([a for a in ([ns.config] if ns.config else []) + ns.overrides])
    if ns.cmd == "eval":
        check_eval(ns)


def check_eval(ns) -> None:
    """``mimscale eval KIND SOURCE ... key=value``: options and knobs parsed and typed as the command does."""
    import argparse

    from mimscale import config as C
    from mimscale.eval import cli as ev

    again = argparse.ArgumentParser(add_help=False)
    ev._options(again, suppress=True)
    again.add_argument("overrides", nargs="*")
    rest = again.parse_intermixed_args(ns.rest)
    if ns.kind == "knn":
        ev._knobs(ev.KNNConfig, rest.overrides)
    elif ns.kind == "linear":
        from mimscale.eval.linear import LinearConfig

        ev._knobs(LinearConfig, rest.overrides)
    else:
        from mimscale.eval.finetune import RECIPE_DIR, FinetuneRecipe

        recipe = getattr(rest, "recipe", None) or ns.recipe or "finetune_vit_b16"
        path = RECIPE_DIR / f"{recipe}.yaml"
        C.from_dict(FinetuneRecipe, C.load_raw(str(path) if path.is_file() else recipe, rest.overrides))


def check_module(args: list[str]) -> None:
    """``-m MODULE ARGS`` / ``--module MODULE ARGS`` somewhere in a launcher's command line."""
    for i, a in enumerate(args):
        if a in ("-m", "--module") and i + 1 < len(args):
            module, rest = args[i + 1], args[i + 2 :]
            if module == "mimscale.train":
                return check_config(rest)
            if module == "mimscale.cli":
                return check_mimscale(rest)
            raise AssertionError(f"unknown module {module!r}")
    script = next((a for a in args if a.endswith(".py")), None)
    assert script and (REPO / script).is_file(), f"no module or existing script in {shlex.join(args)}"


def check_command(cmd: list[str]) -> None:
    while cmd and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", cmd[0]):  # FOO=bar cmd ...
        cmd = cmd[1:]
    if not cmd:
        return
    head, args = cmd[0], cmd[1:]
    name = Path(head).name
    if head in PLAIN or head in SET_UP:
        return
    if name == "mimscale":
        return check_mimscale(args)
    if name in ("python", "python3"):
        if args[:1] == ["-c"]:
            compile(args[1], "<doc>", "exec")
            return
        if args[:1] == ["-m"]:
            return check_module(args)
        assert args and (REPO / args[0]).is_file(), f"{shlex.join(cmd)}: no such script"
        return
    if name in ("torchrun", "deepspeed"):
        return check_module(args)
    if name == "accelerate":
        assert args[:1] == ["launch"], shlex.join(cmd)
        return check_module(args[1:])
    if name == "srun":
        return check_command(args)
    if name == "sbatch":
        script = next((a for a in args if a.endswith(".sh")), None)
        assert script and (REPO / script).is_file(), f"{shlex.join(cmd)}: no such script"
        rest = args[args.index(script) + 1 :]
        if Path(script).name.startswith("pretrain"):
            check_config(rest)
        return
    if name == "bash":
        assert args and (REPO / args[0]).is_file(), f"{shlex.join(cmd)}: no such script"
        return
    if head.endswith(".sh"):
        assert (REPO / head).is_file(), f"{head}: no such script"
        return
    raise AssertionError(f"tests/test_docs.py does not know how to check {shlex.join(cmd)!r}")


# ----------------------------------------------------------------------------- tests


def test_the_docs_have_runnable_and_checked_blocks():
    assert any(b.runnable for b in ALL) and any(b.console for b in ALL)
    assert any(not b.runnable and not b.console for b in ALL)
    for page in ("recipes", "evaluation", "checkpoints", "slurm", "benchmarks", "troubleshooting", "compare"):
        assert (REPO / "docs" / "guide" / f"{page}.md").is_file(), page


def sessions(text: str) -> list[tuple[list[str], list[str]]]:
    """``$ command`` lines of a console block with the output lines shown under each."""
    got: list[tuple[list[str], list[str]]] = []
    for line in text.splitlines():
        if line.startswith("$ "):
            got.append((shlex.split(line[2:], comments=True), []))
        elif line.strip():
            assert got, f"output before the first $ command: {line!r}"
            got[-1][1].append(line.strip())
    return got


def shown_in(shown: str, output: list[str]) -> bool:
    if shown.endswith("..."):
        return any(line.startswith(shown[:-3].rstrip()) for line in output)
    return shown in output


@pytest.mark.parametrize("block", [b for b in ALL if b.console], ids=lambda b: b.id)
def test_console_block(block):
    from mimscale import cli

    for argv, shown in sessions(block.text):
        assert argv[0] == "mimscale" and not OPERATORS & set(argv), f"{block.id}: only plain mimscale commands"
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main(argv[1:])
            except SystemExit as e:
                code = e.code
        lines = [line.strip() for line in (out.getvalue() + err.getvalue()).splitlines()]
        want = 2 if any(s.startswith("mimscale: error:") for s in shown) else 0
        assert code == want, f"{block.id}: {shlex.join(argv)} exited {code}, not {want}:\n" + "\n".join(lines[-20:])
        missing = [s for s in shown if not shown_in(s, lines)]
        assert not missing, f"{block.id}: {shlex.join(argv)} did not print {missing}; it printed:\n" + "\n".join(
            lines[-40:]
        )


@pytest.mark.parametrize("block", [b for b in ALL if not b.runnable and not b.console], ids=lambda b: b.id)
def test_checked_block(block):
    for cmd in commands(block.text):
        check_command(cmd)


@pytest.mark.slow
@pytest.mark.parametrize("block", [b for b in ALL if b.runnable], ids=lambda b: b.id)
def test_runnable_block(block, tmp_path):
    venv_bin = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    got = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", block.text],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert got.returncode == 0, f"{block.id} exited {got.returncode}:\n{(got.stdout + got.stderr)[-4000:]}"


LINK = re.compile(r"\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(line.lstrip("#")) for line in path.read_text().splitlines() if line.startswith("#")}


@pytest.mark.parametrize("page", [p for p in DOCS if p.exists()], ids=lambda p: str(p.relative_to(REPO)))
def test_links_point_at_files_and_headings_that_exist(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists() or (anchor and dest.suffix == ".md" and anchor not in anchors(dest)):
            broken.append(target)
    assert not broken, f"{page.relative_to(REPO)}: broken links {broken}"


# ----------------------------------------------------------------------------- the checker itself


def test_slug_is_githubs():
    assert slug(" The first league") == "the-first-league"
    assert (
        slug("`mimscale compare`: every objective at equal compute")
        == "mimscale-compare-every-objective-at-equal-compute"
    )


def test_commands_split_operators_comments_and_continuations():
    text = "mimscale pretrain a=1 | head -3  # note\nsbatch --nodes 8 slurm/pretrain.sh \\\n    'x={0..9}' && echo ok"
    assert commands(text) == [
        ["mimscale", "pretrain", "a=1"],
        ["head", "-3"],
        ["sbatch", "--nodes", "8", "slurm/pretrain.sh", "x={0..9}"],
        ["echo", "ok"],
    ]


def test_console_sessions_and_matching():
    got = sessions("$ mimscale pretrain a=1  # note\nline one\n\n$ mimscale objectives\nmae  Hide...")
    assert got == [(["mimscale", "pretrain", "a=1"], ["line one"]), (["mimscale", "objectives"], ["mae  Hide..."])]
    assert shown_in("mae  Hide...", ["mae  Hide mask_ratio of the patches"])
    assert not shown_in("line one", ["line one and more"])


@pytest.mark.parametrize(
    "line,words",
    [
        ("mimscale pretrain optim.bl=1e-3", "optim.bl"),
        ("mimscale export runs/a --outt x", "--outt"),
        ("mimscale eval linear runs/a --data d --test t epochz=3", "epochz"),
        ("mimscale eval finetune runs/a --data d --test t train.epochz=3", "epochz"),
        ("torchrun --nproc_per_node 8 -m mimscale.train tiny_cpu train.epochs=0", "train.epochs"),
        ("sbatch slurm/pretrain.sh tiny_cpu objective.mask_ratio=0", "objective.mask_ratio"),
        ("sbatch slurm/no_such.sh tiny_cpu", "no such script"),
        ("bash scripts/no_such.sh", "no such script"),
        ("rm -rf runs", "does not know"),
    ],
)
def test_a_wrong_command_fails_the_check(line, words):
    from mimscale.errors import MimscaleError

    with pytest.raises((AssertionError, MimscaleError)) as e:
        for cmd in commands(line):
            check_command(cmd)
    assert words in str(e.value)
