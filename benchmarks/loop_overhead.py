"""The train loop's cost over the bare step: ``mimscale pretrain`` vs ``mimscale bench throughput``.

Same recipe (``tiny_cpu``: MAE, micro ViT, 32 px, fp32, ZeRO-1), same global batch, 2 gloo ranks
launched by torchrun, data read from local Fashion-MNIST shards by the real ``ShardLoader`` in both:

  loop   ``torchrun -m mimscale.train`` -- the whole Trainer: loader, per-step flags (one collective),
         lr/wd schedule, logging every ``--log-every`` steps to JSONL + TensorBoard, progress line;
         its step time is the median over logging windows of (window wall time / steps), from the
         timestamps in ``metrics.jsonl`` (the first ``--skip`` windows are warm-up)
  bench  ``mimscale bench throughput --data SHARDS``: ``engine(batch); backward; step`` and nothing else,
         median step time over ``--steps`` timed steps (``--data synthetic`` too, for context: loader excluded)

Contenders alternate (ABBA over ``--repeats``) because this machine is shared; the result is the median of
the per-repeat ratios ``loop img/s / bench img/s`` (target >= 0.97).

Run:   python benchmarks/loop_overhead.py              (~6 min on 2 cores)
       python benchmarks/loop_overhead.py --recipe mae_vit_l16 --ranks 1 --micro-batch 128 --precision bf16 \
           --generate 2048 --steps 60 --repeats 1 --name gpu_loop        (benchmarks/gpu.sh: one GPU)

``--generate N`` writes N JPEG photos-like images (smooth random fields, 320x320, quality 90) into shards
under ``--work`` first (a GPU node has no data set at hand). The loop's MFU and peak memory come from its
last logged record (``perf/mfu``, ``perf/mem_peak_gb``), the bench's from its JSON row.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import REPO, write_results

BIN = Path(sys.executable).parent


def resolve_accelerator(requested: str = "auto", cuda_available: bool | None = None) -> str:
    """``cpu`` or ``cuda`` for ``--accelerator``: auto is CUDA when PyTorch sees a device, else the CPU."""
    if requested not in ("auto", "cpu", "cuda"):
        raise SystemExit(f"--accelerator {requested}: use auto, cpu or cuda")
    if requested != "auto":
        return requested
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    return "cuda" if cuda_available else "cpu"


def _env(accelerator: str) -> dict[str, str]:
    """The contenders' environment: launcher variables dropped; on the CPU, DeepSpeed's accelerator pinned to
    ``cpu`` and one OpenMP thread per rank (2 ranks on 2 cores). On CUDA neither is set: the runs train on the GPU
    and mimscale sizes its threads itself (``dist.configure_threads``)."""
    e = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "SLURM_", "TORCHELASTIC"))
    }
    e.update(WANDB_MODE="disabled", WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    if accelerator == "cpu":
        e.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    elif e.get("DS_ACCELERATOR") == "cpu":
        del e["DS_ACCELERATOR"]  # a CPU pin left in the caller's environment would train on the CPU again
    return e


def _torchrun(ranks: int) -> list[str]:
    return [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={ranks}"]


def _common(a) -> list[str]:
    ov = list(a.set)
    if a.precision:
        ov.append(f"train.precision={a.precision}")
    return ov


def run_loop(a, shards: str, work: Path, i: int) -> dict:
    rd = work / f"loop{i}"
    ov = [
        *_common(a),
        f"data.train={shards}",
        f"train.stop_after_steps={a.steps + a.skip * a.log_every}",
        f"train.log_every={a.log_every}",
        f"train.run_dir={rd}",
        "train.resume=never",
        "train.save_every=0",
        "train.save_every_minutes=null",
        "eval.knn_train=null",
        "eval.knn_test=null",
        "log.wandb=disabled",
        f"train.batch_size={a.micro_batch * a.ranks}",
        f"train.micro_batch_size={a.micro_batch}",
        f"data.num_workers={a.workers}",
        f"train.zero_stage={a.zero}",
    ]
    launch = _torchrun(a.ranks) + ["-m"] if a.ranks > 1 else [sys.executable, "-m"]
    p = subprocess.run(
        [*launch, "mimscale.train", a.recipe, *ov], env=_env(a.accelerator), cwd=REPO, capture_output=True, text=True
    )
    if p.returncode:
        sys.exit(f"loop run failed:\n{p.stderr[-3000:]}")
    recs = [json.loads(x) for x in (rd / "metrics.jsonl").read_text().splitlines()]
    pts = [(r["step"], r["time"]) for r in recs if "train/loss" in r][a.skip :]
    per_step = [(t1 - t0) / (s1 - s0) for (s0, t0), (s1, t1) in zip(pts, pts[1:])]
    step_s = statistics.median(per_step)
    last = [r for r in recs if "train/loss" in r][-1]
    return {
        "img_per_s": a.micro_batch * a.ranks / step_s,
        "step_time_s": step_s,
        "windows": len(per_step),
        "mfu": last.get("perf/mfu"),
        "mem_peak_gb": last.get("perf/mem_peak_gb"),
        "data_wait": {k: v for k, v in last.items() if k.startswith("data/")},
    }


def run_bench(a, data: str) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "mimscale.cli",
        "bench",
        "throughput",
        "--recipe",
        a.recipe,
        "--zero",
        str(a.zero),
        "--micro-batch",
        str(a.micro_batch),
        "--steps",
        str(a.steps),
        "--warmup",
        str(a.skip * a.log_every),
        "--world-size",
        str(a.ranks),
        "--data",
        data,
        "--set",
        f"data.num_workers={a.workers}",
        *[x for o in _common(a) for x in ("--set", o)],
    ]
    p = subprocess.run(cmd, env=_env(a.accelerator), cwd=REPO, capture_output=True, text=True)
    rows = [json.loads(x) for x in p.stdout.splitlines() if x.startswith("{")]
    if p.returncode or not rows:
        sys.exit(f"bench failed:\n{p.stderr[-3000:]}")
    r = rows[-1]
    return {k: r.get(k) for k in ("img_per_s", "step_time_s", "mfu", "mem_peak_gb", "device_name")}


def generate_shards(n: int, work: Path, size: int = 320) -> str:
    """``n`` smooth random colour fields as JPEGs (q 90) in 10 classes, sharded by ``mimscale data``'s writer."""
    import numpy as np
    from PIL import Image

    from mimscale.data.shards import write_folder

    src, out = work / "gen_images", work / "gen_shards"
    rng = np.random.default_rng(0)
    for i in range(n):
        d = src / f"c{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        low = rng.random((size // 32, size // 32, 3)) * 255
        img = Image.fromarray(low.astype("uint8")).resize((size, size), Image.BICUBIC)
        img.save(d / f"{i:06d}.jpg", quality=90)
    return str(write_folder(src, out, shard_size=512, progress=False))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default="tiny_cpu")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--micro-batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=150, help="timed steps per contender and repeat")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--skip", type=int, default=2, help="warm-up logging windows (bench: as many steps)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--zero", type=int, default=1)
    ap.add_argument(
        "--accelerator",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="where both contenders train (auto: CUDA when available)",
    )
    ap.add_argument("--precision", default=None, help="default: the recipe's")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for both contenders")
    ap.add_argument("--data", default=None, help="shard directory (default: Fashion-MNIST, converted on first use)")
    ap.add_argument("--generate", type=int, default=0, metavar="N", help="generate N JPEGs as the shards instead")
    ap.add_argument("--no-synthetic", action="store_true", help="skip the synthetic-batch bench (context only)")
    ap.add_argument("--name", default="loop_overhead", help="results file name stem")
    ap.add_argument("--out-dir", default=None, help="write the results JSON here instead of benchmarks/results")
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    a.accelerator = resolve_accelerator(a.accelerator)
    print(f"accelerator: {a.accelerator}", flush=True)
    sys.path.insert(0, str(REPO))
    from mimscale.data import builtin

    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        if a.generate:
            shards = generate_shards(a.generate, Path(tmp))
        else:
            shards = a.data or builtin.resolve("fashion-mnist:train", "~/.cache/mimscale/data")
        for i in range(a.repeats):
            order = ["loop", "bench", "synthetic"] if i % 2 == 0 else ["synthetic", "bench", "loop"]
            if a.no_synthetic:
                order.remove("synthetic")
            got = {}
            for who in order:
                got[who] = (
                    run_loop(a, shards, Path(tmp), i)
                    if who == "loop"
                    else run_bench(a, shards if who == "bench" else "synthetic")
                )
                print(f"repeat {i} {who:9s} {got[who]['img_per_s']:8.1f} img/s", flush=True)
            got["ratio_loop_over_bench"] = got["loop"]["img_per_s"] / got["bench"]["img_per_s"]
            if "synthetic" in got:
                got["ratio_loop_over_synthetic"] = got["loop"]["img_per_s"] / got["synthetic"]["img_per_s"]
            rounds.append(got)
    ratio = statistics.median(r["ratio_loop_over_bench"] for r in rounds)
    synth = statistics.median(r["ratio_loop_over_synthetic"] for r in rounds) if not a.no_synthetic else None
    verdict = "MET" if ratio >= 0.97 else "MISSED"
    print(f"loop / bench (same shards, same loader): {ratio:.3f}  (target >= 0.97: {verdict})")
    if synth is not None:
        print(f"loop / bench (synthetic batches, loader excluded): {synth:.3f}  (context)")
    loop = rounds[len(rounds) // 2]["loop"]
    if loop.get("mfu") is not None:
        print(
            f"loop: {loop['img_per_s']:.1f} img/s, MFU {100 * loop['mfu']:.1f}%, peak memory "
            f"{loop['mem_peak_gb']:.2f} GB"
        )
    if not a.no_write:
        out = write_results(
            a.name,
            {
                "config": {k: v for k, v in vars(a).items() if k != "no_write"},
                "rounds": rounds,
                "ratio_loop_over_bench": ratio,
                "ratio_loop_over_synthetic": synth,
                "target": 0.97,
                "verdict": verdict,
            },
            out_dir=a.out_dir,
        )
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
