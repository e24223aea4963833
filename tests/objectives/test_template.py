"""docs/objectives/template.py is a working objective: installed as a plugin (an entry point of a package on
the path, exactly as a user's package would be), it passes every contract check and trains through the
real launcher entry point."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import test_contract as contract
import test_device_strict as device_strict
import torch
from launch_utils import REPO, run, tiny_overrides

TEMPLATE = REPO / "docs" / "objectives" / "template.py"
ENTRY = "masked_pixels = mimscale_template_plugin:MaskedPixels"


def _install(dst: Path) -> Path:
    shutil.copy(TEMPLATE, dst / "mimscale_template_plugin.py")
    info = dst / "mimscale_template-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mimscale_template\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[mimscale.objectives]\n{ENTRY}\n")
    return dst


@pytest.fixture
def template(tmp_path, monkeypatch):
    monkeypatch.setattr(contract.objective_base, "_REGISTRY", dict(contract.objective_base._REGISTRY))
    monkeypatch.syspath_prepend(str(_install(tmp_path)))
    yield "masked_pixels"
    sys.modules.pop("mimscale_template_plugin", None)


@pytest.mark.parametrize(
    "check",
    [
        contract.test_registered_and_config_is_a_dataclass_with_defaults,
        contract.test_tiny_config_keeps_valid_types,
        contract.test_mask_spec_and_collate,
        contract.test_forward_backward_contract,
        contract.test_frozen_modules_have_no_trainable_params,
        contract.test_flops_per_sample_positive,
        contract.test_no_weight_decay_names_are_parameters,
        contract.test_after_optimizer_step_runs,
    ],
    ids=lambda f: f.__name__.removeprefix("test_"),
)
def test_template_passes_the_contract(template, check):
    check(template)


@pytest.mark.parametrize(
    "dtype,checkpointing", [(torch.float32, False), (torch.bfloat16, True)], ids=["fp32", "bf16-ckpt"]
)
def test_template_is_device_strict(template, dtype, checkpointing):
    """The template's step runs on the meta device (tests/objectives/test_device_strict.py): what users copy
    has no CPU tensor, host sync or blocking copy in its step."""
    device_strict.test_step_runs_on_the_meta_device((template, {}), dtype, checkpointing)


def test_template_is_listed_and_its_ranges_checked(template, capsys):
    from mimscale import cli
    from mimscale import config as C
    from mimscale.errors import ConfigError

    assert cli.main(["objectives"]) == 0
    assert "masked_pixels" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="objective.mask_ratio"):
        C.load("tiny_cpu", ["objective={name: masked_pixels, mask_ratio: 1.5}"])


@pytest.mark.slow
def test_template_trains_through_the_launcher(tmp_path, fmnist_small):
    (tmp_path / "site").mkdir()
    plugin = _install(tmp_path / "site")
    rd = tmp_path / "run"
    ov = [
        o
        for o in tiny_overrides(fmnist_small, rd, train__max_steps=6, train__precision="fp32")
        if not o.startswith("objective.")
    ]
    run(
        [sys.executable, "-m", "mimscale.train", *ov, "objective={name: masked_pixels, mask_ratio: 0.6}"],
        env={"PYTHONPATH": f"{plugin}:{REPO}"},
    )
    s = json.loads((rd / "summary.json").read_text())
    assert s["objective"] == "masked_pixels" and s["steps"] == 6 and s["flops_per_sample"] > 0
    assert (rd / "encoder.safetensors").is_file()
