"""EMAE's claim at CPU scale: MAE vs EMAE, same encoder, same wall-clock budget, kNN top-1 over time.

Protocol (both objectives alike):
  1. calibrate: a short run measures the objective's training throughput (img/s) on this machine;
  2. the main run gets ``epochs = budget x img/s / 60000`` so its cosine schedule ends at the budget
     (``train.max_minutes`` stops it there regardless), and evaluates kNN top-1 (5000-image bank,
     5000 test queries) every ``budget / evals`` minutes of *training* time (evaluation time excluded);
  3. results: ``benchmarks/results/emae_vs_mae-<machine>-<date>.json`` and an SVG plot of kNN top-1
     against training minutes, plus ``mimscale report`` over both runs.

Run:  python benchmarks/emae_vs_mae.py [--minutes 4] [--evals 4] [--out runs/emae_vs_mae] [--ablations]
``--ablations`` adds two EMAE arms in the same run: ``emae_sc0`` (``objective.sc_weight=0``: the K parts
without the self-consistency term) and ``emae_k2`` (``objective.num_parts=2``: half the parts).
The runs are sequential: keep the machine otherwise idle, since wall-clock is what is compared.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mimscale.report.svg import Series, line_chart  # noqa: E402
from mimscale.telemetry import read_jsonl  # noqa: E402

FMNIST_TRAIN = 60000


def pretrain(run_dir: Path, objective: str, extra: list[str]) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "mimscale.cli",
        "pretrain",
        "tiny_cpu",
        f"objective.name={objective}",
        f"train.run_dir={run_dir}",
        "log.wandb=disabled",
        *extra,
    ]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)
    return json.loads((run_dir / "summary.json").read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=4.0, help="training budget per objective")
    ap.add_argument("--evals", type=int, default=4, help="kNN evaluations during training (plus init and end)")
    ap.add_argument("--out", default="runs/emae_vs_mae")
    ap.add_argument("--ablations", action="store_true", help="also EMAE with sc_weight=0 and with num_parts=2")
    args = ap.parse_args()
    out = REPO / args.out
    knn = ["eval.knn_train_samples=5000", "eval.knn_test_samples=5000"]
    results = {}
    arms = [("mae", "mae", []), ("emae", "emae", [])]
    if args.ablations:
        arms += [("emae_sc0", "emae", ["objective.sc_weight=0"]), ("emae_k2", "emae", ["objective.num_parts=2"])]
    for label, objective, knobs in arms:
        cal = pretrain(
            out / f"{label}_calibrate",
            objective,
            ["train.max_steps=60", "eval.knn_at_start=false", "eval.knn_train=null", "eval.knn_test=null", *knobs],
        )
        img_s = cal["img_per_s"]
        epochs = args.minutes * 60 * img_s / FMNIST_TRAIN
        run_dir = out / label
        s = pretrain(
            run_dir,
            objective,
            [
                f"train.epochs={epochs:.4f}",
                f"train.max_minutes={args.minutes}",
                f"eval.knn_every_minutes={args.minutes / (args.evals + 1):.4f}",
                *knn,
                *knobs,
            ],
        )
        curve = [
            (r["time/train_s"] / 60, r["eval/knn_top1"])
            for r in read_jsonl(run_dir / "metrics.jsonl")
            if "eval/knn_top1" in r
        ]
        results[label] = {
            "knobs": knobs,
            "calibrated_img_per_s": img_s,
            "epochs_planned": epochs,
            "steps": s["steps"],
            "images_seen": s["steps"] * 128,
            "img_per_s": s["img_per_s"],
            "flops_per_sample": s["flops_per_sample"],
            "train_minutes": s["train_seconds"] / 60,
            "knn_top1_init": s.get("knn_top1_init"),
            "knn_top1_final": s.get("knn_top1_final"),
            "curve_minutes_top1": curve,
        }
        print(label, json.dumps({k: v for k, v in results[label].items() if k != "curve_minutes_top1"}))

    # who reached what, when: the first training minute at which each objective reached the other's final
    for a, b in (("mae", "emae"), ("emae", "mae")):
        target = results[b]["knn_top1_final"]
        hit = next((m for m, acc in results[a]["curve_minutes_top1"] if acc >= target), None)
        results[a][f"minutes_to_{b}_final"] = hit

    stamp = dt.date.today().isoformat()
    res_dir = REPO / "benchmarks" / "results"
    res_dir.mkdir(parents=True, exist_ok=True)
    name = f"emae_vs_mae{'_ablations' if args.ablations else ''}-{platform.node() or 'machine'}-{stamp}"
    doc = {
        "benchmark": "emae_vs_mae",
        "date": stamp,
        "machine": platform.processor() or platform.machine(),
        "budget_minutes": args.minutes,
        "recipe": "tiny_cpu (vit_micro, Fashion-MNIST, 1 CPU process)",
        "results": results,
    }
    (res_dir / f"{name}.json").write_text(json.dumps(doc, indent=2))
    svg = line_chart(
        [Series(o, i, results[o]["curve_minutes_top1"]) for i, o in enumerate(results)],
        chart_id="emae_vs_mae",
        title="kNN top-1 vs training minutes (same budget)",
        x_label="training minutes (evaluation excluded)",
        y_label="kNN top-1 (%)",
        markers=True,
    )
    (res_dir / f"{name}.svg").write_text(svg)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "mimscale.cli",
            "report",
            *(str(out / label) for label, _, _ in arms),
            "--out",
            str(out),
        ],
        check=True,
        cwd=REPO,
    )
    print(f"wrote {res_dir / name}.json and .svg; report: {out / 'report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
