"""The Trainer's parts (flags, cadences, non-finite policy, state) and real runs through it: one collective
and one host sync per optimizer step on 2 ranks, the non-finite policy (skip, stop, rollback), and the
minute triggers driven by a fake clock."""

from __future__ import annotations

import json
import sys
import warnings
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
    # skip: one NaN step (below train.nonfinite_patience) is dropped and the run still completes all its steps -
    # proven by the two tests above (2 ranks; 1 rank with accumulation) and by the rollback run below (3 drops)
    # patience exceeded with on_nonfinite=stop: one line, exit 2, the checkpoint at step 6 intact; its 6 clean
    # steps are the lr schedule's reference for the rollback below (the schedule spans train.epochs=1, not the cut)
    rd = tmp_path / "stop"
    p, _ = _worker(
        rd,
        fmnist_small,
        "train.max_steps=8",
        "train.nonfinite_patience=3",
        "train.micro_batch_size=16",
        worker_args=["--inject", "7,7,7,7"],
        check=False,
    )
    assert p.returncode == 2
    err = [line for line in p.stderr.splitlines() if line.startswith("mimscale: error:")]
    assert len(err) == 1 and "non-finite" in err[0]
    assert ckpt.find(rd, {"objective": "mae"}).meta["step"] == 6
    lr_ref = {r["step"]: r["train/lr"] for r in _jsonl(rd) if "train/lr" in r}
    assert {3, 6} <= lr_ref.keys()  # logged at clean steps, before the non-finite streak at step 7
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
    lr = {r["step"]: r["train/lr"] for r in _jsonl(rd) if "train/lr" in r}
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


# ----------------------------------------------------------------------------- what a step costs, every objective

STEP_COSTS = Path(__file__).with_name("step_costs_worker.py")
COST_STAGES = (1, 3)


@pytest.fixture(scope="module")
def step_costs(fmnist_small, tmp_path_factory) -> dict:
    """ONE 2-rank launch: every objective x ZeRO-1 and ZeRO-3 through the real Trainer, 3 steps of 2 micro-batches
    each, counted by ``step_costs_worker.py`` (collectives, host syncs, synchronize calls)."""
    from mimscale.objectives import available

    root = tmp_path_factory.mktemp("costs")
    kv = {
        "model.arch": "vit_micro",
        "model.img_size": 16,
        "model.patch_size": 4,
        "data.train": str(fmnist_small["train"]),
        "data.num_workers": 0,
        "data.shuffle_buffer": 64,
        "train.precision": "fp32",
        "train.batch_size": 32,
        "train.micro_batch_size": 8,  # 2 ranks x 8 x 2 micro-batches: gradient accumulation is on
        "train.max_steps": 3,
        "train.log_every": 2,
        "train.save_every": 0,
        "optim.warmup_epochs": 0.01,
        "eval.knn_train": "null",
        "eval.knn_test": "null",
        "log.wandb": "disabled",
    }
    out = root / "costs.json"
    launch = [str(BIN / "torchrun"), "--nproc_per_node=2", f"--master_port={free_port()}"]
    stages = ",".join(map(str, COST_STAGES))
    cmd = [*launch, str(STEP_COSTS), str(out), stages, str(root), *[f"{k}={v}" for k, v in kv.items()]]
    p = run(cmd, timeout=120 + 40 * len(available()), check=False)
    if p.returncode != 0 and "terminate called without an active exception" in p.stderr:
        # KNOWN FLAKE (seen once in a full CI-style run, never in 3 runs alone): a rank aborted in C++ between two
        # objectives' Trainers, after the first one finished. Not a budget finding; relaunched once, and a second
        # abort fails the test. Tracked in the closing note of session 5.
        warnings.warn(f"step-costs launch aborted (C++ terminate); relaunching once:\n{p.stderr[-1500:]}", stacklevel=2)
        p = run(
            [*launch[:-1], f"--master_port={free_port()}", *cmd[len(launch) :]], timeout=120 + 40 * len(available())
        )
    elif p.returncode != 0:
        raise AssertionError(
            f"{cmd} exited {p.returncode}\n--- stdout\n{p.stdout[-4000:]}\n--- stderr\n{p.stderr[-6000:]}"
        )
    return json.loads(out.read_text())


def step_cost_problems(rec: dict, stage: int) -> list[str]:
    """Everything in one objective's counts that breaks the step's budget (empty: within it).

    Budget per optimizer step, for mimscale's own code: the flags' one all_reduce and one ``tolist`` per
    micro-batch (one per step plus the documented one per accumulated micro-batch), at ZeRO-3 the EMA teacher's
    forward gathers (a fixed number per forward); nothing else: no ``nonzero``, boolean-mask indexing,
    ``.item()``, host copy. Nobody (DeepSpeed included) calls ``synchronize()``. A hook call (EMA update) issues
    at most 2 collectives, however many parameters the teacher has (the first step's calls: 4, and the EMA
    teacher's one-time layout read, at ZeRO 1-2)."""
    if "error" in rec:
        return [rec["error"]]
    gas, bad = rec["grad_accum"], []
    allowed = {
        "collective:all_reduce": ("mimscale.engine.flags", gas),
        "host_copy:tolist": ("mimscale.engine.flags", gas),
    }
    for i, counts in enumerate(rec["steps"]):
        for key, n in counts.items():
            _, own, event = key.split("|")
            if event.startswith("synchronize"):
                bad.append(f"step {i}: {n} x {event} from {own}")
            elif not own.startswith("mimscale."):
                continue  # DeepSpeed's own gradient collectives and bookkeeping are the training's
            else:
                budgeted = event in allowed and allowed[event] == (own, n)
                teacher_gather = stage == 3 and own == "mimscale.teachers.ema" and event == "collective:all_gather"
                if not (budgeted or teacher_gather):
                    bad.append(f"step {i}: {n} x {event} from {own}")
    gathers = {c.get("step|mimscale.teachers.ema|collective:all_gather", 0) for c in rec["steps"][1:]}
    if len(gathers) > 1:  # (step 0 runs before the first update partitions a ZeRO-3 teacher)
        bad.append(f"the EMA teacher's forward gathers vary from step to step: {sorted(gathers)}")
    for i, counts in enumerate(rec["hooks"]):
        setup = i < 2  # the first step's before_step / after_optimizer_step: one-time layout exchanges
        coll = sum(n for k, n in counts.items() if k.split("|")[2].startswith("collective:"))
        if coll > (4 if setup else 2):
            bad.append(f"hook call {i}: {coll} collectives ({rec['trainable_params']} trainable params)")
        for key, n in counts.items():
            _, own, event = key.split("|")
            once = setup and own == "mimscale.teachers.ema" and event == "host_copy:tolist"
            if event.startswith("synchronize") or (
                own.startswith("mimscale.") and not event.startswith("collective") and not once
            ):
                bad.append(f"hook call {i}: {n} x {event} from {own}")
    return sorted(set(bad))


def _objective_names() -> list[str]:
    from mimscale.objectives import available

    return sorted(available())


@pytest.mark.slow
@pytest.mark.parametrize("stage", COST_STAGES)
@pytest.mark.parametrize("name", _objective_names())
def test_step_syncs_and_collectives_within_budget_every_objective(step_costs, name, stage):
    rec = step_costs[str(stage)][name]
    assert "error" in rec or len(rec["steps"]) >= 3
    assert step_cost_problems(rec, stage) == []


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
    page = (rd / "report.html").read_text()  # the loop's own report, static now that the run has finished
    assert "http-equiv" not in page and "<title>mimscale report — 1 run</title>" in page


@pytest.mark.slow
@pytest.mark.parametrize("stage", COST_STAGES)
def test_ranks_start_identical_and_draw_their_own_drop_path(step_costs, stage):
    """Every rank builds the same initial weights (one seed), then draws its own stream: the drop-path keep
    masks two ranks draw on the device right after the Trainer is built differ (2 ranks, every objective)."""
    for name, rec in step_costs[str(stage)].items():
        assert "error" not in rec, rec["error"]
        r0, r1 = rec["ranks"]
        if stage != 3:  # (ZeRO-3 partitions the weights: each rank holds a different slice)
            assert r0["init"] == r1["init"], name
        assert r0["drop_path_keep"] != r1["drop_path_keep"], name


def _costs_worker():
    import importlib.util

    spec = importlib.util.spec_from_file_location("step_costs_worker", STEP_COSTS)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_step_cost_counter_sees_device_syncs_and_spares_host_data():
    """The counter itself (in-process): nonzero, boolean-mask indexing, .item() and tolist on what would be device
    tensors are counted; reads of CPU-generator draws are not; nothing is counted outside a watched window."""
    w = _costs_worker()
    counts = w.Counts()
    log: list[dict] = []
    x = torch.randn(8)

    def step():
        x.nonzero()
        x[x > 0]
        float(x.sum())
        x.tolist()
        int(torch.randint(0, 5, (), generator=torch.Generator().manual_seed(0)))  # host data: not a sync

    real_tolist = torch.Tensor.tolist
    try:
        counts.wrap(torch.Tensor, "tolist", "host_copy:tolist")
        counts.watch("step", step, log)()
        step()  # outside the window: not counted
    finally:
        torch.Tensor.tolist = real_tolist
    got = {k.split("|", 2)[2]: n for k, n in log[0].items()}
    assert got == {"nonzero": 1, "bool_mask_index": 1, "_local_scalar_dense": 1, "host_copy:tolist": 1}, got
    assert len(log) == 1


def test_step_cost_budget_flags_what_it_must():
    clean = {
        "grad_accum": 2,
        "trainable_params": 60,
        "steps": [
            {"step|mimscale.engine.flags|collective:all_reduce": 2, "step|mimscale.engine.flags|host_copy:tolist": 2}
        ],
        "hooks": [{}, {"hooks|mimscale.teachers.ema|collective:all_gather": 2}],
    }
    assert step_cost_problems(clean, 1) == []
    planted = [
        ("steps", "step|deepspeed.runtime.engine|synchronize:deepspeed_accelerator"),
        ("steps", "step|mimscale.objectives.conmim|nonzero"),
        ("steps", "step|mimscale.engine.flags|collective:all_reduce"),  # a third flags reduction
        ("hooks", "hooks|mimscale.engine.deepspeed|collective:all_reduce"),
    ]
    for where, key in planted:
        rec = json.loads(json.dumps(clean))
        target = rec[where][-1]
        target[key] = target.get(key, 0) + (60 if where == "hooks" else 1)
        assert step_cost_problems(rec, 1), key
    flags = clean["steps"][0]
    ema = "step|mimscale.teachers.ema|collective:all_gather"
    steady = {**clean, "steps": [flags, {**flags, ema: 22}, {**flags, ema: 22}]}
    assert step_cost_problems(steady, 3) == []
    assert step_cost_problems({**steady, "steps": [flags, {**flags, ema: 22}, {**flags, ema: 23}]}, 3)
    assert step_cost_problems(steady, 1)  # teacher gathers in the step only at ZeRO-3


def test_a_step_that_raises_restores_the_signal_handlers_and_closes_the_loader(fmnist_small, tmp_path, dist_single):
    """An exception out of a step must not leave the run's save-on-signal handlers installed (SIGTERM would then
    be swallowed and a crashed process could not be stopped) nor its loader epoch open (workers alive)."""
    import signal

    from mimscale import config as C
    from mimscale.data import loader as L
    from mimscale.pretrain import trainer as pretrain_trainer

    ov = tiny_overrides(
        fmnist_small,
        tmp_path / "r",
        train__precision="fp32",
        train__micro_batch_size=16,
        data__num_workers=1,
        eval__knn_train="null",
        eval__knn_test="null",
        log__tensorboard="false",
    )
    trainer = pretrain_trainer(C.load(None, ov))

    def boom(step: int, loss: torch.Tensor) -> torch.Tensor:
        if step == 2:
            raise RuntimeError("planted failure in step 2")
        return loss

    trainer.loss_hooks.append(boom)
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    with pytest.raises(RuntimeError, match="planted failure"):
        trainer.fit()
    assert {s: signal.getsignal(s) for s in before} == before
    assert len(L._LIVE_EPOCHS) == 0 or all(g.gi_frame is None for g in L._LIVE_EPOCHS)


def _signalled_then_resumed(fmnist_small, run_dir, signal_at: int, **over) -> tuple[dict, dict]:
    """An in-process kNN-evaluating run sent SIGUSR1 during step ``signal_at`` (0-based), then the same config
    resumed: the two summaries."""
    import os
    import signal

    from mimscale import config as C
    from mimscale.pretrain import trainer as pretrain_trainer

    ov = tiny_overrides(
        fmnist_small,
        run_dir,
        train__precision="fp32",
        train__micro_batch_size=16,
        eval__knn_train=fmnist_small["train"],
        eval__knn_test=fmnist_small["test"],
        eval__knn_train_samples=256,
        eval__knn_test_samples=128,
        eval__knn_at_start="false",
        eval__num_workers=0,
        log__tensorboard="false",
        **over,
    )
    first = pretrain_trainer(C.load(None, ov))

    def signal_during(step: int, loss: torch.Tensor) -> torch.Tensor:
        if step == signal_at:
            os.kill(os.getpid(), signal.SIGUSR1)
        return loss

    first.loss_hooks.append(signal_during)
    return first.fit(), pretrain_trainer(C.load(None, ov)).fit()


def test_a_run_signalled_at_its_last_step_is_evaluated_when_resumed(fmnist_small, tmp_path, dist_single):
    """SIGUSR1 during the last step: save and exit 42 before the final evaluation; the resumed run has no step
    left to train but must still run the final evaluation (it used to skip it: no final kNN in the summary)."""
    s1, s2 = _signalled_then_resumed(fmnist_small, tmp_path / "r", 2, train__stop_after_steps=3)
    assert s1["exit_code"] == ckpt.EXIT_REQUEUE and s1["steps"] == 3 and "knn_top1_final" not in s1
    assert s2["steps"] == 3 and "knn_top1_final" in s2


def test_a_run_signalled_at_an_evaluation_step_runs_that_evaluation_when_resumed(fmnist_small, tmp_path, dist_single):
    """SIGUSR1 during step 2 of a run evaluating every 2 steps: the run saves and exits 42 before step 2's
    evaluation; the resumed run starts at step 3, so it must run step 2's evaluation first (it used to be lost:
    no ``knn_top1_step2`` in the summary, a hole in the curve of every preempted run)."""
    s1, s2 = _signalled_then_resumed(fmnist_small, tmp_path / "r", 1, train__stop_after_steps=4, eval__knn_every=2)
    assert s1["exit_code"] == ckpt.EXIT_REQUEUE and s1["steps"] == 2 and "knn_top1_step2" not in s1
    assert s2["steps"] == 4 and "knn_top1_step2" in s2 and "knn_top1_final" in s2
