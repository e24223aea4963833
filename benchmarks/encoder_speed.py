"""Encoder speed: our ViT (mimscale.models.vit) vs timm's VisionTransformer, forward + backward.

For each shape, our encoder is built with ``build_vit(arch, img, patch)``; timm's
``timm.models.vision_transformer.VisionTransformer(**timm_kwargs(ours))`` gets our weights with a strict
``load_state_dict`` (so the two compute the same function: the max output difference is printed).
One step is ``forward_features(x)`` on all tokens (cls + N patches, no masking) -> ``out.float().square().mean()``
-> ``backward()`` with fresh (None) grads, in train mode, same dtype for both (fp32 by default; ``--dtype bf16``
casts both models and inputs -- slow on CPUs without AVX512-BF16/AMX, and this box has neither).

Timing is interleaved: each repeat times a block of ``--steps`` steps of each model, the order alternating
(ABBA); the figure is the median over repeats of ``ours step time / timm step time`` (target <= 1.0).
Absolute step times are shown for context only (shared, noisy machine).

Run:   python benchmarks/encoder_speed.py                     (vit_micro 32/4 B128 and vit_tiny 64/8 B32: ~1 min)
       python benchmarks/encoder_speed.py --shapes vit_base:224:16:8 --repeats 5
       python benchmarks/encoder_speed.py --threads 2             (only on an otherwise idle machine)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SHAPES = "vit_micro:32:4:128,vit_tiny:64:8:32"


from common import write_results  # noqa: E402


def parse_shapes(text: str) -> list[tuple[str, int, int, int]]:
    shapes = []
    for item in text.split(","):
        parts = item.strip().split(":")
        if len(parts) != 4:
            raise SystemExit(f"--shapes item '{item}' must be ARCH:IMG:PATCH:BATCH, e.g. vit_tiny:64:8:32")
        shapes.append((parts[0], int(parts[1]), int(parts[2]), int(parts[3])))
    return shapes


def bench_shape(arch: str, img: int, patch: int, batch: int, dtype, args) -> dict:
    import torch
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    from mimscale.models.vit import build_vit, timm_kwargs

    torch.manual_seed(0)
    ours = build_vit(arch, img, patch)
    theirs = TimmViT(**timm_kwargs(ours))
    theirs.load_state_dict(ours.state_dict(), strict=True)
    ours.to(dtype).train()
    theirs.to(dtype).train()
    x = torch.randn(batch, 3, img, img, generator=torch.Generator().manual_seed(0)).to(dtype)
    with torch.no_grad():
        out_diff = (ours.forward_features(x).float() - theirs.forward_features(x).float()).abs().max().item()
    params = sum(p.numel() for p in ours.parameters())

    def step(model) -> None:
        model.zero_grad(set_to_none=True)
        model.forward_features(x).float().square().mean().backward()

    models = {"ours": ours, "timm": theirs}
    for _ in range(args.warmup):
        for m in models.values():
            step(m)
    times: dict[str, list[float]] = {k: [] for k in models}
    for r in range(args.repeats):
        for name in list(models) if r % 2 == 0 else list(reversed(models)):
            t = time.perf_counter()
            for _ in range(args.steps):
                step(models[name])
            times[name].append((time.perf_counter() - t) / args.steps)
    with torch.no_grad():
        tp = dict(theirs.named_parameters())
        grad_diff = max(
            (p.grad.float() - tp[k].grad.float()).abs().max().item()
            for k, p in ours.named_parameters()
            if p.grad is not None
        )
    ratios = [a / b for a, b in zip(times["ours"], times["timm"])]
    return {
        "arch": arch,
        "img": img,
        "patch": patch,
        "batch": batch,
        "tokens": (img // patch) ** 2 + 1,
        "params": params,
        "step_time_s": times,
        "ratios_ours_over_timm": ratios,
        "ratio_ours_over_timm": statistics.median(ratios),
        "median_ms": {k: 1000 * statistics.median(v) for k, v in times.items()},
        "max_abs_output_diff": out_diff,
        "max_abs_grad_diff": grad_diff,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--shapes", default=DEFAULT_SHAPES, help="comma-separated ARCH:IMG:PATCH:BATCH (default: %(default)s)"
    )
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="default: %(default)s")
    ap.add_argument("--steps", type=int, default=3, help="steps per timed block (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=10, help="interleaved blocks per model (default: %(default)s)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per model first (default: %(default)s)")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch/OpenMP threads (default: %(default)s; on a shared, loaded 2-core box 2 threads "
        "spin against other jobs and run ~10x slower and far noisier)",
    )
    ap.add_argument("--no-save", action="store_true", help="do not write benchmarks/results/*.json")
    args = ap.parse_args()
    shapes = parse_shapes(args.shapes)

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import timm
    import torch

    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    rows = [bench_shape(*s, dtype, args) for s in shapes]

    print(
        f"\nforward+backward, all tokens, {args.dtype}, {args.threads} thread(s); "
        f"{args.repeats} interleaved repeats x {args.steps} steps; timm {timm.__version__}, torch {torch.__version__}"
    )
    print(f"{'shape':<22} {'params':>8} {'ours ms':>9} {'timm ms':>9} {'ours/timm':>10} {'IQR':>13} {'max|dy|':>9}")
    for r in rows:
        q = statistics.quantiles(r["ratios_ours_over_timm"], n=4)
        print(
            f"{r['arch']}/{r['patch']} {r['img']}px B{r['batch']:<5}".ljust(22)
            + f" {r['params'] / 1e6:>7.2f}M {r['median_ms']['ours']:>9.1f} {r['median_ms']['timm']:>9.1f}"
            f" {r['ratio_ours_over_timm']:>10.3f} {q[0]:>6.3f}-{q[2]:<6.3f} {r['max_abs_output_diff']:>9.1e}"
        )
    worst_row = max(rows, key=lambda r: r["ratio_ours_over_timm"])
    worst = worst_row["ratio_ours_over_timm"]
    q1 = statistics.quantiles(worst_row["ratios_ours_over_timm"], n=4)[0]
    verdict = "OK" if worst <= 1.0 else ("TIE (within noise: the IQR reaches 1.0)" if q1 <= 1.0 else "MISSED")
    print(f"ratio ours/timm step time (median per shape; target <= 1.0): worst {worst:.3f} -> {verdict}")

    if not args.no_save:
        out = write_results(
            "encoder_speed",
            {
                "config": {**vars(args), "timm": timm.__version__, "torch": torch.__version__},
                "results": rows,
                "worst_ratio_ours_over_timm": worst,
                "target": "<= 1.0",
                "met": worst <= 1.0,
                "verdict": verdict,
                "caveat": "shared, noisy 2-core machine: only the interleaved ratio is meaningful",
            },
        )
        print(f"wrote {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
