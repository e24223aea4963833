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


def _env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_",
                                                                   "SLURM_", "TORCHELASTIC"))}
    e.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled", WANDB_SILENT="true", DS_ACCELERATOR="cpu",
             PYTHONUNBUFFERED="1")
    return e


def _torchrun(ranks: int) -> list[str]:
    return [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={ranks}"]


def run_loop(a, shards: str, work: Path, i: int) -> dict:
    rd = work / f"loop{i}"
    ov = [f"data.train={shards}", f"train.max_steps={a.steps + a.skip * a.log_every}",
          f"train.log_every={a.log_every}", f"train.run_dir={rd}", "train.resume=never", "train.save_every=0",
          "train.save_every_minutes=null", "eval.knn_train=null", "eval.knn_test=null", "log.wandb=disabled",
          f"train.batch_size={a.micro_batch * a.ranks}", f"train.micro_batch_size={a.micro_batch}",
          f"data.num_workers={a.workers}"]
    p = subprocess.run([*_torchrun(a.ranks), "-m", "mimscale.train", a.recipe, *ov], env=_env(), cwd=REPO,
                       capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"loop run failed:\n{p.stderr[-3000:]}")
    recs = [json.loads(x) for x in (rd / "metrics.jsonl").read_text().splitlines()]
    pts = [(r["step"], r["time"]) for r in recs if "train/loss" in r][a.skip:]
    per_step = [(t1 - t0) / (s1 - s0) for (s0, t0), (s1, t1) in zip(pts, pts[1:])]
    step_s = statistics.median(per_step)
    return {"img_per_s": a.micro_batch * a.ranks / step_s, "step_time_s": step_s, "windows": len(per_step)}


def run_bench(a, data: str) -> dict:
    cmd = [sys.executable, "-m", "mimscale.cli", "bench", "throughput", "--recipe", a.recipe, "--zero", "1",
           "--micro-batch", str(a.micro_batch), "--steps", str(a.steps), "--warmup", str(a.skip * a.log_every),
           "--world-size", str(a.ranks), "--data", data, "--set", f"data.num_workers={a.workers}"]
    p = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True)
    rows = [json.loads(x) for x in p.stdout.splitlines() if x.startswith("{")]
    if p.returncode or not rows:
        sys.exit(f"bench failed:\n{p.stderr[-3000:]}")
    return {"img_per_s": rows[-1]["img_per_s"], "step_time_s": rows[-1]["step_time_s"]}


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
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from mimscale.data import builtin

    shards = builtin.resolve("fashion-mnist:train", "~/.cache/mimscale/data")
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.repeats):
            order = ("loop", "bench", "synthetic") if i % 2 == 0 else ("synthetic", "bench", "loop")
            got = {}
            for who in order:
                got[who] = run_loop(a, shards, Path(tmp), i) if who == "loop" else \
                    run_bench(a, shards if who == "bench" else "synthetic")
                print(f"repeat {i} {who:9s} {got[who]['img_per_s']:8.1f} img/s", flush=True)
            got["ratio_loop_over_bench"] = got["loop"]["img_per_s"] / got["bench"]["img_per_s"]
            got["ratio_loop_over_synthetic"] = got["loop"]["img_per_s"] / got["synthetic"]["img_per_s"]
            rounds.append(got)
    ratio = statistics.median(r["ratio_loop_over_bench"] for r in rounds)
    synth = statistics.median(r["ratio_loop_over_synthetic"] for r in rounds)
    verdict = "MET" if ratio >= 0.97 else "MISSED"
    print(f"loop / bench (same shards, same loader): {ratio:.3f}  (target >= 0.97: {verdict})")
    print(f"loop / bench (synthetic batches, loader excluded): {synth:.3f}  (context)")
    if not a.no_write:
        out = write_results("loop_overhead", {
            "config": {k: v for k, v in vars(a).items() if k != "no_write"}, "rounds": rounds,
            "ratio_loop_over_bench": ratio, "ratio_loop_over_synthetic": synth, "target": 0.97, "verdict": verdict})
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
