"""Measured training throughput: ``mimscale bench throughput``.

One *configuration* = objective x model x ZeRO stage x activation checkpointing x micro-batch x
precision x world size. For each, the real thing the train loop runs is built: the recipe through
``mimscale.config.load`` + overrides, the encoder and objective as the Trainer builds them (``engine/build.py``), the
DeepSpeed engine by ``engine.deepspeed.initialize``. Then ``warmup`` untimed steps and ``steps`` timed
ones (``engine(batch); engine.backward(loss); engine.step()``, device-synchronised per step), and one
JSON line:

* ``img_per_s`` = micro-batch x world size / median step time (``step_time_s`` is that median,
  ``step_time_iqr_s`` its interquartile range); ``cpu_time_s`` is the median CPU time of this process
  per step and ``img_per_cpu_s`` = micro-batch / that: on a CPU shared with other jobs the CPU time of
  a step moves far less with the load than its wall-clock time (on a GPU it is host overhead only);
* ``mfu`` = counted FLOPs per image x img/s per device / device peak. FLOPs are counted by
  :func:`mimscale.telemetry.mfu.count_train_flops` on a copy of the objective built on the meta
  device (model FLOPs: checkpointing recompute is not counted, so it lowers MFU); the peak is
  :func:`mimscale.telemetry.mfu.peak_flops_for` (datasheet on A100/H100/H200, measured GEMM peak on CPU);
* ``mem_peak_gb``: :func:`mimscale.telemetry.memory_stats` after the timed steps (CUDA: allocator peak
  since the warm-up ended; CPU: the process's peak RSS, so every configuration runs in its own process
  when several are measured), the maximum over ranks;
* optionally (``--plan-gpu``) the ``mimscale bench plan`` projection of the same configuration.

Data: ``synthetic`` (default) = a few batches made once by the objective's real train transform and
mask collate from random-noise images, then cycled, so the loader is excluded; or a shard source,
read by the real ``ShardLoader`` inside the timed loop (loader stalls then show up).

World size 1 runs in this process; ``--world-size N`` re-launches through ``torchrun --standalone``
(each rank runs the same configuration, rank 0 prints). Several configurations (lists after
``--zero``/``--ckpt``/``--micro-batch``) run one subprocess each; ``--sweep`` also writes
``throughput-<machine>-<date>.json`` and an SVG plot of img/s per ZeRO stage.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..report.sweep import ratios, sweep_svg

PRECISIONS = ("bf16", "fp16", "fp32")


@dataclass(frozen=True)
class ThroughputConfig:
    """One configuration to measure. ``None`` fields come from the recipe."""

    recipe: str = "tiny_cpu"
    objective: str | None = None
    arch: str | None = None
    img: int | None = None
    patch: int | None = None
    zero: int = 0
    ckpt: bool = False
    micro_batch: int = 32
    precision: str | None = None
    steps: int = 10
    warmup: int = 3
    world_size: int = 1
    data: str = "synthetic"
    seed: int = 0
    plan_gpu: str | None = None  # a `bench plan --gpu` key, or "auto" (this GPU)
    overrides: tuple[str, ...] = field(default_factory=tuple)

    def check(self) -> None:
        if self.zero not in (0, 1, 2, 3):
            raise ConfigError(f"--zero {self.zero}: must be 0, 1, 2 or 3")
        for name, v, lo in (
            ("--micro-batch", self.micro_batch, 1),
            ("--steps", self.steps, 1),
            ("--warmup", self.warmup, 0),
            ("--world-size", self.world_size, 1),
        ):
            if not isinstance(v, int) or v < lo:
                raise ConfigError(f"{name} {v}: must be an integer >= {lo}")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ConfigError(f"--precision {self.precision}: must be one of {', '.join(PRECISIONS)}")
        if self.plan_gpu not in (None, "auto"):
            from .plan import GPUS

            if self.plan_gpu not in GPUS:
                raise ConfigError(f"--plan-gpu {self.plan_gpu}: unknown GPU; valid: auto, {', '.join(GPUS)}")

    def cli_args(self) -> list[str]:
        """The ``mimscale bench throughput`` arguments that reproduce exactly this configuration."""
        a = [
            "--recipe",
            self.recipe,
            "--zero",
            str(self.zero),
            "--ckpt",
            str(int(self.ckpt)),
            "--micro-batch",
            str(self.micro_batch),
            "--steps",
            str(self.steps),
            "--warmup",
            str(self.warmup),
            "--world-size",
            str(self.world_size),
            "--data",
            self.data,
            "--seed",
            str(self.seed),
        ]
        for flag, v in (
            ("--objective", self.objective),
            ("--arch", self.arch),
            ("--img", self.img),
            ("--patch", self.patch),
            ("--precision", self.precision),
            ("--plan-gpu", self.plan_gpu),
        ):
            if v is not None:
                a += [flag, str(v)]
        for o in self.overrides:
            a += ["--set", o]
        return a


# ----------------------------------------------------------------------------- building


def build_config(tc: ThroughputConfig, world_size: int):
    """The run config: the recipe, then the configuration's fields, then ``--set`` overrides."""
    from .. import config as C

    ov: list[str] = []
    if tc.objective is not None and tc.objective != C.load_raw(tc.recipe).get("objective", {}).get("name"):
        ov.append(f"objective={{name: {tc.objective}}}")  # the recipe's knobs belong to its own objective
    for key, v in (
        ("model.arch", tc.arch),
        ("model.img_size", tc.img),
        ("model.patch_size", tc.patch),
        ("train.precision", tc.precision),
    ):
        if v is not None:
            ov.append(f"{key}={v}")
    ov += [
        f"model.grad_checkpointing={str(tc.ckpt).lower()}",
        f"train.zero_stage={tc.zero}",
        f"train.micro_batch_size={tc.micro_batch}",
        f"train.batch_size={tc.micro_batch * world_size}",
        f"data.train={tc.data}",
        "eval.knn_train=null",
        "eval.knn_test=null",
        "log.wandb=disabled",
        "log.tensorboard=false",
        "log.jsonl=false",
    ]
    return C.load(tc.recipe, [*ov, *tc.overrides])


def build_objective_for(cfg, device: str | None = None):
    """Encoder + objective exactly as the Trainer builds them (``device="meta"``: shapes only)."""
    from ..engine.build import build_model

    return build_model(cfg, device)


def synthetic_batches(objective, cfg, n: int, seed: int = 0) -> list[dict]:
    """``n`` batches of ``train.micro_batch_size`` random-noise images through the objective's real
    train transform (RandomResizedCrop + flip + normalise, plus its own views) and mask collate."""
    import numpy as np
    import torch
    from PIL import Image

    from ..data.transforms import TrainTransform
    from ..masking import MaskCollate

    m, d = cfg.model, cfg.data
    tf = objective.train_transform(
        TrainTransform(m.img_size, scale=d.crop_scale, hflip=d.hflip, mean=d.mean, std=d.std, in_chans=m.in_chans)
    )
    collate = MaskCollate(objective.mask_spec())
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    side = m.img_size + m.img_size // 4
    shape = (side, side) if m.in_chans == 1 else (side, side, 3)
    out = []
    for b in range(n):
        samples = []
        for i in range(cfg.train.micro_batch_size):
            img = Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8))
            views = tf(img, g)
            views = views if isinstance(views, dict) else {"image": views}
            samples.append({**views, "label": i % 10, "key": f"synthetic-{b}-{i}"})
        out.append(collate(samples, g))
    return out


def counted_flops_per_sample(cfg, batch: dict) -> float:
    """Model FLOPs per image of one training forward + backward, counted on a meta-device copy."""
    from ..telemetry.mfu import count_train_flops

    meta = build_objective_for(cfg, "meta")
    meta.train()
    return count_train_flops(meta, batch) / int(batch["image"].shape[0])


def gpu_plan_key(name: str, total_memory_gb: float) -> str | None:
    """``torch.cuda`` device name + capacity -> a ``mimscale bench plan --gpu`` key; None (with a warning) for a
    GPU the planner has no entry for (e.g. L40S, GH200, an unknown name): the row then has no projection."""
    from ..telemetry.mfu import gpu_peak_key
    from .plan import GPUS

    try:
        key = gpu_peak_key(name)
    except ConfigError:
        key = None
    if key == "a100":
        return "a100-40gb" if total_memory_gb < 60 else "a100-80gb"
    plan = {"h100-sxm": "h100-80gb"}.get(key, key) if key else None
    if plan not in GPUS:
        logging.getLogger("mimscale.bench").warning("--plan-gpu auto: no plan entry for GPU '%s'; no projection", name)
        return None
    return plan


def plan_projection(cfg, world_size: int, gpu: str, mfu: float | None = None) -> dict[str, Any]:
    """What ``mimscale bench plan`` projects for this configuration on one node of ``gpu``."""
    from . import plan as P

    knobs = dict(cfg.objective)
    t, m = cfg.train, cfg.model
    measured: dict[str, Any] = {"mfu": mfu} if mfu else {}
    inp = P.PlanInput(
        model=m.arch,
        patch=m.patch_size,
        img=m.img_size,
        in_chans=m.in_chans,
        objective=knobs.pop("name"),
        objective_knobs=knobs,
        gpu=gpu,
        zero=t.zero_stage,
        micro_batch=t.micro_batch_size,
        nodes=1,
        gpus_per_node=world_size,
        grad_ckpt=m.grad_checkpointing,
        precision=t.precision if t.precision != "fp32" else "bf16",
        **measured,
    )
    p = P.make_plan(inp)
    return {
        "gpu": gpu,
        "precision": inp.precision,
        "mfu": inp.mfu,
        "mem_gb": p.memory_gb["total"],
        "fits": p.fits,
        "max_micro_batch": p.max_micro_batch,
        "img_per_s_per_gpu": p.images_per_s_per_gpu,
    }


# ----------------------------------------------------------------------------- measuring


def _to_device(batch: dict, device) -> dict:
    import torch

    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _forever(it_factory):
    while True:
        yield from it_factory()


def measure(tc: ThroughputConfig) -> dict[str, Any] | None:
    """Build and time one configuration in this process (every rank calls it); rank 0 gets the result."""
    import torch
    import torch.distributed as tdist

    from .. import config as C
    from .. import dist
    from ..engine import deepspeed as ds
    from ..engine.build import configure_backends
    from ..telemetry.memory import memory_stats, reset_peak
    from ..telemetry.mfu import mfu, peak_flops_for

    tc.check()
    cfg = build_config(tc, tc.world_size)  # bad arguments fail here, before the environment is touched
    d = dist.detect()
    if d.world_size != tc.world_size:
        raise ConfigError(
            f"--world-size {tc.world_size} but this process was launched with world size "
            f"{d.world_size}; pass --world-size {d.world_size} or launch without a launcher"
        )
    dist.export(d)
    dist.nccl_env_defaults()
    torch.set_num_threads(dist.configure_threads(d))
    accelerator = dist.accelerator_name()
    dist.bind_device(d, accelerator)  # as the Trainer: this rank's GPU is current before DeepSpeed starts
    configure_backends(cfg, accelerator)  # TF32 as in training (train.tf32), so bench and training time the same maths
    if accelerator == "cpu" and d.world_size == 1:
        ds.skip_shm_comm_build()  # a shared-memory allreduce JIT build (~30 s, file-locked): nothing to reduce
    derived = C.derive(cfg, d.world_size, samples_per_epoch=cfg.train.batch_size * 10**6)

    torch.manual_seed(cfg.train.seed)
    objective = build_objective_for(cfg)
    probe = synthetic_batches(objective, cfg, 1, seed=tc.seed)[0]
    flops = counted_flops_per_sample(cfg, probe)
    analytic = float(objective.flops_per_sample())
    params = sum(p.numel() for p in objective.parameters() if p.requires_grad)
    if tc.data == "synthetic":
        pool = [probe, *synthetic_batches(objective, cfg, 2, seed=tc.seed + 1 + d.rank)]
        batches, move = _forever(lambda: pool), _to_device
    else:
        loader = _shard_loader(cfg, objective, d, accelerator, derived)
        batches, move = _forever(lambda: iter(loader)), loader.to_device

    engine = ds.initialize(objective, cfg, derived, accelerator)
    device = torch.device(engine.device)
    ds.set_hparams(engine, derived.lr, cfg.optim.weight_decay)
    info = device_info(device)
    sync = info["sync"]
    engine.train()

    def step() -> torch.Tensor:
        out = engine(move(next(batches), device))
        engine.backward(out.loss)
        engine.step()
        return out.loss

    for _ in range(tc.warmup):
        step()
    sync()
    reset_peak(device)
    times: list[float] = []
    cpu_times: list[float] = []
    loss: torch.Tensor | None = None
    for _ in range(tc.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        loss = step()
        sync()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    mem = memory_stats(device)["perf/mem_peak_gb"]
    assert loss is not None  # the timed loop ran at least once
    loss_v = float(loss.detach().float())
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        t = torch.tensor([mem, max(times)], dtype=torch.float64, device=device)
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        mem = float(t[0])
    peak = peak_flops_for(device, cfg.train.precision)
    if not d.is_main:
        return None

    med = statistics.median(times)
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [med, med, med]
    img_s = cfg.train.micro_batch_size * d.world_size / med
    name = info["name"]
    row = {
        "objective": cfg.objective["name"],
        "arch": cfg.model.arch,
        "img": cfg.model.img_size,
        "patch": cfg.model.patch_size,
        "zero": tc.zero,
        "ckpt": int(tc.ckpt),
        "micro_batch": tc.micro_batch,
        "world_size": d.world_size,
        "precision": cfg.train.precision,
        "data": tc.data,
        "device": device.type,
        "device_name": name,
        "threads": torch.get_num_threads(),
        "steps": tc.steps,
        "warmup": tc.warmup,
        "params": params,
        "img_per_s": img_s,
        "step_time_s": med,
        "step_time_iqr_s": [q[0], q[2]],
        "cpu_time_s": statistics.median(cpu_times),
        "img_per_cpu_s": cfg.train.micro_batch_size / statistics.median(cpu_times),
        "flops_per_sample": flops,
        "flops_per_sample_analytic": analytic,
        "tflops_per_device": flops * img_s / d.world_size / 1e12,
        "peak_tflops": peak / 1e12 if peak else None,
        "peak_source": ("datasheet" if device.type == "cuda" else "measured GEMM") if peak else None,
        "mfu": mfu(flops, img_s / d.world_size, peak) if peak else None,
        "mem_peak_gb": mem,
        "final_loss": loss_v,
    }
    if tc.plan_gpu:
        gpu: str | None = tc.plan_gpu
        if gpu == "auto":
            if device.type != "cuda":
                raise ConfigError("--plan-gpu auto needs a CUDA device; name one (e.g. a100-80gb)")
            gpu = gpu_plan_key(name, info["memory_gb"])
        if gpu is not None:
            row["plan"] = plan_projection(cfg, d.world_size, gpu)
    return row


def device_info(device, cuda: Any = None) -> dict[str, Any]:
    """``name``, ``memory_gb`` (None on CPU) and ``sync`` (wait for queued kernels) of ``device``.

    ``cuda`` is the namespace the CUDA branch calls (default ``torch.cuda``: ``get_device_name``,
    ``get_device_properties``, ``synchronize``), so a CPU test runs that branch against a stand-in.
    """
    import torch

    if torch.device(device).type != "cuda":
        return {"name": cpu_name(), "memory_gb": None, "sync": lambda: None}
    cuda = torch.cuda if cuda is None else cuda
    return {
        "name": cuda.get_device_name(device),
        "memory_gb": cuda.get_device_properties(device).total_memory / 2**30,
        "sync": lambda: cuda.synchronize(device),
    }


def cpu_name() -> str:
    """``model name`` from /proc/cpuinfo (e.g. "AMD EPYC 7B13"), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _shard_loader(cfg, objective, d, accelerator: str, derived):
    """The Trainer's own pre-training loader (real shards, real workers, the decode path, pinned memory on CUDA)."""
    from ..pretrain import PretrainTask

    return PretrainTask(cfg).loader(objective, derived, d, accelerator)


# ----------------------------------------------------------------------------- launching


def _child_cmd(tc: ThroughputConfig) -> list[str]:
    base = ["-m", "mimscale.cli", "bench", "throughput", *tc.cli_args(), "--measure-only"]
    if tc.world_size > 1:
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(tc.world_size),
            *base,
        ]
    return [sys.executable, *base]


def run_subprocess(tc: ThroughputConfig, timeout: float | None = None) -> dict[str, Any]:
    """Measure ``tc`` in a fresh process (torchrun for world size > 1); its JSON line as a dict."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    p = subprocess.run(_child_cmd(tc), capture_output=True, text=True, env=env, timeout=timeout)
    rows = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{") and '"img_per_s"' in line]
    if p.returncode != 0 or not rows:
        last = [ln for ln in (p.stderr + p.stdout).splitlines() if ln.strip()]
        err = next((ln for ln in reversed(last) if "error" in ln.lower()), last[-1] if last else "no output")
        raise ConfigError(
            f"configuration zero={tc.zero} ckpt={int(tc.ckpt)} micro_batch={tc.micro_batch} "
            f"failed (exit {p.returncode}): {err.strip()[:300]}"
        )
    return rows[-1]


def run_one(tc: ThroughputConfig) -> dict[str, Any] | None:
    """World size 1 or already under a launcher: here; otherwise through torchrun."""
    from .. import dist

    d = dist.detect()
    if tc.world_size > 1 and d.world_size == 1 and d.launcher == "none":
        return run_subprocess(tc)
    return measure(tc)


def grid(
    base: ThroughputConfig, zeros: list[int], ckpts: list[bool], micro_batches: list[int]
) -> list[ThroughputConfig]:
    return [
        replace(base, zero=z, ckpt=c, micro_batch=mb) for mb, c, z in itertools.product(micro_batches, ckpts, zeros)
    ]


def run_grid(configs: list[ThroughputConfig], repeats: int = 1, emit=print) -> list[dict[str, Any]]:
    """Each configuration in its own process, ``repeats`` rounds in rotated order (noisy machines):
    per configuration the round with the median img/s is kept (``img_per_s_rounds`` has them all)."""
    rounds: dict[int, list[dict]] = {i: [] for i in range(len(configs))}
    order = list(range(len(configs)))
    for r in range(repeats):
        seq = order if r % 2 == 0 else order[::-1]
        for i in seq:
            row = run_subprocess(configs[i])
            rounds[i].append(row)
            if repeats == 1:
                emit(json.dumps(row))
    out = []
    for i in order:
        rs = sorted(rounds[i], key=lambda x: x["img_per_s"])
        row = dict(rs[len(rs) // 2])
        row["img_per_s_rounds"] = [x["img_per_s"] for x in rounds[i]]
        row["img_per_cpu_s_rounds"] = [x.get("img_per_cpu_s") for x in rounds[i]]
        if repeats > 1:
            emit(json.dumps(row))
        out.append(row)
    return out


# ----------------------------------------------------------------------------- sweep output


def compile_ratio(tc: ThroughputConfig, repeats: int = 1, emit=print) -> dict[str, Any]:
    """``model.compile=true`` in ``tc``: measure it and its eager twin (``model.compile=false``), each in its
    own process, alternating over ``repeats``; emit both rows, then one line with the median
    compiled/eager img/s ratio (warm-up steps absorb the compilation)."""
    eager = replace(tc, overrides=(*tc.overrides, "model.compile=false"))
    rows = run_grid([tc, eager], repeats, emit=emit)
    compiled_r, eager_r = rows
    ratio = (
        [c / e for c, e in zip(compiled_r["img_per_s_rounds"], eager_r["img_per_s_rounds"])]
        if "img_per_s_rounds" in compiled_r
        else [compiled_r["img_per_s"] / eager_r["img_per_s"]]
    )
    out = {
        "compile": {
            "compiled_img_per_s": compiled_r["img_per_s"],
            "eager_img_per_s": eager_r["img_per_s"],
            "compiled_over_eager": statistics.median(ratio),
            "repeats": repeats,
        }
    }
    emit(json.dumps(out))
    return out


def sweep_doc(rows: list[dict], grid_spec: dict, repeats: int) -> dict[str, Any]:
    from importlib.metadata import version

    import torch

    return {
        "benchmark": "throughput",
        "machine": platform.node() or "machine",
        "date": dt.date.today().isoformat(),
        "cpu": cpu_name(),
        "cores": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "deepspeed": version("deepspeed"),
        "grid": grid_spec,
        "repeats": repeats,
        "results": rows,
        "ratios": ratios(rows),
        "caveat": "img/s on a shared machine moves with the load; compare configurations by the ratios",
    }


def write_sweep(rows: list[dict], out: str | os.PathLike, grid_spec: dict, repeats: int) -> tuple[Path, Path]:
    """``throughput-<machine>-<date>.json`` + ``.svg`` in the directory ``out`` (or at ``out`` if it ends in .json)."""
    doc = sweep_doc(rows, grid_spec, repeats)
    out = Path(out)
    path = out if out.suffix == ".json" else out / f"throughput-{doc['machine']}-{doc['date']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    svg = path.with_suffix(".svg")
    svg.write_text(sweep_svg(rows) + "\n")
    return path, svg


def format_table(rows: list[dict]) -> str:
    """A plain-text table of a sweep (img/s, ratio to ZeRO-0, step time, MFU, peak memory)."""
    rel = ratios(rows)
    head = (
        f"{'arch':<10} {'ZeRO':>4} {'ckpt':>4} {'mb':>4} {'img/s':>9} {'vs Z0':>6} {'img/CPU-s':>9} "
        f"{'vs Z0':>6} {'step ms':>8} {'MFU':>6} {'mem GB':>7}"
    )
    lines = [head]
    for r, q in zip(rows, rel):
        v, vc = q["img_per_s_vs_zero0"], q["img_per_cpu_s_vs_zero0"]
        mfu_s = f"{100 * r['mfu']:5.1f}%" if r.get("mfu") is not None else "   n/a"
        line = (
            f"{r['arch']:<10} {r['zero']:>4} {r['ckpt']:>4} {r['micro_batch']:>4} {r['img_per_s']:>9.1f} "
            f"{(f'{v:.3f}' if v is not None else '-'):>6} "
            f"{(format(r['img_per_cpu_s'], '.1f') if r.get('img_per_cpu_s') else '-'):>9} "
            f"{(f'{vc:.3f}' if vc is not None else '-'):>6} {1000 * r['step_time_s']:>8.1f} {mfu_s} "
            f"{r['mem_peak_gb']:>7.2f}"
        )
        if "plan" in r:
            p = r["plan"]
            line += (
                f"   plan {p['gpu']}: {p['mem_gb']:.1f} GB {'fits' if p['fits'] else 'DOES NOT FIT'}, "
                f"{p['img_per_s_per_gpu']:.0f} img/s/GPU at MFU {p['mfu']:.2f}"
            )
        lines.append(line)
    return "\n".join(lines)


def config_dict(tc: ThroughputConfig) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(tc).items()}


# ----------------------------------------------------------------------------- GPU run summary


def summarize(
    rows: list[dict], target_mfu: float = 0.45, target_arch: str = "vit_large", target_objective: str = "mae"
) -> tuple[str, bool | None]:
    """Measured vs ``bench plan`` per configuration, and the MFU target verdict.

    The verdict (``True``/``False``) needs a ``target_objective`` ``target_arch`` row measured on one
    CUDA device; otherwise it is ``None`` ("not evaluated"), e.g. in the CPU smoke run.
    """
    head = (
        f"{'objective':<9} {'arch':<10} {'ZeRO':>4} {'ckpt':>4} {'mb':>4} {'ranks':>5} {'img/s':>9} {'MFU':>6} "
        f"{'mem GB':>7} | {'plan GB':>7} {'fits':>4} {'meas/plan mem':>13} {'img/s @plan MFU':>15}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        p = r.get("plan")
        mfu_s = f"{100 * r['mfu']:5.1f}%" if r.get("mfu") is not None else "   n/a"
        line = (
            f"{r['objective']:<9} {r['arch']:<10} {r['zero']:>4} {r['ckpt']:>4} {r['micro_batch']:>4} "
            f"{r['world_size']:>5} {r['img_per_s']:>9.1f} {mfu_s} {r['mem_peak_gb']:>7.2f} | "
        )
        if p:
            line += (
                f"{p['mem_gb']:>7.2f} {'yes' if p['fits'] else 'NO':>4} {r['mem_peak_gb'] / p['mem_gb']:>13.2f} "
                f"{p['img_per_s_per_gpu'] * r['world_size']:>15.0f}"
            )
        else:
            line += "(no plan)"
        lines.append(line)
    eligible = [
        r
        for r in rows
        if r["arch"] == target_arch
        and r["objective"] == target_objective
        and r["device"] == "cuda"
        and r["world_size"] == 1
        and r.get("mfu") is not None
    ]
    name = f"{target_objective.upper()} {target_arch}"
    if not eligible:
        lines.append(
            f"target: >= {100 * target_mfu:.0f}% MFU for {name} on one A100/H100-class GPU: not evaluated "
            "(no such configuration measured on CUDA here)"
        )
        return "\n".join(lines), None
    best = max(eligible, key=lambda r: r["mfu"])
    met = best["mfu"] >= target_mfu
    lines.append(
        f"target: >= {100 * target_mfu:.0f}% MFU for {name} on one {best['device_name']}: best "
        f"{100 * best['mfu']:.1f}% (ZeRO-{best['zero']}, ckpt {best['ckpt']}, micro-batch "
        f"{best['micro_batch']}, {best['precision']}) -> {'MET' if met else 'MISSED'}"
    )
    return "\n".join(lines), met


def _summary_main(argv: list[str]) -> int:
    """``python -m mimscale.bench.throughput summary FILE.json ... [--target-mfu 0.45]`` (used by benchmarks/gpu.sh)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m mimscale.bench.throughput summary")
    ap.add_argument("files", nargs="+", help="sweep JSON files written by `mimscale bench throughput --sweep`")
    ap.add_argument("--target-mfu", type=float, default=0.45)
    ap.add_argument("--target-arch", default="vit_large")
    args = ap.parse_args(argv)
    rows = []
    for f in args.files:
        try:
            rows += json.loads(Path(f).read_text())["results"]
        except (OSError, ValueError, KeyError) as e:
            print(f"summary: error: {f}: not a throughput sweep file ({e})", file=sys.stderr)
            return 2
    text, _ = summarize(rows, args.target_mfu, args.target_arch)
    print(text)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] != ["summary"]:
        print("usage: python -m mimscale.bench.throughput summary FILE.json ...", file=sys.stderr)
        sys.exit(2)
    sys.exit(_summary_main(sys.argv[2:]))
