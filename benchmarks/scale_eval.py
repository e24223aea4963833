"""Evaluation, teachers and cached targets at ImageNet scale: today's path vs the sharded path, side by side.

Runs on W gloo ranks (re-launches itself under ``torchrun --standalone``), at reduced size with synthetic
features of the real width, then extrapolates to full ImageNet-1k (1,281,167 train / 50,000 val) on 8 GPUs.

* **kNN** (ViT-L, D=1024, 1/20 of ImageNet-1k by default): *old* = every rank gathers the whole bank and the
  queries to the host and scores all queries against all of it (the code before the sharded kNN);
  *new* = :func:`mimscale.eval.knn.knn_predict_sharded` on the rank's bank shard. Both paths' predictions are
  compared (must agree).
* **linear probe features**: the same features: *old* gathers them on every process, *new* keeps the shard.
* **k-CLIP k-means** (CLIP ViT-B/16 patch features, D=512): *old* = one process on the CPU, the teacher re-run
  on every pass (1 + iters teacher passes); *new* = each rank writes its share to the memory-mapped
  :class:`~mimscale.teachers.kmeans.FeatureCache` once, then collective :func:`fit_streaming` over it. The k-means
  part runs for real on synthetic features (both paths, same points, centroids compared); the teacher part is
  the measured time of one forward of a ViT-B/16-sized encoder per image times the passes each path makes.
* **EMA teacher at ZeRO-3** (ViT-L by default): *old* = gather each parameter's full fp32 master
  (one all-gather per parameter, as ``safe_get_full_fp32_param``) and update a replicated teacher; *new* =
  :class:`~mimscale.teachers.ema.EMATeacher` on this rank's partition (``master_shards``) plus the gathers its
  forward makes. Teacher bytes held per rank are counted exactly.
* **add-targets**: not re-run here (its cost is the teacher forward, split evenly: rank r writes shards
  r, r+W, ...): the row is the teacher work per rank, 1 process vs 8.

Memory per rank: the peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs`` before each
measured call) minus the resident set before it; for the EMA teacher also the exact bytes it holds. Times:
wall-clock on this machine, interleaved old/new with the order rotating per repeat; the median ratio is the
result. Extrapolation: memory by the byte formulas (scaled by measured/formula at the reduced size), time by
FLOPs: old CPU paths at this machine's measured rate per rank, new device paths at ``--gpu-tflops`` (an
ASSUMPTION, printed: sustained fp32 matmul throughput of one GPU).

Run:   python benchmarks/scale_eval.py               (re-launches itself: torchrun --standalone --nproc_per_node 2)
       python benchmarks/scale_eval.py --scale 100 --ema-arch vit_base      (smaller, faster)
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import REPO, write_results

IN1K_TRAIN, IN1K_VAL, GPUS = 1_281_167, 50_000, 8
PATCHES_B16 = 196  # 224 px / 16
MIB = 2**20


def _status() -> tuple[int, int]:
    s = Path("/proc/self/status").read_text()
    return (int(re.search(r"VmHWM:\s+(\d+)", s).group(1)) * 1024, int(re.search(r"VmRSS:\s+(\d+)", s).group(1)) * 1024)


def measured(fn):
    """``(result, seconds, peak extra resident bytes)`` of ``fn()`` on this process."""
    import gc

    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident set to the current one
    base = _status()[1]
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    return out, dt, max(0, _status()[0] - base)


def barrier():
    import torch.distributed as tdist

    tdist.barrier()


def all_max(x: float) -> float:
    import torch
    import torch.distributed as tdist

    t = torch.tensor([float(x)], dtype=torch.float64)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return float(t)


def interleaved(contenders: dict, repeats: int) -> dict:
    """Run each contender ``repeats`` times, order rotating; per name: seconds and bytes (max over ranks)."""
    names = list(contenders)
    out = {n: {"seconds": [], "bytes": [], "result": None} for n in names}
    for r in range(repeats):
        for n in names if r % 2 == 0 else names[::-1]:
            barrier()
            res, dt, mem = measured(contenders[n])
            out[n]["seconds"].append(all_max(dt))
            out[n]["bytes"].append(all_max(mem))
            out[n]["result"] = res
    return out


# ----------------------------------------------------------------------------- kNN (+ linear probe features)


def bench_knn(args, rank: int, world: int) -> dict:
    import torch
    import torch.distributed as tdist
    import torch.nn.functional as F

    from mimscale.eval.knn import knn_predict, knn_predict_sharded

    n = math.ceil(IN1K_TRAIN / args.scale)
    m = math.ceil(IN1K_VAL / args.scale)
    lo, hi = rank * n // world, (rank + 1) * n // world
    qlo, qhi = rank * m // world, (rank + 1) * m // world
    g = torch.Generator().manual_seed(rank)
    centres = torch.randn(args.classes, args.dim, generator=torch.Generator().manual_seed(99))
    ytr = torch.randint(args.classes, (hi - lo,), generator=g)
    xtr = centres[ytr] + 4 * torch.randn(hi - lo, args.dim, generator=g)  # this rank's bank rows
    yte = torch.randint(args.classes, (qhi - qlo,), generator=g)
    xte = centres[yte] + 4 * torch.randn(qhi - qlo, args.dim, generator=g)

    def gather(t):
        sizes = [torch.zeros(1, dtype=torch.long) for _ in range(world)]
        tdist.all_gather(sizes, torch.tensor([t.shape[0]]))
        w = int(max(s.item() for s in sizes))
        pad = torch.zeros((w, *t.shape[1:]), dtype=t.dtype)
        pad[: t.shape[0]] = t
        out = [torch.zeros_like(pad) for _ in range(world)]
        tdist.all_gather(out, pad)
        return torch.cat([o[: int(s)] for o, s in zip(out, sizes)])

    def old():  # the code before: gather everything, score everything
        bank, labels, q = gather(xtr), gather(ytr), gather(xte)
        pred = knn_predict(bank, labels, q, args.classes, args.k)
        return pred[qlo:qhi]

    xtr_n, xte_n = F.normalize(xtr, dim=1), F.normalize(xte, dim=1)  # KNNEvaluator keeps unit rows

    def new():
        return knn_predict_sharded(xtr_n, ytr, xte_n, args.classes, args.k, chunk=args.chunk, normalized=True)

    def old_features():  # linear probe before: gather the features everywhere
        return gather(xtr).shape[0]

    def new_features():
        return xtr.clone().shape[0]

    res = interleaved({"old": old, "new": new}, args.repeats)
    feats = interleaved({"old": old_features, "new": new_features}, 1)
    agree = float((res["old"]["result"] == res["new"]["result"]).float().mean())
    flops_old = 2.0 * m * n * args.dim  # per rank: every rank scores all queries vs the bank
    rate = flops_old / statistics.median(res["old"]["seconds"])
    return {
        "bank": n,
        "queries": m,
        "dim": args.dim,
        "rows_per_rank": hi - lo,
        "agreement": all_max(1 - agree),
        "flops_per_rank_old": flops_old,
        "flops_per_rank_new": flops_old / world,
        "cpu_flops_per_s": rate,
        "old": {k: v for k, v in res["old"].items() if k != "result"},
        "new": {k: v for k, v in res["new"].items() if k != "result"},
        "features_old_bytes": feats["old"]["bytes"][0],
        "features_new_bytes": feats["new"]["bytes"][0],
    }


# ----------------------------------------------------------------------------- k-means (k-CLIP)


def teacher_seconds_per_image(args) -> float:
    """One forward of a ViT-B/16-sized encoder (the CLIP ViT-B/16 image tower's FLOPs) per image, this CPU."""
    import torch

    from mimscale.models.vit import build_vit

    enc = build_vit("vit_base", 224, 16).eval()
    x = torch.randn(args.teacher_batch, 3, 224, 224)
    with torch.no_grad():
        enc.forward_features(x[:1])
        t0 = time.perf_counter()
        enc.forward_features(x)
    return (time.perf_counter() - t0) / args.teacher_batch


def bench_kmeans(args, rank: int, world: int, tmp: Path) -> dict:
    import torch

    from mimscale.teachers.kmeans import FeatureCache, fit_streaming

    n, d, chunk = args.km_points, args.km_dim, 16384
    centres = torch.randn(256, d, generator=torch.Generator().manual_seed(7)) * 3

    def rows(lo: int, hi: int):  # the same synthetic "teacher features" for both paths
        for s in range(lo, hi, chunk):
            e = min(hi, s + chunk)
            g = torch.Generator().manual_seed(1000 + s // chunk)
            idx = torch.randint(256, (e - s,), generator=g)
            yield centres[idx] + torch.randn(e - s, d, generator=g)

    lo, hi = (rank * n // world) // chunk * chunk, ((rank + 1) * n // world) // chunk * chunk if rank < world - 1 else n
    kw = dict(k=args.km_k, iters=args.km_iters, init_sample=args.km_sample, seed=0, tol=0.0)

    def old():  # one process; the stream is re-made (re-encoded) every pass
        if rank != 0:
            return None
        return fit_streaming(lambda: rows(0, n), **kw)

    def new():
        fc = FeatureCache(tmp / "km", rank, world, d, "float32", {"bench": 1})
        fc.write(rows(lo, hi))
        out = fit_streaming(lambda: fc.chunks(chunk, torch.device("cpu")), offset=lo, collective=True, **kw)
        fc.remove()
        return out

    res = interleaved({"old": old, "new": new}, args.repeats)
    diff = 0.0
    if rank == 0:
        diff = float((res["old"]["result"][0] - res["new"]["result"][0]).abs().max())
    t_img = teacher_seconds_per_image(args) if rank == 0 else 0.0
    passes = res["new"]["result"][1]["passes"]
    return {
        "points": n,
        "dim": d,
        "k": args.km_k,
        "iters": passes,
        "centroid_max_abs_diff": all_max(diff),
        "teacher_s_per_image_cpu": all_max(t_img),
        "flops_assign_per_pass": 2.0 * n * args.km_k * d,
        "old": {k: v for k, v in res["old"].items() if k != "result"},
        "new": {k: v for k, v in res["new"].items() if k != "result"},
    }


# ----------------------------------------------------------------------------- EMA teacher at ZeRO-3


def bench_ema(args, rank: int, world: int) -> dict:
    import torch
    import torch.distributed as tdist

    from mimscale.models.vit import build_vit
    from mimscale.objectives.base import StepContext
    from mimscale.teachers.ema import EMATeacher

    torch.manual_seed(0)
    student = build_vit(args.ema_arch, 64, 16).requires_grad_(True)
    params = dict(student.named_parameters())
    numel = sum(p.numel() for p in params.values())
    part = {
        n: (lambda f, p: f[rank * p : (rank + 1) * p].clone())(
            torch.nn.functional.pad(q.detach().reshape(-1), (0, -(-q.numel() // world) * world - q.numel())),
            -(-q.numel() // world),
        )
        for n, q in params.items()
    }  # this rank's fp32 master slices
    shards_ctx = StepContext(master_shards=lambda m: list(part.items()))
    new_t = EMATeacher(student)
    new_t.update(shards_ctx, None, 1.0)  # the first call partitions the teacher (m = 1: no change)
    old_t = EMATeacher(student)
    del student, params

    def full_masters(module):  # what safe_get_full_fp32_param does: 1 all-gather / param
        for n, q in old_t.module.named_parameters():
            p = part[n]
            buf = torch.empty(world * p.numel())
            tdist.all_gather(list(buf.view(world, -1).unbind(0)), p)
            yield n, buf[: q.numel()].view(q.shape)

    full_ctx = StepContext(master_params=full_masters)
    x = torch.randn(1, 3, 64, 64)

    def old():
        old_t.update(full_ctx, None, 0.999)
        with torch.no_grad():
            return old_t.module.forward_features(x)

    def new():
        new_t.update(shards_ctx, None, 0.999)
        with torch.no_grad():
            return new_t.module.forward_features(x)  # the submodules' gathers run in here

    def fwd_only_old():
        with torch.no_grad():
            return old_t.module.forward_features(x)

    res = interleaved({"old": old, "new": new, "forward": fwd_only_old}, args.repeats)
    diff = all_max(float((res["old"]["result"] - res["new"]["result"]).abs().max()))
    return {
        "arch": args.ema_arch,
        "params": numel,
        "teacher_bytes_old": 4 * numel,
        "teacher_bytes_new": 4 * new_t.local_numel(),
        "output_max_abs_diff": diff,
        **{k: {kk: vv for kk, vv in v.items() if kk != "result"} for k, v in res.items()},
    }


# ----------------------------------------------------------------------------- report


def med(x):
    return statistics.median(x)


def extrapolate(r: dict, args) -> list[dict]:
    """Rows: measured (reduced) and extrapolated (ImageNet-1k, 8 GPUs) per path."""
    gpu = args.gpu_tflops * 1e12
    rows = []
    k, world = r["knn"], r["world"]
    n, m, d = k["bank"], k["queries"], k["dim"]
    chunk_old, chunk_new = min(1024, m), min(args.chunk, m)
    # bytes a rank allocates in the call: old = bank and queries gathered (list + cat) and normalised + one
    # [1024, N] block; new = one [c, N/W] block + the gathered query chunk (the unit-length shard, as
    # KNNEvaluator extracts it, is resident before and after the call: added for the full size)
    form_old = lambda n_, m_: 4 * (3 * n_ * d + 3 * m_ * d + chunk_old * n_)  # noqa: E731
    form_new = lambda n_, w: 4 * (chunk_new * n_ / w + 2 * chunk_new * d)  # noqa: E731
    full_flops = 2.0 * IN1K_VAL * IN1K_TRAIN * d
    rows.append(
        dict(
            step="kNN (ViT-L, D=1024)",
            reduced=f"1/{args.scale} IN-1k, {world} ranks",
            old_mem=med(k["old"]["bytes"]),
            new_mem=med(k["new"]["bytes"]),
            old_s=med(k["old"]["seconds"]),
            new_s=med(k["new"]["seconds"]),
            check=[med(k["old"]["bytes"]) / form_old(n, m), med(k["new"]["bytes"]) / form_new(n, world)],
            full_old_mem=form_old(IN1K_TRAIN, IN1K_VAL),
            full_new_mem=form_new(IN1K_TRAIN, GPUS) + 4 * IN1K_TRAIN * d / GPUS,
            full_old_s=full_flops / k["cpu_flops_per_s"],
            full_new_s=full_flops / GPUS / gpu,
            full_old_gpu_s=full_flops / gpu,
            note="old: host CPU, every rank the whole bank + matmul; new: bank/8 + one block on each GPU",
        )
    )
    rows.append(
        dict(
            step="linear-probe features (D=1024)",
            reduced=f"1/{args.scale} IN-1k, {world} ranks",
            old_mem=k["features_old_bytes"],
            new_mem=k["features_new_bytes"],
            old_s=None,
            new_s=None,
            full_old_mem=4 * IN1K_TRAIN * d,
            full_new_mem=4 * IN1K_TRAIN * d / GPUS,
            full_old_s=None,
            full_new_s=None,
            note="old: gathered on every process; new: each process its shard",
        )
    )
    km = r["kmeans"]
    pts_full = IN1K_TRAIN * PATCHES_B16
    t_img = km["teacher_s_per_image_cpu"]
    teacher_flops = 2 * 86e6 * PATCHES_B16 * 1.0 + 4 * 12 * PATCHES_B16**2 * 768  # ~ ViT-B/16 fwd per image
    cpu_rate_teacher = teacher_flops / t_img
    iters = km["iters"]
    km_flops_full = 2.0 * pts_full * 8192 * 512 * iters
    km_rate_cpu = km["flops_assign_per_pass"] * km["iters"] / med(km["old"]["seconds"])
    old_full_s = (1 + iters) * IN1K_TRAIN * teacher_flops / cpu_rate_teacher + km_flops_full / km_rate_cpu
    new_full_s = IN1K_TRAIN * teacher_flops / GPUS / gpu + km_flops_full / GPUS / gpu
    rows.append(
        dict(
            step="k-CLIP k-means (k=8192, D=512)",
            reduced=f"{km['points']} pts, k={km['k']}, {world} ranks (+teacher {1 + iters} vs 1 pass)",
            old_mem=med(km["old"]["bytes"]),
            new_mem=med(km["new"]["bytes"]),
            old_s=med(km["old"]["seconds"]) + (1 + iters) * km["points"] / PATCHES_B16 * t_img,
            new_s=med(km["new"]["seconds"]) + km["points"] / PATCHES_B16 * t_img / world,
            full_old_mem=4 * 512 * (163_840 + 256 * PATCHES_B16) + 4 * 16384 * 8192,
            full_new_mem=4 * 512 * (163_840 + 65_536) + 4 * 16384 * 8192,
            full_old_s=old_full_s,
            full_new_s=new_full_s,
            full_old_gpu_s=(1 + iters) * IN1K_TRAIN * teacher_flops / gpu + km_flops_full / gpu,
            note=f"new also writes {pts_full * 512 * 2 / GPUS / 2**30:.0f} GiB fp16 cache per GPU (disk)",
        )
    )
    e = r["ema"]
    vitl = 304_326_632
    rows.append(
        dict(
            step=f"EMA teacher, ZeRO-3 ({e['arch']})",
            reduced=f"{world} ranks, fp32 teacher",
            old_mem=e["teacher_bytes_old"],
            new_mem=e["teacher_bytes_new"],
            old_s=med(e["old"]["seconds"]) - med(e["forward"]["seconds"]),
            new_s=med(e["new"]["seconds"]) - med(e["forward"]["seconds"]),
            full_old_mem=4 * vitl,
            full_new_mem=4 * vitl / GPUS,
            full_old_s=(med(e["old"]["seconds"]) - med(e["forward"]["seconds"])) * vitl / e["params"],
            full_new_s=(med(e["new"]["seconds"]) - med(e["forward"]["seconds"])) * vitl / e["params"],
            note="per step on this CPU, update (+ new: the forward's gathers), forward compute excluded, "
            "ViT-L time = measured x params ratio; both gather ~ one teacher per step",
        )
    )
    rows.append(
        dict(
            step="add-targets (CLIP B/16 features)",
            reduced="analytic",
            old_mem=None,
            new_mem=None,
            old_s=None,
            new_s=None,
            full_old_mem=None,
            full_new_mem=None,
            full_old_s=IN1K_TRAIN * teacher_flops / cpu_rate_teacher,
            full_new_s=IN1K_TRAIN * teacher_flops / GPUS / gpu,
            full_old_gpu_s=IN1K_TRAIN * teacher_flops / gpu,
            note="old: 1 CPU process; new: 8 GPU processes, rank r writes shards r, r+8, ...",
        )
    )
    return rows


def fmt_b(b):
    return "-" if b is None else (f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / MIB:.1f} MiB")


def fmt_s(s):
    if s is None:
        return "-"
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.1f} min" if s >= 120 else f"{s:.2f} s"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=int, default=20, help="kNN bank/queries = ImageNet-1k / SCALE (default: 20)")
    ap.add_argument("--dim", type=int, default=1024, help="kNN feature width (ViT-L: 1024)")
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--chunk", type=int, default=1024, help="sharded kNN: queries per step over all ranks")
    ap.add_argument("--km-points", type=int, default=131072, help="k-means feature vectors (default: %(default)s)")
    ap.add_argument("--km-dim", type=int, default=512, help="CLIP ViT-B/16 width")
    ap.add_argument("--km-k", type=int, default=1024)
    ap.add_argument("--km-iters", type=int, default=3)
    ap.add_argument("--km-sample", type=int, default=8192)
    ap.add_argument("--teacher-batch", type=int, default=2, help="images timed through the ViT-B/16 stand-in")
    ap.add_argument(
        "--ema-arch",
        default="vit_base",
        help="default: %(default)s (ViT-L figures scale by params: "
        "the shared 2-core box has too little free memory for 2 ranks x 3 ViT-L copies)",
    )
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument(
        "--gpu-tflops",
        type=float,
        default=50.0,
        help="ASSUMED sustained fp32 matmul TFLOP/s of one GPU for the extrapolation (default: 50)",
    )
    ap.add_argument("--ranks", type=int, default=2, help="ranks when self-launching (default: 2)")
    ap.add_argument("--only", default="knn,kmeans,ema", help="sections to run")
    ap.add_argument("--tag", default="", help="appended to the results file name (e.g. w3 for a 3-rank run)")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()

    from mimscale import dist

    d = dist.detect()
    if d.launcher == "none":
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={args.ranks}",
            str(Path(__file__).resolve()),
            *sys.argv[1:],
        ]
        print("+", " ".join(cmd), flush=True)
        return subprocess.run(cmd, cwd=REPO).returncode
    dist.export(d)
    dist.bind_device(d)  # this rank's GPU current before DeepSpeed starts (one GPU per task too)
    import torch
    import torch.distributed as tdist

    torch.set_num_threads(1)
    tdist.init_process_group("gloo")
    only = set(args.only.split(","))
    r = {"world": d.world_size}
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for name, fn in (("knn", bench_knn), ("kmeans", bench_kmeans), ("ema", bench_ema)):
            if name in only:
                t1 = time.time()
                r[name] = fn(args, d.rank, d.world_size, *([Path(tmp)] if name == "kmeans" else []))
                if d.rank == 0:
                    print(f"[{name}: {time.time() - t1:.0f} s]", file=sys.stderr, flush=True)
    tdist.destroy_process_group()
    if d.rank != 0:
        return 0
    rows = extrapolate(r, args) if {"knn", "kmeans", "ema"} <= only else []
    print(
        f"\n{d.world_size} gloo ranks, 1 thread each, {time.time() - t0:.0f} s; extrapolation: ImageNet-1k "
        f"({IN1K_TRAIN:,} / {IN1K_VAL:,}) on {GPUS} GPUs at an ASSUMED {args.gpu_tflops:g} TFLOP/s each"
    )
    head = f"{'step':<34} {'path':<4} {'mem/rank':>10} {'time':>9} | {'IN-1k mem/rank':>14} {'IN-1k time':>10}"
    print(head + "\n" + "-" * len(head))
    for row in rows:
        for p in ("old", "new"):
            print(
                f"{row['step'] if p == 'old' else '':<34} {p:<4} {fmt_b(row[p + '_mem']):>10} "
                f"{fmt_s(row[p + '_s']):>9} | {fmt_b(row['full_' + p + '_mem']):>14} "
                f"{fmt_s(row['full_' + p + '_s']):>10}"
            )
        ratio = [
            f"{name} old/new {a / b:.1f}x"
            for name, a, b in (
                ("mem", row["full_old_mem"], row["full_new_mem"]),
                ("time", row["full_old_s"], row["full_new_s"]),
            )
            if a and b
        ]
        if row.get("full_old_gpu_s"):
            gpu_x = row["full_old_gpu_s"] / row["full_new_s"]
            ratio.append(f"old moved to one GPU {fmt_s(row['full_old_gpu_s'])} = {gpu_x:.0f}x new")
        if row.get("check"):
            ratio.append("measured/formula bytes at reduced size old {:.2f}, new {:.2f}".format(*row["check"]))
        print(f"{'':<34} {'':<4} {row['reduced']}; {row['note']}" + (f"; IN-1k {', '.join(ratio)}" if ratio else ""))
    if "knn" in r:
        print(
            f"kNN old vs new predictions disagree on {100 * r['knn']['agreement']:.3f}% of queries; "
            f"k-means centroid max |diff| {r.get('kmeans', {}).get('centroid_max_abs_diff', float('nan')):.2e}; "
            f"EMA teacher output max |diff| {r.get('ema', {}).get('output_max_abs_diff', float('nan')):.2e}"
        )
    if not args.no_save:
        out = write_results(
            "scale_eval" + (f"_{args.tag}" if args.tag else ""), {"config": vars(args), "raw": r, "rows": rows}
        )
        print(f"-> {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
