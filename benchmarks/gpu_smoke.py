"""Every objective's B/16 recipe through the real Trainer on one GPU, in one short slot (run by gpu_smoke.sh).

Per objective (``mimscale.objectives.available()``, recipe ``<name>_vit_b16``): ``python -m mimscale.train`` at a
small batch, bf16, ZeRO-1, ``data.decode=auto`` (the device JPEG decode where the objective's transform allows it),
for two logging intervals; MAE once more at ZeRO-3. Then the save-on-signal path: MAE again, SIGUSR1 after its
first logged interval (save, exit 42), the same command again (resume), and the resumed losses compared with
the uninterrupted run's; the MAE run ends with a kNN evaluation. Data: generated JPEG shards (photo-like smooth
fields, 10 classes, no data set needed), DTM's teacher a randomly initialised CLIP ViT-B/16 in open_clip's layout
(made only when DTM is among the objectives), MaPeT's targets the tokenizer-free ``pixel_mean`` codes (no cached
k-CLIP codes on a bare machine).

Writes ``<out>/gpu_smoke-<machine>-<date>.json``: the machine (GPU name, driver, torch/CUDA), per run the
losses, img/s, decode path, exit codes, and the verdict. ``--cpu-smoke``: the same on the CPU with a micro ViT
on 32 px (the suite's check that the script itself works).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

# the micro stand-ins of the B/16 parts for --cpu-smoke (as the league's tiny members shrink them)
CPU_MODEL = ["model.arch=vit_micro", "model.img_size=32", "model.patch_size=4"]
CPU_KNOBS = {
    "mae": ["objective.decoder_dim=32", "objective.decoder_depth=1", "objective.decoder_heads=2"],
    "emae": ["objective.decoder_dim=32", "objective.decoder_depth=1", "objective.decoder_heads=2"],
    "mae_plus": [
        "objective.crop_size=16",
        "objective.decoder_dim=32",
        "objective.decoder_depth=1",
        "objective.decoder_heads=2",
    ],
    "adpe": [
        "objective.crop_size=16",
        "objective.decoder_dim=32",
        "objective.decoder_depth=1",
        "objective.decoder_heads=2",
    ],
    "conmim": ["objective.proj_hidden=256", "objective.proj_out=64"],
    "dtm": ["objective.head_dim=64", "objective.max_merges=64", "objective.num_masked=48"],
    "mapet": ["objective.vocab_size=256", "objective.least_context=16"],
}


def machine() -> dict:
    import torch

    info = {"host": platform.node(), "torch": torch.__version__, "cuda_build": torch.version.cuda}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info |= {
            "gpu": torch.cuda.get_device_name(0),
            "gpus": torch.cuda.device_count(),
            "memory_gb": round(p.total_memory / 2**30, 1),
            "capability": f"{p.major}.{p.minor}",
        }
        try:
            info["driver"] = (
                subprocess.run(
                    ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                    capture_output=True,
                    text=True,
                    timeout=30,
                )
                .stdout.split("\n")[0]
                .strip()
            )
        except (OSError, subprocess.SubprocessError):
            pass
    else:
        info["gpu"] = None
    return info


def make_teacher(path: Path, cpu: bool) -> Path:
    """A randomly initialised CLIP (ViT-B-16 on the GPU, the tiny test CLIP on the CPU) as a mimscale CLIP file."""
    from mimscale.teachers.clip import TINY_CLIP_ARCH, TINY_CLIP_CFG, build_clip, save_clip

    if cpu:
        cfg, arch = TINY_CLIP_CFG, TINY_CLIP_ARCH
    else:
        import open_clip

        cfg, arch = open_clip.get_model_config("ViT-B-16"), "ViT-B-16"
    model = build_clip(cfg)
    return save_clip(model, cfg, path, mean=(0.4815, 0.4578, 0.4082), std=(0.2686, 0.2613, 0.2758), arch=arch)


def free_port() -> int:
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        return sk.getsockname()[1]


def records(rd: Path) -> list[dict]:
    f = rd / "metrics.jsonl"
    return [json.loads(x) for x in f.read_text().splitlines() if x.strip()] if f.exists() else []


def losses(rd: Path) -> dict[int, float]:
    out: dict[int, float] = {}
    for r in records(rd):
        if "train/loss" in r:
            out[int(r["step"])] = float(r["train/loss"])  # a resumed run's records overwrite the rewound ones
    return out


def train(cmd: list[str], rd: Path, env: dict, log: Path, usr1_after: int | None = None, timeout: float = 600) -> dict:
    """Run one training process (its own rendezvous port: runs may overlap); with ``usr1_after`` send SIGUSR1 once
    it logged a step >= that. A failed run's last output lines go into the result (``log_tail``)."""
    seen = len(records(rd))
    t0 = time.time()
    with open(log, "a") as fh:
        p = subprocess.Popen(
            cmd, env={**env, "MASTER_PORT": str(free_port())}, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT
        )
        signalled = None
        while p.poll() is None and time.time() - t0 < timeout:
            if usr1_after is not None and signalled is None:
                new = [r for r in records(rd)[seen:] if "train/loss" in r and r["step"] >= usr1_after]
                if new:
                    p.send_signal(signal.SIGUSR1)
                    signalled = int(new[0]["step"])
            time.sleep(0.1)
        if p.poll() is None:
            p.kill()
        rc = p.wait()
    recs = [r for r in records(rd)[seen:] if "train/loss" in r]
    last = recs[-1] if recs else {}
    return {
        "rc": rc,
        "seconds": round(time.time() - t0, 1),
        "signalled_at": signalled,
        "img_per_s": last.get("perf/img_per_s"),
        "mfu": last.get("perf/mfu"),
        "mem_peak_gb": last.get("perf/mem_peak_gb"),
        "logged_steps": [r["step"] for r in recs],
        "log_tail": None if rc == 0 or rc == 42 else log.read_text(errors="replace")[-2500:],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--objectives", default=None, help="comma-separated subset (default: every registered one)")
    ap.add_argument("--micro-batch", type=int, default=None)
    ap.add_argument("--log-every", type=int, default=None)
    ap.add_argument(
        "--parallel", type=int, default=None, help="objective runs side by side (default: 3 on a GPU, 1 on a CPU)"
    )
    a = ap.parse_args()
    cpu = a.cpu_smoke
    a.parallel = a.parallel or (1 if cpu else 3)
    from loop_overhead import generate_shards

    from mimscale import objectives

    names = a.objectives.split(",") if a.objectives else sorted(objectives.available())
    mb = a.micro_batch or (4 if cpu else 32)
    every = a.log_every or (1 if cpu else 5)
    steps = 2 * every  # two logging intervals
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "SLURM_", "TORCHELASTIC"))
    }
    env |= {"WANDB_MODE": "disabled", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}
    if cpu:
        env |= {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "2")}
    t_start = time.time()
    result: dict = {"machine": machine(), "mode": "cpu-smoke" if cpu else "gpu", "runs": {}, "checks": {}}
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        size = 40 if cpu else 256
        n_train, n_test = (64, 32) if cpu else (1024, 256)
        train_dir = generate_shards(n_train, work / "train", size=size)
        test_dir = generate_shards(n_test, work / "test", size=size)
        teacher = make_teacher(work / "clip.pt", cpu) if "dtm" in names else None  # only DTM distils from it
        print(
            f"data: {n_train} + {n_test} generated JPEGs ({size} px); teacher {teacher.name if teacher else 'none'}",
            flush=True,
        )

        def cmd(name: str, rd: Path, *extra: str) -> list[str]:
            ov = [
                f"data.train={train_dir}",
                "data.num_workers=2" if cpu else "data.num_workers=4",
                "data.shuffle_buffer=64",
                "data.decode=device" if cpu and name in ("mae", "emae") else "data.decode=auto",
                f"train.batch_size={mb}",
                f"train.micro_batch_size={mb}",
                f"train.stop_after_steps={steps}",
                f"train.log_every={every}",
                f"train.run_dir={rd}",
                "train.precision=bf16",
                "train.save_every=0",
                "train.save_every_minutes=null",
                "eval.knn_train=null",
                "eval.knn_test=null",
                "log.wandb=disabled",
                "optim.warmup_epochs=0.01",
            ]
            if name == "dtm":
                ov.append(f"objective.teacher={teacher}")
            if name == "mapet":
                ov.append("objective.target_source=pixel_mean")
            if cpu:
                ov += CPU_MODEL + CPU_KNOBS.get(name, [])
            return [sys.executable, "-m", "mimscale.train", f"{name}_vit_b16", *ov, *extra]

        per_run = 300 if cpu else 150  # a hung run (e.g. a rank that died in a collective) is killed, not waited on

        knn = [
            f"eval.knn_train={train_dir}",
            f"eval.knn_test={test_dir}",
            "eval.knn_at_start=false",
            "eval.num_workers=0" if cpu else "eval.num_workers=4",
        ]
        plan = [(n, 1) for n in names] + ([("mae", 3)] if "mae" in names else [])

        def one(name: str, zero: int) -> tuple[str, dict]:
            key = f"{name}_zero{zero}"
            rd = work / key
            # MAE at ZeRO-1: the resume reference (twice as long: steps after the resume), kNN at the end
            extra = [*knn, f"train.stop_after_steps={2 * steps}"] if key == "mae_zero1" else []
            r = train(cmd(name, rd, f"train.zero_stage={zero}", *extra), rd, env, work / f"{key}.log", timeout=per_run)
            r["losses"] = losses(rd)
            r["decode"] = _decode_path(rd)
            ok = r["rc"] == 0 and len(r["logged_steps"]) >= 2
            print(
                f"{key:14s} rc {r['rc']:3d}  {r['seconds']:6.1f} s  logged {r['logged_steps']}  decode {r['decode']}  "
                f"img/s {r['img_per_s'] or 0:8.1f}  {'ok' if ok else 'FAILED'}",
                flush=True,
            )
            return key, r

        with ThreadPoolExecutor(max_workers=a.parallel) as pool:  # independent runs side by side on the GPU
            result["runs"] = dict(pool.map(lambda nz: one(*nz), plan))
        if "mae" in names:  # SIGUSR1 -> save -> exit 42 -> the same command resumes; losses as uninterrupted
            ref_rd, rd = work / "mae_zero1", work / "mae_resume"
            again = cmd("mae", rd, "train.zero_stage=1", *knn, f"train.stop_after_steps={2 * steps}")
            first = train(again, rd, env, work / "resume.log", usr1_after=every, timeout=per_run)
            second = train(again, rd, env, work / "resume.log", timeout=per_run)
            a_l, b_l = losses(ref_rd), losses(rd)
            common = sorted(set(a_l) & set(b_l))
            worst = max((abs(a_l[s] - b_l[s]) / max(abs(a_l[s]), 1e-12) for s in common), default=None)
            tol = 1e-6 if cpu else 1e-3  # GPU kernels (atomics in backward) need not be bitwise deterministic
            result["checks"]["resume"] = {
                "signalled_rc": first["rc"],
                "signalled_at": first["signalled_at"],
                "resumed_rc": second["rc"],
                "steps_compared": common,
                "max_rel_loss_diff": worst,
                "tolerance": tol,
                "ok": first["rc"] == 42
                and second["rc"] == 0
                and common == list(range(every, 2 * steps + 1, every))
                and first["signalled_at"] is not None
                and first["signalled_at"] < 2 * steps - every
                and worst is not None
                and worst <= tol,
            }
            knn_top1 = {k: _summary(d).get("knn_top1_final") for k, d in (("reference", ref_rd), ("resumed", rd))}
            result["checks"]["knn"] = {**knn_top1, "ok": all(v is not None for v in knn_top1.values())}
            print(
                f"resume: signalled rc {first['rc']} at step {first['signalled_at']}, resumed rc {second['rc']}, "
                f"max rel loss diff {worst} (tol {tol}); kNN top-1 {knn_top1}",
                flush=True,
            )
    runs_ok = all(r["rc"] == 0 and len(r["logged_steps"]) >= 2 for r in result["runs"].values())
    result["ok"] = runs_ok and all(c["ok"] for c in result["checks"].values())
    result["seconds"] = round(time.time() - t_start, 1)
    host = result["machine"]["gpu"] or result["machine"]["host"]
    stem = "gpu_smoke-" + "".join(c if c.isalnum() or c in "-_." else "_" for c in host)
    path = out_dir / f"{stem}-{dt.datetime.now(dt.timezone.utc):%Y-%m-%d}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'PASS' if result['ok'] else 'FAIL'} in {result['seconds']:.0f} s -> {path}", flush=True)
    return 0 if result["ok"] else 1


def _summary(rd: Path) -> dict:
    f = rd / "summary.json"
    return json.loads(f.read_text()) if f.exists() else {}


def _decode_path(rd: Path) -> str | None:
    """``device`` when the run's loader decoded on the device (its stats carry ``device_decode_failed``), else
    ``cpu``; None without a logged record."""
    recs = [r for r in records(rd) if "train/loss" in r]
    if not recs:
        return None
    return "device" if "data/device_decode_failed" in recs[-1] else "cpu"


if __name__ == "__main__":
    sys.exit(main())
