"""`mimscale check-config`: the check the SLURM templates run before starting any rank."""
from __future__ import annotations

import pytest

from launch_utils import tiny_overrides
from mimscale.cli import main
from mimscale.errors import ConfigError, DataError
from mimscale.preflight import check


def test_a_good_run_checks_out_for_its_world_size(fmnist_small, tmp_path):
    line = check("tiny_cpu", tiny_overrides(fmnist_small, tmp_path / "run"), world_size=2)
    assert line.startswith("config OK: mae vit_micro, world size 2, batch 16 = 8 x 2 x 1")
    assert str(tmp_path / "run") in line
    assert not (tmp_path / "run").exists()                       # a check writes nothing


def test_the_world_size_must_divide_the_batch(fmnist_small, tmp_path):
    with pytest.raises(ConfigError, match="not divisible by train.micro_batch_size x world size = 8 x 3"):
        check("tiny_cpu", tiny_overrides(fmnist_small, tmp_path), world_size=3)


def test_missing_shards_are_found_before_the_launch(fmnist_small, tmp_path):
    over = tiny_overrides(fmnist_small, tmp_path, data__train=str(tmp_path / "nope-{000000..000003}.tar"),
                          data__samples_per_epoch=1000)
    with pytest.raises(DataError, match=r"4 of 4 shards are missing, e\.g\. .*nope-000000\.tar"):
        check("tiny_cpu", over)


def test_a_key_given_twice_is_refused(fmnist_small, tmp_path):
    over = [*tiny_overrides(fmnist_small, tmp_path), "data.train=/d/a-000000.tar", "data.train=/d/a-000001.tar"]
    with pytest.raises(ConfigError, match="data.train is given 3 times .*quote it"):
        check("tiny_cpu", over)


def test_cli_prints_one_line_and_exits_2(capsys):
    assert main(["check-config", "tiny_cpu", "train.no_such_key=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["mimscale: error: unknown config key 'train.no_such_key'"]
    assert main(["check-config", "no_such_recipe"]) == 2
    assert "no recipe named 'no_such_recipe'" in capsys.readouterr().err
