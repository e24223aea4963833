"""Model-state memory per rank at ZeRO stages 0-3 (bf16, 2 ranks) vs the ZeRO paper's formulas.

The ZeRO paper (mixed-precision Adam, K = 12 bytes of optimizer state per parameter: fp32 master
weights + momentum + variance) gives the bytes of model states per data-parallel rank, with Ψ trainable
parameters and N ranks:

    stage 0: 16Ψ     (2Ψ bf16 params + 2Ψ bf16 grads + 12Ψ optimizer)
    stage 1: 4Ψ + 12Ψ/N        stage 2: 2Ψ + 14Ψ/N        stage 3: 16Ψ/N

This script builds the real engine (``mimscale.engine.deepspeed.initialize``, DeepSpeed with the CPU
accelerator and gloo) for each stage on the same small MAE model, runs one full step (so Adam's state
exists), then one forward + backward, and *counts the tensors DeepSpeed actually holds* on each rank at
that moment (the point where params, grads and optimizer state coexist):

  params   storages behind ``engine.module`` parameters (stage 3: ``param.ds_tensor`` partitions, plus
           anything not released)
  master   fp32 weights the wrapped torch optimizer steps (its ``param_groups``): DeepSpeed's
           ``single_partition_of_fp32_groups`` (ZeRO-1/2), ``fp32_partitioned_groups_flat`` (ZeRO-3),
           ``fp32_groups`` (stage-0 bf16 optimizer)
  adam     the torch optimizer's ``state`` (exp_avg, exp_avg_sq, step)
  grads    ``param.grad`` of the model and of the fp32 masters, and the wrapper optimizer's gradient
           partitions / accumulators (attributes named ``*grad*``)
  buffers  communication buckets (``ipg_buckets`` ...): sized by ``reduce_bucket_size``, not by Ψ, so
           kept out of the comparison and shown separately
  other    any other tensor the wrapper optimizer holds (listed by attribute name in the JSON)

Every storage is counted once (flat buffers and their views are deduplicated by storage pointer).
A second snapshot is taken inside the optimizer step (a torch ``register_step_pre_hook``), where
DeepSpeed materialises fp32 gradients for the master weights: the transient peak.

The knobs are the project's ``ds_configs/zero{stage}.json`` copied into a temporary file passed as
``train.ds_config``, with ``stage3_param_persistence_threshold: 0`` at stage 3 (``--persistence-threshold``;
with the project's 100000, every tensor below 100k elements stays unpartitioned and whole on every rank).

Run:   python benchmarks/zero_memory.py                 (re-launches itself: torchrun --standalone --nproc_per_node 2)
       torchrun --nproc_per_node 2 benchmarks/zero_memory.py --arch vit_small --img 64 --patch 8
Target: measured/expected within +-15% per stage.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FORMULA = {0: "16Ψ", 1: "4Ψ + 12Ψ/N", 2: "2Ψ + 14Ψ/N", 3: "16Ψ/N"}
CATS = ("params", "grads", "master", "adam", "buffers", "other")


from common import write_results  # noqa: E402


def expected_bytes(psi: int, stage: int, n: int) -> dict[str, float]:
    p16, g16, opt = 2.0 * psi, 2.0 * psi, 12.0 * psi
    return {
        "params": p16 / n if stage >= 3 else p16,
        "grads": g16 / n if stage >= 2 else g16,
        "optim": opt / n if stage >= 1 else opt,
    }


# ------------------------------------------------------------------------------------- the tensor census


class Census:
    """Unique storages by category; the first category that claims a storage keeps it."""

    def __init__(self):
        self.seen: dict[int, str] = {}
        self.bytes = {c: 0 for c in CATS}
        self.where: dict[str, dict[str, int]] = {c: {} for c in CATS}

    def add(self, cat: str, name: str, t) -> None:
        import torch

        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        st = t.untyped_storage()
        nbytes, ptr = st.nbytes(), st.data_ptr()
        if nbytes == 0 or ptr in self.seen:
            return
        self.seen[ptr] = cat
        self.bytes[cat] += nbytes
        key = name.split("[")[0].split(".")[0] if cat in ("grads", "buffers", "other") else name
        self.where[cat][key] = self.where[cat].get(key, 0) + nbytes


def walk(obj, path: str, visit, seen: set, depth: int = 0) -> None:
    """Call ``visit(path, tensor)`` for tensors reachable through containers and DeepSpeed helper objects
    (not modules, engines, torch optimizers or process groups)."""
    import torch
    from torch import nn

    if isinstance(obj, torch.Tensor):
        visit(path, obj)
        return
    if depth > 8 or id(obj) in seen or obj is None or isinstance(obj, (str, bytes, int, float, bool)):
        return
    seen.add(id(obj))
    if isinstance(obj, dict):
        for k, v in obj.items():
            walk(v, f"{path}[{k if isinstance(k, (str, int)) else '.'}]", visit, seen, depth + 1)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for i, v in enumerate(obj):
            walk(v, f"{path}[{i}]", visit, seen, depth + 1)
    elif isinstance(obj, (nn.Module, torch.optim.Optimizer)) or type(obj).__name__ in (
        "DeepSpeedEngine",
        "ProcessGroup",
    ):
        return
    elif type(obj).__module__.startswith("deepspeed") and hasattr(obj, "__dict__"):
        for k, v in vars(obj).items():
            walk(v, f"{path}.{k}", visit, seen, depth + 1)


def census(engine) -> Census:
    import torch

    c = Census()
    wrapper = engine.optimizer
    basic = engine.basic_optimizer if isinstance(engine.basic_optimizer, torch.optim.Optimizer) else wrapper
    for _name, p in engine.module.named_parameters():
        if hasattr(p, "ds_tensor"):
            c.add("params", "ds_tensor", p.ds_tensor)
        c.add("params", "module params", p.data)
    for g in basic.param_groups:
        for p in g["params"]:
            c.add("master", "optimizer.param_groups (fp32 master)", p)
    for _p, st in basic.state.items():
        for k, v in st.items():
            c.add("adam", f"optimizer.state[{k}]", v)

    def visit(path: str, t) -> None:
        low = path.lower()
        if "ipg" in low or "bucket" in low or "buffer" in low and "grad" not in low and "param" not in low:
            cat = "buffers"
        elif "grad" in low:
            cat = "grads"
        elif any(s in low for s in ("bit16", "fp16", "bf16", "lp_param")):
            cat = "params"
        elif "fp32" in low:
            cat = "master"
        else:
            cat = "other"
        c.add(cat, path.lstrip("."), t)

    if wrapper is not basic:  # before param.grad: grads that are views into a bucket stay "buffers"
        walk(wrapper, "", visit, set())
    for _name, p in engine.module.named_parameters():
        c.add("grads", "module param.grad", p.grad)
    for g in basic.param_groups:
        for p in g["params"]:
            c.add("grads", "fp32 master .grad", p.grad)
    return c


# ------------------------------------------------------------------------------------- one stage


def run_stage(stage: int, args, world: int, rank: int) -> dict:
    import torch
    import torch.distributed as tdist

    from mimscale import config as C
    from mimscale import dist
    from mimscale.engine import deepspeed as ds
    from mimscale.masking import random_masks
    from mimscale.models.vit import build_vit
    from mimscale.objectives.mae import MAE

    knobs = json.loads((ds.DS_CONFIG_DIR / f"zero{stage}.json").read_text())
    if stage == 3:
        knobs["zero_optimization"]["stage3_param_persistence_threshold"] = args.persistence_threshold
    if args.reduce_bucket is not None and stage > 0:
        knobs["zero_optimization"]["reduce_bucket_size"] = args.reduce_bucket
    tmp = Path(tempfile.mkdtemp(prefix=f"zero_memory_r{rank}_"))
    knobs_path = tmp / f"zero{stage}_bench.json"
    knobs_path.write_text(json.dumps(knobs, indent=2))

    mb = args.micro_batch
    cfg = C.load(
        "tiny_cpu",
        [
            f"model.arch={args.arch}",
            f"model.img_size={args.img}",
            f"model.patch_size={args.patch}",
            f"train.zero_stage={stage}",
            "train.precision=bf16",
            f"train.ds_config={knobs_path}",
            f"train.batch_size={mb * world}",
            f"train.micro_batch_size={mb}",
            "optim.clip_grad=0.0",
            f"objective.decoder_dim={args.decoder_dim}",
            f"objective.decoder_depth={args.decoder_depth}",
            f"objective.decoder_heads={args.decoder_heads}",
            "log.wandb=disabled",
        ],
    )
    derived = C.derive(cfg, world, samples_per_epoch=mb * world * 100)
    torch.manual_seed(0)
    objective = MAE(build_vit(args.arch, args.img, args.patch), C.objective_knobs(cfg))
    psi = sum(p.numel() for p in objective.parameters() if p.requires_grad)
    engine = ds.initialize(objective, cfg, derived, dist.accelerator_name())
    engine.train()

    g = torch.Generator().manual_seed(rank)
    n = objective.encoder.num_patches
    batch = {
        "image": torch.randn(mb, 3, args.img, args.img, generator=g),
        "mask": random_masks(mb, n, C.objective_knobs(cfg).mask_ratio, g),
    }
    basic = engine.basic_optimizer
    in_step: dict = {}

    def pre_hook(opt, a, kw):
        if not in_step:
            in_step["census"] = census(engine)

    in_backward: dict = {}

    def backward_hook(module, grad_output):
        if armed and not in_backward:
            in_backward["census"] = census(engine)

    armed = False
    bwd_handle = objective.encoder.blocks[0].register_full_backward_pre_hook(backward_hook)
    losses = []
    for i in range(2):  # step 1 creates Adam's state; step 2 is measured
        armed = i == 1
        out = engine(batch)
        engine.backward(out.loss)
        if i == 1:
            after_backward = census(engine)
            handle = basic.register_step_pre_hook(pre_hook)
        engine.step()
        losses.append(float(out.loss.detach()))
    handle.remove()
    bwd_handle.remove()
    after_step = census(engine)

    row = {
        "stage": stage,
        "rank": rank,
        "psi": psi,
        "losses": losses,
        "wrapper_optimizer": type(engine.optimizer).__name__,
        "basic_optimizer": type(basic).__name__,
        "local_param_numel": ds.local_param_numel(engine),
        "knobs": knobs["zero_optimization"],
    }
    for tag, cen in (
        ("in_backward", in_backward.get("census")),
        ("after_backward", after_backward),
        ("in_step", in_step.get("census")),
        ("after_step", after_step),
    ):
        if cen is not None:
            row[tag] = {"bytes": cen.bytes, "where": cen.where}
    tdist.barrier()
    shutil.rmtree(tmp, ignore_errors=True)
    del engine, objective, basic, in_step, in_backward, after_backward, after_step
    gc.collect()
    return row


# ------------------------------------------------------------------------------------- report


def summarize(rows: list[dict], world: int) -> list[dict]:
    out = []
    for stage in sorted({r["stage"] for r in rows}):
        rs = [r for r in rows if r["stage"] == stage]
        psi = rs[0]["psi"]
        exp = expected_bytes(psi, stage, world)
        per_rank = []
        for r in sorted(rs, key=lambda r: r["rank"]):
            b = r["after_backward"]["bytes"]
            states = b["params"] + b["grads"] + b["master"] + b["adam"]
            snaps = {t: r[t]["bytes"] for t in ("in_backward", "after_backward", "in_step", "after_step") if t in r}
            ms = {t: v["params"] + v["grads"] + v["master"] + v["adam"] for t, v in snaps.items()}
            per_rank.append(
                {
                    "rank": r["rank"],
                    "model_states": states,
                    "params": b["params"],
                    "grads": b["grads"],
                    "optim": b["master"] + b["adam"],
                    "master": b["master"],
                    "adam": b["adam"],
                    "buffers": b["buffers"],
                    "other": b["other"],
                    "buffers_max": max(v["buffers"] for v in snaps.values()),
                    "in_backward_model_states": ms.get("in_backward", states),
                    "in_step_model_states": ms.get("in_step", states),
                }
            )
        mean = {k: sum(p[k] for p in per_rank) / len(per_rank) for k in per_rank[0] if k != "rank"}
        expected = sum(exp.values())
        out.append(
            {
                "stage": stage,
                "formula": FORMULA[stage],
                "psi": psi,
                "world_size": world,
                "expected_bytes": expected,
                "expected_parts": exp,
                "measured_mean": mean,
                "per_rank": per_rank,
                "ratio": mean["model_states"] / expected,
                "ratio_parts": {
                    "params": mean["params"] / exp["params"],
                    "grads": mean["grads"] / exp["grads"],
                    "optim": mean["optim"] / exp["optim"],
                },
                "in_step_ratio": mean["in_step_model_states"] / expected,
                "wrapper_optimizer": rs[0]["wrapper_optimizer"],
            }
        )
    return out


def explain(s: dict) -> str:
    """One line per stage saying where the measured bytes differ from the formula (from the census)."""
    psi, m, e = s["psi"], s["measured_mean"], s["expected_parts"]
    notes = []
    if abs(m["grads"] - e["grads"]) > 0.05 * e["grads"]:
        notes.append(f"grads {m['grads'] / psi:.2f}Ψ vs {e['grads'] / psi:.2f}Ψ")
    if abs(m["optim"] - e["optim"]) > 0.05 * e["optim"]:
        notes.append(f"optimizer {m['optim'] / psi:.2f}Ψ vs {e['optim'] / psi:.2f}Ψ")
    if abs(m["params"] - e["params"]) > 0.05 * e["params"]:
        notes.append(f"params {m['params'] / psi:.2f}Ψ vs {e['params'] / psi:.2f}Ψ")
    if m["buffers_max"]:
        notes.append(
            f"+ comm buckets up to {m['buffers_max'] / 2**20:.0f} MiB (sized by reduce_bucket_size, not counted)"
        )
    if m["other"] >= 2**16:
        notes.append(f"+ other {m['other'] / 2**20:.1f} MiB (not counted)")
    return "; ".join(notes) or "matches"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="vit_tiny", help="default: %(default)s")
    ap.add_argument("--img", type=int, default=32, help="default: %(default)s")
    ap.add_argument("--patch", type=int, default=4, help="default: %(default)s")
    ap.add_argument("--decoder-dim", type=int, default=128, help="default: %(default)s")
    ap.add_argument("--decoder-depth", type=int, default=2, help="default: %(default)s")
    ap.add_argument("--decoder-heads", type=int, default=4, help="default: %(default)s")
    ap.add_argument("--micro-batch", type=int, default=4, help="per rank (default: %(default)s)")
    ap.add_argument("--stages", default="0,1,2,3", help="default: %(default)s")
    ap.add_argument(
        "--reduce-bucket",
        type=int,
        default=None,
        help="override reduce_bucket_size (elements) of the knobs files (default: the project's)",
    )
    ap.add_argument(
        "--persistence-threshold",
        type=int,
        default=0,
        help="stage3_param_persistence_threshold (default: %(default)s; the project's zero3.json has "
        "100000: smaller tensors then stay whole on every rank)",
    )
    ap.add_argument("--nproc", type=int, default=2, help="ranks when self-launching (default: %(default)s)")
    ap.add_argument("--no-save", action="store_true", help="do not write benchmarks/results/*.json")
    args = ap.parse_args()

    from mimscale import dist

    d = dist.detect()
    if d.launcher == "none":
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={args.nproc}",
            str(Path(__file__).resolve()),
            *sys.argv[1:],
        ]
        print("+", " ".join(cmd), flush=True)
        return subprocess.run(cmd, cwd=REPO).returncode
    dist.export(d)
    dist.bind_device(d)  # this rank's GPU current before DeepSpeed starts (one GPU per task too)
    import torch
    import torch.distributed as tdist

    torch.set_num_threads(dist.configure_threads(d))
    rows = []
    for stage in [int(s) for s in args.stages.split(",")]:
        rows.append(run_stage(stage, args, d.world_size, d.rank))
    gathered: list = [None] * d.world_size
    tdist.all_gather_object(gathered, rows)
    if d.rank != 0:
        return 0
    rows = [r for rank_rows in gathered for r in rank_rows]
    summary = summarize(rows, d.world_size)
    psi = summary[0]["psi"]
    mib = 2**20
    print(
        f"\nMAE {args.arch} {args.img}px/{args.patch}, Ψ = {psi:,} trainable params, bf16, N = {d.world_size} ranks; "
        f"model states per rank after backward (mean over ranks), MiB"
    )
    print(
        f"{'stage':<6} {'formula':<12} {'expected':>9} {'measured':>9} {'ratio':>6} {'params':>7} {'grads':>7} "
        f"{'optim':>7} {'in-bwd':>7} {'in-step':>8} {'buckets':>8}  wrapper optimizer"
    )
    for s in summary:
        m = s["measured_mean"]
        print(
            f"{s['stage']:<6} {s['formula']:<12} {s['expected_bytes'] / mib:>9.1f} {m['model_states'] / mib:>9.1f} "
            f"{s['ratio']:>6.3f} {m['params'] / mib:>7.1f} {m['grads'] / mib:>7.1f} {m['optim'] / mib:>7.1f} "
            f"{m['in_backward_model_states'] / mib:>7.1f} {m['in_step_model_states'] / mib:>8.1f} "
            f"{m['buffers_max'] / mib:>8.1f}  {s['wrapper_optimizer']}"
        )
    print("measured/expected (target 0.85-1.15):")
    for s in summary:
        ok = 0.85 <= s["ratio"] <= 1.15
        s["met"] = ok
        s["explanation"] = explain(s)
        print(f"  stage {s['stage']}: {s['ratio']:.3f} {'OK' if ok else 'MISSED'} -- {s['explanation']}")
    if not args.no_save:
        out = write_results(
            "zero_memory",
            {
                "config": {
                    **vars(args),
                    "world_size": d.world_size,
                    "precision": "bf16",
                    "stage3_param_persistence_threshold": args.persistence_threshold,
                },
                "summary": summary,
                "ranks": rows,
                "target": "measured/expected within +-15%",
                "note": "bytes of unique tensor storages held by the engine (census), not process RSS",
            },
        )
        print(f"wrote {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
