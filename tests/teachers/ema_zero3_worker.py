"""Run under ``torchrun --nproc_per_node 2``: ConMIM's EMA teacher at ZeRO-3 against an independent reference.

Usage: ``torchrun ... ema_zero3_worker.py OUT_DIR DS_KNOBS_JSON STEPS``. Each rank writes ``OUT_DIR/rank{r}.json``.

The engine is built exactly as ``mimscale.train`` builds it (``engine.deepspeed.initialize``), in fp32 at
ZeRO stage 3 with every parameter partitioned. After each optimizer step:

* the student's CONSOLIDATED weights are gathered through ZeRO-3's module all-gather
  (``GatheredParameters``), a path independent of the ``ctx.master_params`` the teacher update uses;
* the objective's ``after_optimizer_step`` runs the EMA update (collective);
* a reference ``ref = m * ref + (1 - m) * consolidated`` is advanced with the same momentum, and so is a
  "stale" control that uses the previous step's consolidated weights (what a late or cached read would give).

Recorded per step: the largest |teacher - ref| and |teacher - stale| over all teacher parameters, how far the
student moved, a checksum of the teacher (compared across ranks), and partitioning facts: the teacher elements
this rank holds between steps (its ZeRO-3 partition) against the full teacher, and how many elements are
all-gathered per training step (``EMATeacher.gathered_elements``: the teacher forward's gathers).

Then the same steps (same seeds, same batches) run again in the same processes through a ZeRO-0 engine, and
its per-step losses are recorded next to ZeRO-3's (``losses_zero0``), so the test can compare them.

After each run the trained student encoder is scored by the sharded kNN evaluator (as the train loop does:
``KNNEvaluator(engine.module.encoder)``, collective, on each rank's own synthetic labelled images):
``knn`` / ``knn_zero0``. Under ZeRO-3 the encoder's own root parameters are partitioned: the evaluator must
call it as a module so that DeepSpeed gathers them.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch


def main(out_dir: str, knobs: str, steps: int) -> None:
    record = run_zero3(out_dir, knobs, steps)
    record["losses_zero0"], record["knn_zero0"] = run_zero0(out_dir, steps)
    Path(out_dir, f"rank{record['rank']}.json").write_text(json.dumps(record))


def knn(engine, rank: int) -> dict:
    """Sharded kNN top-1 of the engine's student encoder on this rank's synthetic labelled images."""
    from mimscale.eval.knn import KNNEvaluator

    base = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(5))

    def loader(seed: int, batches: int) -> list[dict]:
        g = torch.Generator().manual_seed(seed + rank)
        out = []
        for _ in range(batches):
            y = torch.randint(4, (8,), generator=g)
            out.append(
                {
                    "image": base[y] + 0.8 * torch.randn(8, 3, 16, 16, generator=g),
                    "label": y,
                    "valid": torch.ones(8, dtype=torch.bool),
                }
            )
        return out

    ev = KNNEvaluator(loader(100, 3), loader(200, 2), num_classes=4, k=5)
    return ev(engine.module.encoder, torch.device("cpu"))


def build(out_dir: str, stage: int, knobs: str | None, steps: int):
    from mimscale import config as C
    from mimscale import dist
    from mimscale.engine import deepspeed as ds
    from mimscale.models.vit import build_vit
    from mimscale.objectives import build_objective

    d = dist.detect()
    dist.export(d)
    torch.set_num_threads(1)
    cfg = C.load(
        "tiny_cpu",
        [
            "model.arch=vit_micro",
            "model.img_size=16",
            "model.patch_size=4",
            "train.precision=fp32",
            f"train.zero_stage={stage}",
            *([f"train.ds_config={knobs}"] if knobs else []),
            "train.batch_size=8",
            "train.micro_batch_size=4",
            f"train.run_dir={out_dir}/run{stage}",
            "optim.lr=3e-3",
            "optim.warmup_epochs=0",
            "log.wandb=disabled",
            "objective={name: conmim, proj_hidden: 48, proj_out: 32, ema_m0: 0.6}",
        ],
    )
    derived = C.derive(cfg, d.world_size, samples_per_epoch=8 * steps)
    torch.manual_seed(cfg.train.seed)
    m = cfg.model
    encoder = build_vit(m.arch, m.img_size, m.patch_size, m.in_chans)
    obj = build_objective("conmim", encoder, C.objective_knobs(cfg))
    ds.skip_shm_comm_build()  # plain gloo collectives: no JIT build (nor its lock) in this test
    engine = ds.initialize(obj, cfg, derived, dist.accelerator_name())
    ds.set_hparams(engine, derived.lr, cfg.optim.weight_decay)
    return d, derived, obj, engine


def step_ctx(d, derived, engine, step: int, steps: int):
    from mimscale.engine import deepspeed as ds
    from mimscale.objectives import StepContext

    return StepContext(
        step=step,
        total_steps=steps,
        epoch=step / steps,
        lr=derived.lr,
        rank=d.rank,
        world_size=d.world_size,
        grad_accum=derived.grad_accum,
        master_params=partial(ds.master_params, engine),
        master_shards=partial(ds.master_shards, engine),
        all_reduce_mean=ds.all_reduce_mean,
    )


def batches(obj, rank: int):
    g = torch.Generator().manual_seed(1234 + rank)
    spec = obj.mask_spec()
    while True:
        img = torch.randn(4, 3, 16, 16, generator=g)
        yield {"image": img, "image_teacher": img + 0.3 * torch.randn(img.shape, generator=g), **spec.generate(4, g)}


def run_zero0(out_dir: str, steps: int) -> list[float]:
    d, derived, obj, engine = build(out_dir, 0, None, steps)
    data = batches(obj, d.rank)
    losses = []
    engine.train()
    for step in range(steps):
        ctx = step_ctx(d, derived, engine, step, steps)
        engine.module.before_step(ctx)
        for _ in range(derived.grad_accum):
            out = engine(next(data))
            engine.backward(out.loss)
            engine.step()
        engine.module.after_optimizer_step(replace(ctx, step=step + 1))
        losses.append(float(out.loss))
    return losses, knn(engine, d.rank)


def run_zero3(out_dir: str, knobs: str, steps: int) -> dict:
    import deepspeed

    d, derived, obj, engine = build(out_dir, 3, knobs, steps)
    students = {"teacher_encoder": obj.encoder, "teacher_projector": obj.projector}
    teachers = {"teacher_encoder": obj.teacher_encoder.module, "teacher_projector": obj.teacher_projector.module}

    def consolidated() -> dict[str, torch.Tensor]:
        out = {}
        for tname, module in students.items():
            params = [p for p in module.parameters() if p.requires_grad]
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                for n, p in module.named_parameters():
                    if p.requires_grad:
                        out[f"{tname}.{n}"] = p.detach().float().clone()
        return out

    def teacher_now() -> dict[str, torch.Tensor]:
        """The full teacher (gathered from the partitions: a collective)."""
        out = {}
        for tname, t in (("teacher_encoder", obj.teacher_encoder), ("teacher_projector", obj.teacher_projector)):
            state = t.checkpoint_state()
            out.update({f"{tname}.{n}": state[n] for n, _ in t.module.named_parameters()})
        return out

    ref = teacher_now()
    stale_ref = {k: v.clone() for k, v in ref.items()}
    prev = consolidated()
    init_teacher = {k: v.clone() for k, v in ref.items()}
    data = batches(obj, d.rank)
    full_numel = sum(p.numel() for t in teachers.values() for p in t.parameters())
    record = {"rank": d.rank, "world_size": d.world_size, "steps": []}
    student_params = [p for p in engine.module.parameters() if hasattr(p, "ds_id")]
    record["student_partitioned"] = sum(p.ds_tensor.numel() < p.ds_numel for p in student_params)
    record["student_params"] = len(student_params)
    record["teacher_partitioned"] = sum(hasattr(p, "ds_id") for t in teachers.values() for p in t.parameters())
    record["teacher_requires_grad"] = sum(p.requires_grad for t in teachers.values() for p in t.parameters())
    opt_ids = {id(p) for grp in engine.optimizer.param_groups for p in grp["params"]}
    record["teacher_in_optimizer"] = sum(id(p) in opt_ids for t in teachers.values() for p in t.parameters())
    engine.train()
    for step in range(steps):
        ctx = step_ctx(d, derived, engine, step, steps)
        engine.module.before_step(ctx)
        before = obj.teacher_encoder.gathered_elements + obj.teacher_projector.gathered_elements
        for _ in range(derived.grad_accum):
            out = engine(next(data))
            engine.backward(out.loss)
            engine.step()
        now = consolidated()
        engine.module.after_optimizer_step(replace(ctx, step=step + 1))
        gathered = obj.teacher_encoder.gathered_elements + obj.teacher_projector.gathered_elements - before
        held = obj.teacher_encoder.local_numel() + obj.teacher_projector.local_numel()
        mom = obj.momentum
        teacher = teacher_now()
        for k in ref:
            ref[k] = mom * ref[k] + (1.0 - mom) * now[k]
            stale_ref[k] = mom * stale_ref[k] + (1.0 - mom) * prev[k]
        flat = torch.cat([v.flatten() for v in teacher.values()])
        record["steps"].append(
            {
                "momentum": mom,
                "loss": float(out.loss),
                "max_err": max(float((teacher[k] - ref[k]).abs().max()) for k in ref),
                "max_err_stale": max(float((teacher[k] - stale_ref[k]).abs().max()) for k in ref),
                "student_moved": max(float((now[k] - prev[k]).abs().max()) for k in now),
                "teacher_moved": max(float((teacher[k] - init_teacher[k]).abs().max()) for k in teacher),
                "teacher_held": held,
                "teacher_full": full_numel,
                "gathered_per_step": gathered,
                "checksum": [float(flat.sum()), float((flat * torch.linspace(-1, 1, flat.numel())).sum())],
            }
        )
        prev = now
    record["teacher_keys"] = sorted(ref)
    record["losses"] = [r["loss"] for r in record["steps"]]
    record["knn"] = knn(engine, d.rank)
    return record


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
