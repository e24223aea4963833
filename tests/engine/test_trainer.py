"""The Trainer's parts (flags, cadences, non-finite policy, state) and real runs through it: one collective
and one host sync per optimizer step on 2 ranks, the non-finite policy (skip, stop, rollback), and the
minute triggers driven by a fake clock."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from launch_utils import BIN, free_port, run, tiny_overrides

from mimscale import checkpoint as ckpt
from mimscale.engine.cadence import Clock, EvalCadence, SaveCadence, TimeLimit
from mimscale.engine.flags import StepFlags
from mimscale.engine.nonfinite import NonFinitePolicy
from mimscale.engine.state import TrainState

WORKER = Path(__file__).with_name("trainer_worker.py")


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


# ----------------------------------------------------------------------------- parts


def test_flags_pack_metrics_and_flags_in_one_reduction():
    f = StepFlags(torch.device("cpu"))
    got = f.agree(
        torch.tensor(False),
        signal=True,
        save_due=False,
        metrics={"loss": torch.tensor(6.0), "acc": torch.tensor(3.0)},
        count=3,
    )
    assert got.signal and not (got.nonfinite or got.time_up or got.eval_due or got.save_due)
    assert got.metrics == {"acc": 1.0, "loss": 2.0}
    assert f.agree(~torch.isfinite(torch.tensor(float("nan")))).nonfinite
    assert f.collectives == 0  # one rank: nothing to reduce
    with pytest.raises(TypeError, match="unknown step flags"):
        f.agree(False, sigterm=True)


def test_save_cadence_steps_and_minutes_with_a_fake_clock():
    clock = FakeClock()
    s = SaveCadence(every_steps=5, every_minutes=2.0, now=clock)
    assert not s.due_local()
    clock.t += 119
    assert not s.due_local()
    clock.t += 1
    assert s.due_local() and s.due(3, agreed_time=True) and s.due(10, agreed_time=False) and not s.due(3, False)
    s.saved()
    assert not s.due_local()
    assert not SaveCadence(0, None, now=clock).due(10, False)


def test_eval_cadence_and_time_limit():
    e = EvalCadence(every_steps=4, every_minutes=1.5)
    first = e.first_due_s()
    assert first == 90 and not e.due_local(89.9, first) and e.due_local(90, first)
    assert e.advance(first) == 180 and e.due_by_steps(8) and not e.due_by_steps(6)
    assert EvalCadence(0, None).first_due_s() is None and not EvalCadence(0, None).due_local(1e9, None)
    assert TimeLimit(2).due_local(120.1) and not TimeLimit(2).due_local(119) and not TimeLimit(None).due_local(1e9)


def test_clock_excludes_paused_time_and_counts_device_hours():
    now = FakeClock()
    c = Clock(world_size=4, train_s=100.0, device_hours=1.0, now=now)
    now.t += 30
    with c.pause():
        now.t += 1000  # evaluation / saving
    now.t += 6
    assert c.train_s() == pytest.approx(136.0)
    assert c.device_hours() == pytest.approx(1.0 + 36 * 4 / 3600)


def test_nonfinite_policy_counts_streaks_and_decides():
    st = TrainState()
    p = NonFinitePolicy(patience=2, on_nonfinite="rollback", rollback_lr_scale=0.5, state=st)
    assert p.bad(can_roll_back=True) == "continue"
    p.good()
    assert p.bad(True) == "continue" and p.bad(True) == "rollback"
    p.rolled_back()
    assert st.lr_scale == 0.5 and st.nonfinite_in_row == 0 and st.nonfinite_total == 3
    assert p.bad(False) == "continue" and p.bad(False) == "stop"  # nothing to roll back to
    stop = NonFinitePolicy(1, "stop", 0.5, TrainState())
    assert stop.bad(True) == "stop"


def test_train_state_round_trip_ignores_unknown_and_keeps_defaults():
    st = TrainState(
        step=7,
        train_s=12.5,
        next_eval_s=60.0,
        nonfinite_total=2,
        nonfinite_in_row=2,
        lr_scale=0.25,
        wandb_id="abc",
        summary={"knn_top1_init": 50.0},
    )
    saved = st.state_dict()
    back = TrainState()
    back.load_state_dict({**saved, "from_the_future": 1})
    assert back.step == 7 and back.lr_scale == 0.25 and back.summary == {"knn_top1_init": 50.0}
    assert back.nonfinite_in_row == 0  # a resumed run starts a fresh streak
    old = TrainState()
    old.load_state_dict({"step": 3})
    assert old.step == 3 and old.lr_scale == 1.0


# ----------------------------------------------------------------------------- real runs


def _worker(rd: Path, data, *extra: str, ranks: int = 1, worker_args=(), check=True):
    ov = tiny_overrides(
        data, rd, train__precision="fp32", train__epochs=1, train__save_every=3, train__save_every_minutes="null"
    )
    launch = (
        [sys.executable]
        if ranks == 1
        else [str(BIN / "torchrun"), f"--nproc_per_node={ranks}", f"--master_port={free_port()}"]
    )
    p = run([*launch, str(WORKER), *worker_args, *ov, *extra], check=check)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("WORKER ")]
    return p, (json.loads(lines[-1][7:]) if lines else None)


@pytest.mark.slow
def test_one_collective_and_one_host_sync_per_step_on_two_ranks(fmnist_small, tmp_path):
    # 8 steps, a log every 3 (the metric means ride in the same reduction), a NaN on rank 0 at step 4:
    # the step is dropped on BOTH ranks (the flags are agreed before its backward) and redone with new data
    _, w = _worker(
        tmp_path / "r",
        fmnist_small,
        "train.max_steps=8",
        "train.log_every=3",
        "train.batch_size=16",
        "train.micro_batch_size=8",
        ranks=2,
        worker_args=["--count", "--inject", "4"],
    )
    assert w["summary"]["steps"] == 8 and w["summary"]["nonfinite_skipped"] == 1
    assert w["steps_run"] == 9  # 8 taken + 1 dropped
    assert w["flag_collectives"] == 9
    assert sum(w["collectives"].values()) == 9, w["collectives"]
    assert set(w["collectives"]) == {"mimscale.engine.flags.all_reduce"}
    assert sum(w["syncs"].values()) == 9, w["syncs"]  # the flags' one tolist() per step, nothing else
    assert w["summary"]["collectives_per_step"] == pytest.approx(1.0)


@pytest.mark.slow
def test_gradient_accumulation_drops_a_bad_micro_batch_exactly(fmnist_small, tmp_path):
    # batch 16 = 2 x 8 on one rank: two micro-batches per step; NaN in the first micro-batch of step 2
    _, w = _worker(
        tmp_path / "r",
        fmnist_small,
        "train.max_steps=4",
        "train.batch_size=16",
        "train.micro_batch_size=8",
        worker_args=["--inject", "2"],
    )
    assert w["summary"]["steps"] == 4 and w["summary"]["nonfinite_skipped"] == 1
    assert all(torch.isfinite(torch.tensor(v)) for v in [w["summary"]["final_loss"]])
    # exactly as if the run had never seen that micro-batch (the 5th: steps 0 and 1 used 4): same losses, same
    # weights bit for bit; a gradient of the dropped micro-batch leaking into the step would change both
    _, ref = _worker(
        tmp_path / "ref",
        fmnist_small,
        "train.max_steps=4",
        "train.batch_size=16",
        "train.micro_batch_size=8",
        worker_args=["--drop-batch", "4"],
    )
    assert ref["summary"]["nonfinite_skipped"] == 0
    losses = [[r["train/loss"] for r in _jsonl(d) if "train/loss" in r] for d in (tmp_path / "r", tmp_path / "ref")]
    assert len(losses[0]) == 4 and losses[0] == losses[1]
    from safetensors.torch import load_file

    got, want = (load_file(str(d / "encoder.safetensors")) for d in (tmp_path / "r", tmp_path / "ref"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


@pytest.mark.slow
def test_nonfinite_skip_stop_and_rollback(fmnist_small, tmp_path):
    # one NaN step: dropped on every rank, the run completes all steps and counts it
    _, w = _worker(
        tmp_path / "skip", fmnist_small, "train.max_steps=4", "train.micro_batch_size=16", worker_args=["--inject", "2"]
    )
    assert w["summary"]["steps"] == 4 and w["summary"]["nonfinite_skipped"] == 1
    # patience exceeded with on_nonfinite=stop: one line, exit 2, the checkpoint at step 3 intact
    rd = tmp_path / "stop"
    p, _ = _worker(
        rd,
        fmnist_small,
        "train.max_steps=6",
        "train.nonfinite_patience=3",
        "train.micro_batch_size=16",
        worker_args=["--inject", "4,4,4,4"],
        check=False,
    )
    assert p.returncode == 2
    err = [line for line in p.stderr.splitlines() if line.startswith("mimscale: error:")]
    assert len(err) == 1 and "non-finite" in err[0]
    assert ckpt.find(rd, {"objective": "mae"}).meta["step"] == 3
    # rollback: back to step 3 with half the lr, then the run completes; the lr after it is half the schedule's
    rd = tmp_path / "rollback"
    p, w = _worker(
        rd,
        fmnist_small,
        "train.max_steps=6",
        "train.nonfinite_patience=3",
        "train.on_nonfinite=rollback",
        "train.micro_batch_size=16",
        worker_args=["--inject", "5,5,5"],
    )
    assert "rolled back to checkpoint step=3" in p.stdout + p.stderr
    assert w["summary"]["steps"] == 6 and w["summary"]["nonfinite_skipped"] == 3
    ref = tmp_path / "ref"
    _worker(ref, fmnist_small, "train.max_steps=6", "train.micro_batch_size=16")
    lr = {r["step"]: r["train/lr"] for r in _jsonl(rd) if "train/lr" in r}
    lr_ref = {r["step"]: r["train/lr"] for r in _jsonl(ref) if "train/lr" in r}
    assert lr[6] == pytest.approx(0.5 * lr_ref[6]) and lr[3] == pytest.approx(lr_ref[3])


def _jsonl(rd: Path) -> list[dict]:
    from mimscale.telemetry.logger import read_jsonl

    return read_jsonl(rd / "metrics.jsonl", drop_rewound=True)


def test_minute_triggers_follow_a_fake_clock(fmnist_small, tmp_path, dist_single):
    """train.max_minutes, eval.knn_every_minutes and train.save_every_minutes, in-process on one rank, with a
    clock that advances one minute per micro-batch (evaluation and saving take no fake time)."""
    from mimscale import config as C
    from mimscale.pretrain import trainer as pretrain_trainer

    rd = tmp_path / "r"
    ov = tiny_overrides(
        fmnist_small,
        rd,
        train__precision="fp32",
        train__micro_batch_size=16,
        train__max_steps=50,
        train__max_minutes=5.5,
        train__save_every_minutes=2.5,
        train__save_every=0,
        eval__knn_every_minutes=2,
        eval__knn_train=fmnist_small["train"],
        eval__knn_test=fmnist_small["test"],
        eval__knn_train_samples=256,
        eval__knn_test_samples=256,
        eval__batch_size=128,
        eval__num_workers=0,
        log__tensorboard="false",
    )
    clock = FakeClock()
    trainer = pretrain_trainer(C.load(None, ov), now=clock, wall=clock)

    def tick(step: int, loss: torch.Tensor) -> torch.Tensor:
        clock.t += 60
        return loss

    trainer.loss_hooks.append(tick)
    s = trainer.fit()
    assert s["steps"] == 6  # 6 minutes > 5.5 at the 6th step
    assert s["train_seconds"] == pytest.approx(360)
    knn = sorted(k for k in s if k.startswith("knn_top1_"))
    assert knn == ["knn_top1_2.0min", "knn_top1_4.0min", "knn_top1_final", "knn_top1_init"]
    saved = sorted(p.name for p in (rd / ckpt.CKPT_DIR).iterdir() if p.name.startswith("step_"))
    assert saved == ["step_00000003", "step_00000006"]  # 3 minutes >= 2.5 since the start; then the end


def test_schedule_by_time_ends_at_the_budget_whatever_the_speed(fmnist_small, tmp_path, dist_single):
    """train.schedule_by_time: the step rate changes mid-run (30 s, then 90 s of fake time per step) and the
    configured epochs would last far longer; the lr schedule is re-planned from the measured progress and
    reaches its final value when the 10-minute budget is spent, where train.max_minutes stops the run."""
    from mimscale import config as C
    from mimscale.engine.schedule import warmup_cosine
    from mimscale.pretrain import trainer as pretrain_trainer

    rd = tmp_path / "r"
    ov = tiny_overrides(
        fmnist_small,
        rd,
        train__precision="fp32",
        train__micro_batch_size=16,
        train__batch_size=16,
        train__epochs=50,  # a cap far above what the budget allows
        train__max_steps="null",
        train__max_minutes=10,
        train__schedule_by_time="true",
        train__log_every=1,
        train__save_every_minutes="null",
        optim__warmup_epochs=0,
        optim__min_lr=1e-6,
        eval__knn_train="null",
        eval__knn_test="null",
        log__tensorboard="false",
    )
    clock = FakeClock()
    trainer = pretrain_trainer(C.load(None, ov), now=clock, wall=clock)
    dv, cap = trainer.derived, trainer.derived.total_steps

    def tick(step: int, loss: torch.Tensor) -> torch.Tensor:
        clock.t += 30 if step < 5 else 90
        return loss

    trainer.loss_hooks.append(tick)
    s = trainer.fit()
    assert cap > 1000 and s["steps"] == 11  # 5 x 30 s + 5 x 90 s = 600 s at step 10; the 11th crosses the budget
    lrs = {r["step"]: r["train/lr"] for r in _jsonl(rd) if "train/lr" in r}  # step k+1 logs the lr of step k
    train_s = [30 * min(k, 5) + 90 * max(k - 5, 0) for k in range(11)]  # training time when step k starts
    for k in range(1, 11):
        total = max(k, min(cap, round(k * 600 / train_s[k])))
        assert lrs[k + 1] == pytest.approx(warmup_cosine(k, total, 0, dv.lr, 1e-6)), k
    assert lrs[11] == pytest.approx(1e-6)  # step 10 starts at 600 s: the schedule is at its end
    assert lrs[2] > 0.99 * dv.lr and lrs[9] < 0.2 * dv.lr  # not the cap's schedule (that would still be at peak)
