"""Run under ``torchrun --nproc_per_node N``: save checkpoints on one world size, load them on another.

Usage: ``torchrun ... reshard_worker.py MODE CASES_JSON OUT_DIR`` with MODE ``save`` or ``load``. Each case is
``{"name", "overrides"}`` (a tiny_cpu run; ``train.run_dir`` names its checkpoint directory).

* ``save``: builds the run exactly as the launch does (``engine.build.build_model``, ``engine.deepspeed.initialize``,
  ``pretrain.PretrainTask.loader``), trains ``train.max_steps`` optimizer steps on real shards (with the objective's
  step hooks: EMA teacher update, adversarial ascent), saves checkpoint ``max_steps`` with
  :class:`mimscale.checkpoint.Checkpointer` and dumps the live state it saved.
* ``load``: resumes like the launch (``checkpoint.find``, ``convert_to_universal`` when the world size differs,
  ``initialize(load_universal=...)``, ``engine.resume.restore``), dumps the loaded state, then trains one more
  step (its loss must be finite).

The dump (rank 0, ``OUT_DIR/<name>_<mode>_w<world>.pt``): per trainable parameter of the engine's module its
FULL fp32 master value and Adam ``exp_avg``/``exp_avg_sq`` (DeepSpeed's ``safe_get_full_*``: collective under
ZeRO-3, so every rank walks the same parameters), the module's buffers, the objective's outside-DeepSpeed state
(``checkpoint_state``: EMA teacher, adversarial delta and its optimizer) and the optimizer step count.
"""

from __future__ import annotations

import copy
import json
import math
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch


def dump(engine, objective, step: int, extra: dict | None = None) -> dict:
    import torch.distributed as tdist
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    opt = engine.optimizer
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        # ZeRO-1/2 link each parameter to its Adam state fragments once, right after the FIRST group's first
        # step, so later groups (here: the no-weight-decay one) stay unlinked and safe_get_full_optimizer_state
        # cannot read them (DeepSpeed 0.19; training and checkpoint files are unaffected). Link them again now.
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()

    def full(name, p, key: str | None) -> torch.Tensor | None:
        mapping = getattr(p, "_hp_mapping", None)  # ZeRO-1/2: this rank's fragment of the parameter
        ok = torch.tensor([1.0 if key is None or mapping is None or key in (mapping.optim_fragment or {}) else 0.0])
        tdist.all_reduce(ok, op=tdist.ReduceOp.MIN)  # every rank takes the same branch (collectives below)
        if not ok.item():
            print(f"rank {tdist.get_rank()}: {name} has no {key}", flush=True)
            return None
        t = safe_get_full_fp32_param(p) if key is None else safe_get_full_optimizer_state(p, key)
        return None if t is None else t.detach().float().cpu().clone()

    params = {}
    for name, p in engine.module.named_parameters():
        if p.requires_grad:
            params[name] = {k: full(name, p, None if k == "fp32" else k) for k in ("fp32", "exp_avg", "exp_avg_sq")}
    buffers = {k: v.detach().float().cpu().clone() for k, v in engine.module.named_buffers()}
    return {
        "params": params,
        "buffers": buffers,
        "objective": copy.deepcopy(objective.checkpoint_state()),
        "step": step,
        **(extra or {}),
    }


def train_steps(engine, objective, loader, cfg, derived, d, start: int, stop: int) -> list[float]:
    """Optimizer steps ``start..stop-1`` as the loop runs them (lr schedule, step hooks); the mean loss of each."""
    from mimscale.engine import deepspeed as ds
    from mimscale.engine.schedule import warmup_cosine
    from mimscale.objectives import StepContext

    batches, losses = iter(loader), []
    device = torch.device(engine.device)
    for step in range(start, stop):
        lr = warmup_cosine(step, derived.total_steps, derived.warmup_steps, derived.lr, cfg.optim.min_lr)
        ds.set_hparams(engine, lr, cfg.optim.weight_decay)
        ctx = StepContext(
            step=step,
            total_steps=derived.total_steps,
            epoch=step / derived.steps_per_epoch,
            lr=lr,
            lr_factor=lr / derived.lr,
            rank=d.rank,
            world_size=d.world_size,
            grad_accum=derived.grad_accum,
            master_params=partial(ds.master_params, engine),
            all_reduce_mean=ds.all_reduce_mean,
        )
        engine.module.before_step(ctx)
        total = 0.0
        for _ in range(derived.grad_accum):
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in next(batches).items()}
            out = engine(batch)
            engine.backward(out.loss)
            engine.step()
            total += float(out.loss.detach())
        engine.module.after_optimizer_step(replace(ctx, step=step + 1))
        losses.append(total / derived.grad_accum)
    return losses


def main(mode: str, cases_path: str, out_dir: str) -> None:
    from mimscale import checkpoint as ckpt
    from mimscale import config as C
    from mimscale import dist
    from mimscale.data import builtin
    from mimscale.data.epoch import count_samples
    from mimscale.engine import deepspeed as ds
    from mimscale.engine import resume as rs
    from mimscale.engine.build import build_model
    from mimscale.pretrain import PretrainTask

    d = dist.detect()
    dist.export(d)
    ds.init_distributed()
    accelerator = dist.accelerator_name()
    for case in json.loads(Path(cases_path).read_text()):
        cfg = C.load("tiny_cpu", case["overrides"])
        src = builtin.resolve(cfg.data.train, cfg.data.root)
        derived = C.derive(cfg, d.world_size, count_samples(src, cfg.data.samples_per_epoch))
        run_dir, k = Path(derived.run_dir), cfg.train.max_steps
        found, universal = None, False
        if mode == "load":
            found = ckpt.find(run_dir, rs.identity(cfg))
            universal = found.meta["world_size"] != d.world_size
            if universal:
                ckpt.convert_to_universal(found, d.rank)
        torch.manual_seed(cfg.train.seed)  # identical init on every rank, as the Trainer does
        objective = build_model(cfg)
        engine = ds.initialize(objective, cfg, derived, accelerator, load_universal=universal)
        loader = PretrainTask(cfg).loader(objective, derived, d, accelerator)
        saver = ckpt.Checkpointer(
            run_dir, engine, rank=d.rank, world_size=d.world_size, keep_last=3, identity=rs.identity(cfg)
        )
        if mode == "save":
            losses = train_steps(engine, objective, loader, cfg, derived, d, 0, k)
            saver.save(k, {"step": k}, loader.state_dict(), objective.checkpoint_state())
            state = dump(engine, objective, k, {"losses": losses})
        else:
            trainer = rs.restore(saver, found, universal, loader, objective, d)
            state = dump(engine, objective, trainer["step"], {"universal": universal})
            state["next_losses"] = train_steps(engine, objective, loader, cfg, derived, d, k, k + 1)
            assert all(math.isfinite(v) for v in state["next_losses"]), state["next_losses"]
        if d.is_main:
            torch.save(state, Path(out_dir) / f"{case['name']}_{mode}_w{d.world_size}.pt")
        del engine, objective, loader, saver
    print(f"reshard worker {mode} rank {d.rank}/{d.world_size} done", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:4])
