"""`mimscale compare`: the plan (spec -> compare.json), budgets, and a real 2-objective comparison that is
killed mid-member and resumed (the complete member is kept, the interrupted one resumes from its checkpoint)."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mimscale.cli import main
from mimscale.compare import load_plan, plan_compare
from mimscale.compare.run import EPOCH_CAP, schedule
from mimscale.compare.spec import merge_plans, read_spec, teacher_steps
from mimscale.config import load
from mimscale.errors import ConfigError
from mimscale.objectives import available
from mimscale.report import mae_reference_flops

REPO = Path(__file__).resolve().parents[2]


def _spec(tmp_path: Path, **over) -> Path:
    doc = {
        "recipe": "tiny_cpu",
        "budget": {"minutes": 1},
        "knn_evals": 2,
        "linear": None,
        "members": {"mae": {}, "conmim": {"objective": {"proj_hidden": 32}}, "dtm": {}, "mapet": {}},
        **over,
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


# ----------------------------------------------------------------------------- the plan


def test_shipped_league_spec_plans_all_seven_with_their_teachers(tmp_path):
    plan = plan_compare(tmp_path / "c", "tiny_cpu", [])
    assert plan.names == ["mae", "emae", "mae_plus", "adpe", "conmim", "dtm", "mapet", "conmim_relpos"]
    relpos = plan.member("conmim_relpos")
    assert relpos.objective == "conmim" and relpos.overrides[1:] == ["model.pos_embed=relative"]
    assert plan.budget == {"kind": "minutes", "value": 10.0}
    teachers = {m.name: m.teachers for m in plan.members}
    assert teachers["dtm"] == ["clip"] and teachers["mapet"] == ["clip", "kclip"] and teachers["mae"] == []
    assert load_plan(tmp_path / "c") == plan  # compare.json round-trips
    mapet = plan.member("mapet")
    obj = json.loads(mapet.overrides[0].partition("=")[2])
    assert obj == {"name": "mapet", "vocab_size": 256}  # MAE's knobs from tiny_cpu do not leak into MaPeT
    mae = json.loads(plan.member("mae").overrides[0].partition("=")[2])
    assert mae["decoder_dim"] == 64  # ... but do reach MAE (the recipe's own objective section)


def test_the_mnist_spec_extends_the_league_spec():
    _, spec = read_spec("tiny_cpu_mnist")
    _, base = read_spec("tiny_cpu")
    assert spec["recipe"] == "tiny_cpu_mnist" and spec["members"] == base["members"]
    assert spec["budget"] == {"mae_epochs": 0.0102}


def test_every_registered_objective_for_a_plain_recipe(tmp_path):
    import shutil

    from mimscale.config import recipe_path

    recipe = tmp_path / "my_recipe.yaml"  # a recipe, not a compare spec: every registered objective
    shutil.copy(recipe_path("tiny_cpu"), recipe)
    plan = plan_compare(tmp_path / "c", str(recipe), [], minutes=2)
    assert sorted(plan.names) == sorted(available()) and plan.recipe == str(recipe)


def test_variants_and_member_sets(tmp_path):
    plan = plan_compare(
        tmp_path / "c",
        str(_spec(tmp_path)),
        ["train.batch_size=64", "train.micro_batch_size=64"],
        ["mae", "emae_k2=emae"],
        member_sets=["emae_k2:objective.num_parts=2"],
    )
    k2 = plan.member("emae_k2")
    assert k2.objective == "emae" and k2.overrides[-1] == "objective.num_parts=2"
    assert plan.overrides[0] == "train.batch_size=64"
    cfg = load("tiny_cpu", [*plan.overrides, *k2.overrides])
    assert cfg.objective["num_parts"] == 2 and cfg.train.batch_size == 64


def test_teacher_steps_follow_the_knobs():
    assert teacher_steps({"name": "dtm"}) == ["clip"]
    assert teacher_steps({"name": "dtm", "teacher": "/some/clip.pt"}) == []  # a given teacher is used as is
    assert teacher_steps({"name": "mapet", "target_source": "pixel_mean"}) == []
    assert teacher_steps({"name": "mae"}) == []


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"overrides": ["train.nope=1"]}, "unknown config key 'train.nope'"),
        ({"names": ["mae", "nosuch"]}, "unknown objective 'nosuch'"),
        ({"names": ["mae", "mae"]}, "distinct"),
        ({"member_sets": ["emae:objective.x=1"]}, "'emae' is not a member"),
        ({"member_sets": ["mae-objective.x=1"]}, "expected NAME:key=value"),
        ({"member_sets": ["mae:objective.no_knob=1"]}, "no_knob"),
        ({"minutes": 1, "mae_epochs": 1}, "not both"),
        ({"minutes": -1}, "must be a positive number"),
    ],
)
def test_bad_plans_fail_before_anything_runs(tmp_path, kw, match):
    kw.setdefault("names", ["mae", "conmim"])
    with pytest.raises(ConfigError, match=match):
        plan_compare(tmp_path / "c", str(_spec(tmp_path)), kw.pop("overrides", []), **kw)
    assert not (tmp_path / "c" / "members").exists()


def test_no_budget_and_unknown_spec_key_are_one_line(tmp_path, capsys):
    spec = _spec(tmp_path)
    doc = yaml.safe_load(spec.read_text())
    del doc["budget"]
    spec.write_text(yaml.safe_dump(doc))
    assert main(["compare", str(spec), "--out", str(tmp_path / "c"), "--dry-run"]) == 2
    assert "needs a budget" in capsys.readouterr().err
    spec.write_text(yaml.safe_dump({**doc, "budgets": 1}))
    assert main(["compare", str(spec), "--out", str(tmp_path / "c"), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown key(s) budgets" in err[0]


def test_calibrate_steps_from_the_spec(tmp_path):
    out = tmp_path / "c"
    assert plan_compare(tmp_path / "d", str(_spec(tmp_path)), [], ["mae"]).calibrate_steps == 60  # the default
    plan = plan_compare(out, str(_spec(tmp_path, calibrate_steps=5)), [], ["mae"])
    assert plan.calibrate_steps == 5 and load_plan(out).calibrate_steps == 5
    with pytest.raises(ConfigError, match="another calibrate_steps"):
        plan_compare(out, str(_spec(tmp_path, calibrate_steps=6)), [], ["mae"])
    doc = json.loads((out / "compare.json").read_text())
    del doc["calibrate_steps"]  # a plan stored before the knob existed: the old fixed 60
    (out / "compare.json").write_text(json.dumps(doc))
    assert load_plan(out).calibrate_steps == 60
    for bad in (0, -3, 2.5, True, "8"):
        with pytest.raises(ConfigError, match=f"calibrate_steps={bad!r} must be a positive integer"):
            plan_compare(tmp_path / "e", str(_spec(tmp_path, calibrate_steps=bad)), [], ["mae"])


def test_a_restart_may_add_members_but_not_change_them(tmp_path):
    spec, out = str(_spec(tmp_path)), tmp_path / "c"
    plan_compare(out, spec, [], ["mae"])
    grown = plan_compare(out, spec, [], ["conmim"])  # added
    assert grown.names == ["mae", "conmim"] and load_plan(out).names == ["mae", "conmim"]
    with pytest.raises(ConfigError, match="member 'mae' was planned with other settings"):
        plan_compare(out, spec, [], ["mae"], member_sets=["mae:objective.mask_ratio=0.5"])
    with pytest.raises(ConfigError, match="another budget"):
        plan_compare(out, spec, [], ["mae"], minutes=3)
    with pytest.raises(ConfigError, match="another overrides"):
        merge_plans(
            load_plan(out),
            plan_compare(tmp_path / "d", spec, ["train.batch_size=64", "train.micro_batch_size=64"], ["mae"]),
        )


def test_resume_with_only_out_and_bad_dirs(tmp_path, capsys):
    out = tmp_path / "c"
    assert main(["compare", "--out", str(out)]) == 2
    assert "is not a compare directory" in capsys.readouterr().err
    plan_compare(out, str(_spec(tmp_path)), [], ["mae"])
    assert main(["compare", "--out", str(out), "--member", "nosuch", "--dry-run"]) == 2
    assert "no member 'nosuch'" in capsys.readouterr().err
    (out / "compare.json").write_text("{not json")
    assert main(["compare", "--out", str(out), "--dry-run"]) == 2
    assert "not a comparison plan" in capsys.readouterr().err


def test_seeds_in_the_plan_and_a_restart_may_add_seeds(tmp_path, capsys):
    spec, out = str(_spec(tmp_path, seeds=2)), tmp_path / "c"
    assert plan_compare(out, spec, [], ["mae"]).seeds == 2  # from the spec
    assert plan_compare(out, spec, [], ["mae"], seeds=3).seeds == 3  # more seeds: the finished ones stay
    assert plan_compare(out, spec, [], ["mae"], seeds=1).seeds == 3 and load_plan(out).seeds == 3  # never fewer
    assert main(["compare", spec, "--out", str(tmp_path / "d"), "--seeds", "0", "--dry-run"]) == 2
    assert "seeds=0 must be a positive integer" in capsys.readouterr().err
    assert main(["compare", "--out", str(out), "--seeds", "4", "--dry-run"]) == 2
    assert "give its SPEC too" in capsys.readouterr().err


def test_dry_run_of_the_shipped_league_says_nothing_about_stand_in_teacher_paths(tmp_path, caplog):
    """The plan's key check points MaPeT at a stand-in k-CLIP data path; what config would note about that path
    ("kNN evaluation is off", ImageNet's mean/std) is not about the real run, so it is not logged."""
    caplog.set_level(logging.INFO)
    assert main(["compare", "tiny_cpu", "--out", str(tmp_path / "c"), "--dry-run"]) == 0
    config_notes = [r.getMessage() for r in caplog.records if r.name == "mimscale.config"]
    assert config_notes == [] and not logging.getLogger("mimscale.config").disabled


def test_dry_run_prints_the_estimate_and_stores_nothing(tmp_path, capsys):
    spec, out = str(_spec(tmp_path)), tmp_path / "c"
    args = ["compare", spec, "--out", str(out), "--objectives", "mae,conmim", "--budget-mae-epochs", "2"]
    assert main([*args, "--seeds", "2", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert not out.exists()  # nothing stored: not the plan, not the directory
    ref, images = mae_reference_flops("vit_micro", 32, 4, 3), 60000
    cfg = load("tiny_cpu", [])
    lines = {
        line.split()[2]: line.split()[3:] for line in text.splitlines() if line.split()[2:3] in (["mae"], ["conmim"])
    }
    mae_flops = load_plan_flops(spec, "mae")
    epochs = 2 * ref / mae_flops
    assert lines["mae"][0] == f"{math.ceil(epochs * images / cfg.train.batch_size):,}"  # steps
    assert lines["mae"][1] == f"{epochs:.3f}" and lines["mae"][2] == "?"  # minutes: not calibrated yet
    assert "2 seed(s) each" in text and "nothing was run or stored" in text
    # a real start with another budget is not refused (the dry run stored no plan) ...
    assert plan_compare(out, spec, [], ["mae", "conmim"], minutes=3).budget == {"kind": "minutes", "value": 3.0}
    # ... and once a calibration is cached, a minutes budget shows steps and epochs (conmim: scaled by FLOPs)
    cal = out / "members" / "mae" / "calibrate"
    cal.mkdir(parents=True)
    (cal / "summary.json").write_text(json.dumps({"img_per_s": 500.0, "flops_per_sample": mae_flops}))
    assert main(["compare", "--out", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    rows = {
        line.split()[2]: line.split()[3:] for line in text.splitlines() if line.split()[2:3] in (["mae"], ["conmim"])
    }
    assert rows["mae"][:3] == [
        f"{math.ceil(3 * 60 * 500 / cfg.train.batch_size):,}",
        f"{3 * 60 * 500 / images:.3f}",
        "3.0",
    ]
    assert " ".join(rows["mae"][3:]) == "- 500 img/s (mae)"
    assert " ".join(rows["conmim"][3:]).endswith("img/s (mae x FLOPs ratio)") and rows["conmim"][0] != "?"
    assert sorted(p.name for p in out.iterdir()) == ["compare.json", "members"]  # still only what was there


def load_plan_flops(spec: str, name: str) -> float:
    """FLOPs per image of a planned member's objective, built on the meta device (as the dry run does)."""
    from mimscale.compare.run import _flops_per_sample

    plan = plan_compare(Path("/nonexistent"), spec, [], [name], write=False)
    flops = _flops_per_sample(plan, plan.member(name), Path("/nonexistent"))
    assert flops
    return flops


def test_the_progressive_spec_plans_mae_against_mae_with_a_resolution_schedule(tmp_path, capsys):
    plan = plan_compare(tmp_path / "c", "progressive", [])
    assert plan.names == ["mae", "mae_progressive"] and plan.budget == {"kind": "minutes", "value": 10.0}
    prog = plan.member("mae_progressive")
    assert prog.objective == "mae" and prog.overrides[1:] == ["train.resolution_schedule=[[0.0, 16], [0.7, 32]]"]
    # FLOPs per image (what an MAE-epochs budget divides by): 16 px for 70 % of the steps, 32 px for the rest
    from mimscale.models import build_vit
    from mimscale.objectives.mae import MAE

    cfg = load("tiny_cpu", [])
    mae = MAE(build_vit("vit_micro", 32, 4, 3), MAE.Config(**{k: v for k, v in cfg.objective.items() if k != "name"}))
    want = 0.7 * mae.flops_per_sample_at(16) + 0.3 * mae.flops_per_sample_at(32)
    assert load_plan_flops("progressive", "mae_progressive") == pytest.approx(want)
    assert load_plan_flops("progressive", "mae") == pytest.approx(mae.flops_per_sample())
    assert main(["compare", "progressive", "--out", str(tmp_path / "d"), "--dry-run"]) == 0
    assert "mae_progressive" in capsys.readouterr().out and not (tmp_path / "d").exists()


# ----------------------------------------------------------------------------- budgets


def test_schedules_end_at_the_budget(tmp_path):
    cfg = load("tiny_cpu", [])
    minutes = plan_compare(tmp_path / "a", str(_spec(tmp_path)), [], ["mae"], minutes=10)
    s = schedule(minutes, {"img_per_s": 600.0}, 60000, cfg)
    assert s["epochs"] == pytest.approx(EPOCH_CAP * 10 * 60 * 600 / 60000)  # a cap: 6 epochs at 600 img/s, x EPOCH_CAP
    assert "train.max_minutes=10.0" in s["knobs"] and "eval.knn_every_minutes=3.3333" in s["knobs"]
    assert "train.schedule_by_time=true" in s["knobs"]  # the clock, not the calibration, ends the schedule
    flops = plan_compare(tmp_path / "b", str(_spec(tmp_path)), [], ["mae"], mae_epochs=2)
    ref = mae_reference_flops("vit_micro", 32, 4, 3)
    s = schedule(flops, {"flops_per_sample": ref / 4}, 60000, cfg)
    assert s["epochs"] == pytest.approx(8.0)  # a quarter of MAE's FLOPs per image: 4x the epochs
    assert not any(k.startswith("train.max_minutes") for k in s["knobs"])
    assert "eval.knn_every=1250" in s["knobs"]  # 3750 steps (8 epochs of 468.75), 2 evals in between


# ----------------------------------------------------------------------------- a real comparison


@pytest.mark.slow
def test_two_objectives_killed_mid_member_and_resumed(fmnist_small, tmp_path):
    """mae then emae on real Fashion-MNIST shards at an equal FLOP budget: kill -9 the whole comparison while
    emae trains (after a checkpoint), start it again with only --out: mae is not rerun, emae resumes from its
    checkpoint, both finish with kNN results and the league report ranks them."""
    small = [
        "model.img_size=16",
        f"data.train={fmnist_small['train']}",
        "data.num_workers=1",
        "data.shuffle_buffer=64",
        "train.batch_size=32",
        "train.micro_batch_size=32",
        "train.log_every=2",
        "train.save_every=4",
        "optim.warmup_epochs=0.01",
        f"eval.knn_train={fmnist_small['train']}",
        f"eval.knn_test={fmnist_small['test']}",
        "eval.knn_train_samples=512",
        "eval.knn_test_samples=256",
        "eval.num_workers=0",
    ]
    # 4 calibration steps (the default 60 would be ~3x mae's 20 training steps here; img/s is not what is tested)
    spec = _spec(tmp_path, overrides=small, budget={"mae_epochs": 0.002}, knn_evals=1, calibrate_steps=4)
    out = tmp_path / "league"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "mimscale.cli", "compare"]
    first = subprocess.Popen(
        [*cmd, str(spec), "--out", str(out), "--objectives", "mae,emae"],
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    latest = out / "members" / "emae" / "run" / "checkpoints" / "latest"
    deadline = time.time() + 400
    while not latest.exists():
        assert first.poll() is None and time.time() < deadline, first.communicate()[0][-3000:]
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)  # the comparison and all its children
    first.wait()
    mae_result = out / "members" / "mae" / "result.json"
    assert mae_result.is_file() and not (out / "members" / "emae" / "result.json").exists()
    cal = json.loads((out / "members" / "mae" / "calibrate" / "summary.json").read_text())
    assert cal["steps"] == 4 and cal["img_per_s"] > 0  # the spec's calibrate_steps
    stamp = mae_result.stat().st_mtime_ns

    again = subprocess.run([*cmd, "--out", str(out)], env=env, capture_output=True, text=True, timeout=600)
    log = again.stdout + again.stderr
    assert again.returncode == 0, log[-3000:]
    assert "2 members, 1 of 2 runs complete" in log and "emae: training" in log and " - resuming" in log
    assert mae_result.stat().st_mtime_ns == stamp
    member_log = (out / "members" / "emae" / "log.txt").read_text()
    assert "resumed from checkpoint" in member_log, member_log[-3000:]
    results = {m: json.loads((out / "members" / m / "result.json").read_text()) for m in ("mae", "emae")}
    for r in results.values():
        s = r["summary"]
        assert s["knn_top1_final"] is not None and s["steps"] > 0 and r["teacher_cost"]["device_hours"] == 0
    # equal FLOPs: EMAE's 4 parts cost ~4x MAE per image, so it gets ~1/4 of the epochs
    ratio = results["mae"]["epochs_planned"] / results["emae"]["epochs_planned"]
    flops = results["emae"]["summary"]["flops_per_sample"] / results["mae"]["summary"]["flops_per_sample"]
    assert ratio == pytest.approx(flops, rel=1e-3) and ratio > 2

    assert main(["report", str(out)]) == 0
    league = json.loads((out / "report.json").read_text())["league"]
    assert sorted(m["name"] for m in league["members"]) == ["emae", "mae"]
    assert sorted(league["rank_knn"]) == ["emae", "mae"]

    # a second seed of mae (train.seed + 1: other init, data order and masks): seed 0 is kept, seed 1 runs in
    # members/mae/seed1/ with the cached calibration; the league then has noise bands for mae only
    more = subprocess.run(
        [*cmd, str(spec), "--out", str(out), "--objectives", "mae", "--seeds", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert more.returncode == 0, (more.stdout + more.stderr)[-3000:]
    assert "1 members x 2 seeds, 1 of 2 runs complete" in more.stdout and "mae seed 1: training" in more.stdout
    assert mae_result.stat().st_mtime_ns == stamp and "calibrating" not in more.stdout
    seed1 = json.loads((out / "members" / "mae" / "seed1" / "result.json").read_text())
    assert (seed1["seed"], seed1["train_seed"]) == (1, results["mae"]["train_seed"] + 1)
    assert seed1["summary"]["final_loss"] != results["mae"]["summary"]["final_loss"]  # another run, not a copy
    assert main(["report", str(out)]) == 0
    league = json.loads((out / "report.json").read_text())["league"]
    m = {x["name"]: x for x in league["members"]}
    assert league["seeds"] == 2 and m["mae"]["status"] == "done" and m["emae"]["status"] == "unfinished"
    assert m["mae"]["knn_final_seeds"] == [
        results["mae"]["summary"]["knn_top1_final"],
        seed1["summary"]["knn_top1_final"],
    ]
    assert m["mae"]["knn_final_std"] is not None and league["rank_knn"][0] == "mae"
