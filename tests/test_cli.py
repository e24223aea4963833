"""``mimscale`` command line: user errors are one stderr line and exit code 2; --print-config; --help."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from mimscale import cli
from mimscale import config as C


def _run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("mimscale: error: ")
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize(
    "argv,words",
    [
        (["pretrain", "tiny_cpu", "optim.bl=1e-3"], ["unknown config key 'optim.bl'", "did you mean 'optim.blr'"]),
        (["pretrain", "tiny_cpu", "trian.epochs=1"], ["unknown config key 'trian'", "did you mean 'train'"]),
        (["pretrain", "tiny_cpu", "objective.mask_ratoi=0.5"], ["objective.mask_ratoi", "objective.mask_ratio"]),
        (["pretrain", "tiny_cpu", "objective.name=maee"], ["unknown objective.name 'maee'", "did you mean 'mae'"]),
        (["pretrain", "mae_vit_b61"], ["no recipe named 'mae_vit_b61'", "did you mean 'mae_vit_b16'"]),
        (["pretrain", "/nonexistent/recipe.yaml"], ["config file not found"]),
        (["pretrain", "mae_vit_b16"], ["data.train must be set"]),
        (["pretrain", "tiny_cpu", "train.batch_size=lots"], ["train.batch_size", "integer"]),
        (["pretrain", "tiny_cpu", "train.epochs"], ["key=value"]),
        (["pretrain", "tiny_cpu", "model.img_size=30"], ["model.img_size=30", "model.patch_size=4"]),
    ],
)
def test_user_errors_exit_2_with_one_line(capsys, argv, words):
    code, out, err = _run(capsys, *argv)
    assert code == 2
    assert out == ""
    line = _one_error_line(err)
    for w in words:
        assert w in line, f"{w!r} not in {line!r}"


def test_print_config_prints_yaml(capsys):
    code, out, err = _run(capsys, "pretrain", "tiny_cpu", "train.epochs=2", "optim.betas=[0.9,0.999]", "--print-config")
    assert code == 0 and err == ""
    doc = yaml.safe_load(out)
    assert doc == C.to_dict(C.load("tiny_cpu", ["train.epochs=2", "optim.betas=[0.9,0.999]"]))
    assert doc["train"]["epochs"] == 2.0
    assert doc["optim"]["betas"] == [0.9, 0.999]
    assert doc["objective"]["name"] == "mae"


def test_print_config_default_recipe(capsys):
    code, out, _ = _run(capsys, "pretrain", "--print-config")
    assert code == 0
    assert yaml.safe_load(out) == C.to_dict(C.load(None))


def test_print_config_with_required_override(capsys):
    code, out, _ = _run(capsys, "pretrain", "mae_vit_l16", "data.train=/d/train-{0..9}.tar", "--print-config")
    assert code == 0
    doc = yaml.safe_load(out)
    assert doc["model"]["arch"] == "vit_large" and doc["data"]["train"] == "/d/train-{0..9}.tar"


def test_deepspeed_local_rank_argument_is_ignored(capsys):
    code, out, _ = _run(capsys, "--local_rank=0", "pretrain", "tiny_cpu", "--print-config")
    assert code == 0 and yaml.safe_load(out)["model"]["arch"] == "vit_micro"


def test_objectives_lists_mae(capsys):
    code, out, err = _run(capsys, "objectives")
    assert code == 0 and err == ""
    names = [line.split()[0] for line in out.splitlines()]
    assert "mae" in names
    assert "mimscale.objectives.mae.MAE" in out
    assert "``" not in out and ":class:" not in out  # plain text, not the docstrings' reST
    assert "Hide mask_ratio of the patches" in out  # MAE's docstring says ``mask_ratio``


def test_plain_strips_rest_markup():
    assert cli.plain("Hide ``mask_ratio`` of :class:`~mimscale.objectives.base.Objective`") == (
        "Hide mask_ratio of Objective"
    )
    assert cli.plain("see :func:`mimscale.masking.num_visible` and :ref:`the guide <guide>`") == (
        "see mimscale.masking.num_visible and the guide"
    )
    assert cli.plain("2 * 3 `x`") == "2 * 3 `x`"


def test_the_parser_imports_no_torch_numpy_or_deepspeed():
    """`mimscale --help` and usage errors must not wait for torch (~2 s): every subcommand imports its code
    when it runs. A fresh interpreter builds the whole parser (all subcommands) and prints its help."""
    code = (
        "import sys, contextlib, io\n"
        "import mimscale.cli as c\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    c.main(['data', 'add-targets', '--help'])\n"
        "print(sorted(m for m in ('torch', 'numpy', 'deepspeed', 'timm', 'PIL') if m in sys.modules))"
    )
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert got.stdout.strip() == "[]", got.stdout + got.stderr


def test_add_targets_kinds_are_the_target_fields():
    from mimscale.data.targets import FIELD_NAMES

    with pytest.raises(SystemExit):
        cli.main(["data", "add-targets", "s", "--teacher", "t.pt", "--out", "o", "--kind", "nope"])
    parser = cli._parser()
    data = next(a for a in parser._subparsers._group_actions[0].choices["data"]._actions if a.dest == "data_cmd")
    kind = next(a for a in data.choices["add-targets"]._actions if a.dest == "kind")
    assert tuple(kind.choices) == tuple(sorted(FIELD_NAMES))


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["pretrain", "--help"],
        ["objectives", "--help"],
        ["data", "--help"],
        ["data", "fashion-mnist", "--help"],
        ["data", "mnist", "--help"],
        ["data", "folder", "--help"],
    ],
)
def test_help_exits_0(capsys, argv):
    with pytest.raises(SystemExit) as ei:
        cli.main(argv)
    assert ei.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: mimscale")


def test_pretrain_help_shows_an_example(capsys):
    with pytest.raises(SystemExit):
        cli.main(["pretrain", "--help"])
    out = capsys.readouterr().out
    assert "data.train=" in out and "--print-config" in out


@pytest.mark.parametrize("argv", [[], ["nope"], ["data"]])
def test_bad_usage_exits_2(capsys, argv):
    with pytest.raises(SystemExit) as ei:
        cli.main(argv)
    assert ei.value.code == 2
    assert "usage: mimscale" in capsys.readouterr().err
