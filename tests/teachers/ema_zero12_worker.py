"""Run under ``torchrun --nproc_per_node 2``: ConMIM's EMA teacher where the fp32 masters are partitioned below
ZeRO-3 (ZeRO-1 and ZeRO-2), against the full-parameter reference.

Usage: ``torchrun ... ema_zero12_worker.py OUT_DIR``. Each rank writes ``OUT_DIR/rank{r}.json``.

For each (ZeRO stage, precision) the engine is built as the Trainer builds it; after each optimizer step the
objective's ``after_optimizer_step`` runs the EMA update while every ``torch.distributed`` call is counted, and a
reference ``ref = m * ref + (1 - m) * full`` advances with the FULL fp32 masters read through
``ds.master_params`` (one all-reduce per parameter: the path the update used to take; outside the count).
Recorded per step: the largest |teacher - ref|, the collectives of the update, whether the student moved, and a
checksum of the teacher (replicas must agree across ranks).
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
import torch.distributed as tdist

STEPS = 4
VARIANTS = ((1, "fp32"), (2, "fp32"))


def build(out_dir: str, stage: int, precision: str):
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
            f"train.precision={precision}",
            f"train.zero_stage={stage}",
            "train.batch_size=8",
            "train.micro_batch_size=4",
            f"train.run_dir={out_dir}/run{stage}{precision}",
            "optim.lr=3e-3",
            "optim.warmup_epochs=0",
            "log.wandb=disabled",
            "objective={name: conmim, proj_hidden: 48, proj_out: 32, ema_m0: 0.6}",
        ],
    )
    derived = C.derive(cfg, d.world_size, samples_per_epoch=8 * STEPS)
    torch.manual_seed(cfg.train.seed)
    m = cfg.model
    obj = build_objective("conmim", build_vit(m.arch, m.img_size, m.patch_size, m.in_chans), C.objective_knobs(cfg))
    ds.skip_shm_comm_build()
    engine = ds.initialize(obj, cfg, derived, dist.accelerator_name())
    ds.set_hparams(engine, derived.lr, cfg.optim.weight_decay)
    return d, derived, obj, engine


def counting(counts: Counter):
    names = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "all_gather_object", "reduce")
    real = {n: getattr(tdist, n) for n in names}

    def wrap(n):
        def counted(*a, **k):
            counts[n] += 1
            return real[n](*a, **k)

        return counted

    class Ctx:
        def __enter__(self):
            for n in names:
                setattr(tdist, n, wrap(n))

        def __exit__(self, *exc):
            for n in names:
                setattr(tdist, n, real[n])

    return Ctx()


def run(out_dir: str, stage: int, precision: str) -> dict:
    from mimscale.engine import deepspeed as ds
    from mimscale.objectives import StepContext

    d, derived, obj, engine = build(out_dir, stage, precision)
    students = {"teacher_encoder": obj.encoder, "teacher_projector": obj.projector}
    teachers = {"teacher_encoder": obj.teacher_encoder, "teacher_projector": obj.teacher_projector}

    def full() -> dict[str, torch.Tensor]:
        return {f"{t}.{n}": v.clone() for t, mod in students.items() for n, v in ds.master_params(engine, mod)}

    def teacher_now() -> dict[str, torch.Tensor]:
        return {f"{t}.{n}": p.detach().clone() for t, mod in teachers.items() for n, p in mod.module.named_parameters()}

    ref, prev = teacher_now(), full()
    g = torch.Generator().manual_seed(1234 + d.rank)
    spec = obj.mask_spec()
    rec = {
        "fragments": ds.master_fragments(engine, obj.encoder) is not None,
        "trainable_params": sum(p.requires_grad for m in students.values() for p in m.parameters()),
        "steps": [],
    }
    engine.train()
    for step in range(STEPS):
        ctx = StepContext(
            step=step,
            total_steps=10 * STEPS,  # the momentum stays below 1 (at 1 the update is a no-op)
            rank=d.rank,
            world_size=d.world_size,
            grad_accum=derived.grad_accum,
            master_params=partial(ds.master_params, engine),
            master_shards=partial(ds.master_shards, engine),
            master_fragments=partial(ds.master_fragments, engine),
            all_reduce_mean=ds.all_reduce_mean,
        )
        engine.module.before_step(ctx)
        for _ in range(derived.grad_accum):
            img = torch.randn(4, 3, 16, 16, generator=g)
            batch = {
                "image": img,
                "image_teacher": img + 0.3 * torch.randn(img.shape, generator=g),
                **spec.generate(4, g),
            }
            engine.backward(engine(batch).loss)
            engine.step()
        now = full()
        counts: Counter = Counter()
        with counting(counts):
            engine.module.after_optimizer_step(replace(ctx, step=step + 1))
        mom = obj.momentum
        ref = {k: mom * ref[k] + (1.0 - mom) * now[k] for k in ref}
        teacher = teacher_now()
        flat = torch.cat([v.flatten() for v in teacher.values()])
        rec["steps"].append(
            {
                "momentum": mom,
                "collectives": dict(counts),
                "max_err": max(float((teacher[k] - ref[k]).abs().max()) for k in ref),
                "student_moved": max(float((now[k] - prev[k]).abs().max()) for k in now),
                "checksum": [float(flat.sum()), float((flat * torch.linspace(-1, 1, flat.numel())).sum())],
            }
        )
        prev = now
    return rec


def main(out_dir: str) -> None:
    record = {"rank": None}
    for stage, precision in VARIANTS:
        record[f"zero{stage}_{precision}"] = run(out_dir, stage, precision)
    record["rank"] = tdist.get_rank()
    Path(out_dir, f"rank{record['rank']}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1])
