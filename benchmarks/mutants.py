"""Planted bugs: does the test suite catch them? A curated list of one-line mutants.

Each mutant replaces one exact piece of source (found exactly ``count`` times, else the list is stale and the
script says so) in a SCRATCH copy of the repository (``git archive HEAD``, or the working tree with
``--worktree``), runs the test selection that should catch it (``-x``, the unit tier where that suffices) and
restores the file. A mutant is *caught* when that selection fails; each selection is first run once on the
unmutated copy (it must pass, otherwise the mutant's verdict would mean nothing). /work/main itself is never
touched; the scratch copy is imported through ``PYTHONPATH`` (ahead of the editable install).

    .venv/bin/python benchmarks/mutants.py              # all; writes benchmarks/results/mutants-<date>.json
    .venv/bin/python benchmarks/mutants.py --list
    .venv/bin/python benchmarks/mutants.py --only emae_sc_stopgrad_inverted,dtm_schedule_rank0

Not in CI (tens of minutes on 2 cores); run it before each release and commit the results file. Every mutant
must be caught: strengthen the tests when one survives.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutant:
    id: str
    area: str  # objectives | masking | loop | checkpoints | loader | evaluation
    file: str
    old: str
    new: str
    tests: tuple[str, ...]  # pytest arguments (paths, -k, -m)
    why: str
    count: int = 1  # how many times ``old`` occurs (all are replaced)


M = Mutant
# fmt: off
MUTANTS: list[Mutant] = [
    # ------------------------------------------------------------------ objectives
    M("mae_loss_on_visible", "objectives", "mimscale/objectives/mae.py",
      "loss = masked_mse(pred, self.target(img), mask)", "loss = masked_mse(pred, self.target(img), ~mask)",
      ("tests/objectives/test_mae.py",), "MAE scores the visible patches instead of the masked ones"),
    M("mae_norm_pix_biased_var", "objectives", "mimscale/objectives/mae.py",
      "var = t.var(dim=-1, keepdim=True, unbiased=True)", "var = t.var(dim=-1, keepdim=True, unbiased=False)",
      ("tests/objectives/test_mae.py",), "norm-pix target with the biased variance"),
    M("mae_norm_pix_eps_outside_sqrt", "objectives", "mimscale/objectives/mae.py",
      "return (t - mean) / (var + eps).sqrt()", "return (t - mean) / (var.sqrt() + eps)",
      ("tests/objectives/test_mae.py",), "eps added outside the square root"),
    M("masked_mse_mean_over_all", "objectives", "mimscale/objectives/mae.py",
      "return (err * m).sum() / m.sum().clamp_min(1.0)", "return (err * m).mean()",
      ("tests/objectives/test_mae.py",), "loss averaged over all patches, not the masked ones"),
    M("patchify_pixel_order", "objectives", "mimscale/objectives/mae.py",
      "return x.permute(0, 2, 4, 3, 5, 1).reshape(b, gh * gw, p * p * c)",
      "return x.permute(0, 2, 4, 5, 3, 1).reshape(b, gh * gw, p * p * c)",
      ("tests/objectives/test_mae.py",), "patch pixels in (dx, dy) order"),
    M("emae_sc_stopgrad_inverted", "objectives", "mimscale/objectives/emae.py",
      'stopgrad = self.cfg.sc_stopgrad == "symmetric"', 'stopgrad = self.cfg.sc_stopgrad != "symmetric"',
      ("tests/objectives/test_emae.py", "-m", "unit", "-k", "stopgrad"), "issue 31 (1): EMAE's stop-gradient knob inverted"),
    M("dtm_schedule_rank0", "objectives", "mimscale/objectives/dtm.py",
      "self._draw_schedule(ctx.rank, ctx.step, 0)", "self._draw_schedule(0, ctx.step, 0)",
      ("tests/objectives/test_dtm.py", "-m", "unit"), "issue 31 (2): every rank draws rank 0's merge schedule"),
    M("dtm_standardize_biased", "objectives", "mimscale/objectives/dtm.py",
      "(t.var(dim=-1, keepdim=True, unbiased=True) + eps).sqrt()",
      "(t.var(dim=-1, keepdim=True, unbiased=False) + eps).sqrt()",
      ("tests/objectives/test_dtm.py", "-m", "unit"), "DTM token standardisation with the biased variance"),
    M("conmim_temperature_multiplies", "objectives", "mimscale/objectives/conmim.py",
      "logits = torch.bmm(s, t.transpose(1, 2)) / temperature", "logits = torch.bmm(s, t.transpose(1, 2)) * temperature",
      ("tests/objectives/test_conmim.py", "-m", "unit"), "InfoNCE logits multiplied by the temperature"),
    M("conmim_loss_over_all_rows", "objectives", "mimscale/objectives/conmim.py",
      "loss = torch.where(mask, ce, 0.0).sum() / rows", "loss = ce.mean()",
      ("tests/objectives/test_conmim.py", "-m", "unit"), "InfoNCE over visible rows too"),
    M("adpe_descends", "objectives", "mimscale/objectives/adpe.py",
      "self.delta.grad = torch.where(ok, -g, 0.0)", "self.delta.grad = torch.where(ok, g, 0.0)",
      ("tests/objectives/test_adpe.py", "-m", "unit"), "the adversary minimises the loss instead of maximising it"),
    M("mapet_target_order", "objectives", "mimscale/objectives/mapet.py",
      "target = codes.to(pred_idx.device).gather(1, pred_idx)",
      "target = codes.to(pred_idx.device)[:, : pred_idx.shape[1]]",
      ("tests/objectives/test_mapet.py", "-m", "unit"), "MaPeT predicts the first codes, not the permuted ones"),
    M("ema_teacher_weights_swapped", "objectives", "mimscale/teachers/ema.py",
      "torch._foreach_add_(ts, vs, alpha=1.0 - m)", "torch._foreach_add_(ts, vs, alpha=m)",
      ("tests/teachers/test_ema.py", "-m", "unit"), "EMA update t = m t + m s"),
    # ------------------------------------------------------------------ masking
    M("num_visible_ceil", "masking", "mimscale/masking.py",
      "return int(math.floor(num_patches * (1.0 - mask_ratio) + 1e-9))",
      "return int(math.ceil(num_patches * (1.0 - mask_ratio) - 1e-9))",
      ("tests/test_masking.py",), "N_keep rounded up"),
    M("random_masks_same_every_row", "masking", "mimscale/masking.py",
      "order = noise.argsort(dim=1)  # [B, N]: first `keep` are visible",
      "order = noise[:1].argsort(dim=1).expand(batch, -1)",
      ("tests/test_masking.py",), "one mask for the whole batch"),
    M("partition_parts_overlap", "masking", "mimscale/masking.py",
      "visible = order[:, : num_parts * keep].reshape(batch, num_parts, keep)  # [B, K, N_keep]",
      "visible = order[:, :keep].unsqueeze(1).expand(batch, num_parts, keep)",
      ("tests/test_masking.py", "tests/objectives/test_emae.py", "-m", "unit", "-k", "partition or parts"),
      "EMAE's parts all show the same patches"),
    M("visible_indices_shifted", "masking", "mimscale/masking.py",
      "return torch.argsort(mask.to(torch.uint8), dim=-1, stable=True)[..., :num_keep]",
      "return torch.argsort(mask.to(torch.uint8), dim=-1, stable=True)[..., 1 : num_keep + 1]",
      ("tests/test_masking.py", "tests/objectives/test_mae.py"), "the encoder gets a masked patch, loses a visible one"),
    M("unit_masks_floor", "masking", "mimscale/masking.py",
      "k = math.ceil(gu * gu * mask_ratio - 1e-9)", "k = math.floor(gu * gu * mask_ratio + 1e-9)",
      ("tests/test_masking.py", "tests/objectives/test_conmim.py", "-m", "unit"), "ConMIM hides one unit too few"),
    # ------------------------------------------------------------------ the loop
    M("warmup_off_by_one", "loop", "mimscale/engine/schedule.py",
      "return start + (peak - start) * step / warmup", "return start + (peak - start) * (step + 1) / warmup",
      ("tests/engine/test_schedule.py",), "warm-up one step ahead"),
    M("cosine_quarter_cycle", "loop", "mimscale/engine/schedule.py",
      "return final + (peak - final) * 0.5 * (1.0 + math.cos(math.pi * progress))",
      "return final + (peak - final) * 0.5 * (1.0 + math.cos(0.5 * math.pi * progress))",
      ("tests/engine/test_schedule.py",), "a quarter cosine: never reaches the final lr"),
    M("nonfinite_patience_off_by_one", "loop", "mimscale/engine/nonfinite.py",
      "if self.state.nonfinite_in_row < self.patience:", "if self.state.nonfinite_in_row <= self.patience:",
      ("tests/engine/test_trainer.py", "-m", "unit"), "one bad step more than the patience"),
    M("bad_micro_batch_backwarded", "loop", "mimscale/engine/trainer.py",
      "continue  # the step goes on with another micro-batch", "pass",
      ("tests/engine/test_trainer.py", "-k", "gradient_accumulation_drops"),
      "a non-finite micro-batch before the last is backwarded into the accumulated gradient"),
    M("layer_lr_scale_ignored", "loop", "mimscale/engine/deepspeed.py",
      'g["lr"] = lr * g.get("lr_scale", 1.0)', 'g["lr"] = lr',
      ("tests/engine/test_deepspeed_config.py", "tests/eval/test_finetune.py", "-m", "unit"),
      "per-group lr scales (layer decay) dropped when the lr is set"),
    # ------------------------------------------------------------------ checkpoints
    M("latest_pointer_ignored", "checkpoints", "mimscale/checkpoint.py",
      "if pointed in tags:", "if False:",
      ("tests/test_checkpoint.py", "-m", "unit"), "resume ignores the `latest` pointer"),
    M("truncated_file_accepted", "checkpoints", "mimscale/checkpoint.py",
      "if f.stat().st_size != size:", "if f.stat().st_size > size:",
      ("tests/test_checkpoint.py", "-m", "unit"), "a truncated checkpoint file looks complete"),
    M("identity_not_checked", "checkpoints", "mimscale/checkpoint.py",
      'if meta.get("identity", {}).get(key) != want:', "if False:",
      ("tests/test_checkpoint.py", "-m", "unit"), "another objective's checkpoint is resumed"),
    M("python_rng_not_restored", "checkpoints", "mimscale/checkpoint.py",
      "random.setstate((version, tuple(internal), gauss))", "pass",
      ("tests/test_checkpoint.py", "-m", "unit"), "Python's random state not restored on resume"),
    M("prune_keeps_one_more", "checkpoints", "mimscale/checkpoint.py",
      "for old in tags[self.keep_last :]:", "for old in tags[self.keep_last + 1 :]:",
      ("tests/test_checkpoint.py", "-k", "kill9_and_sigusr1"), "keep_last keeps one checkpoint too many"),
    # ------------------------------------------------------------------ the loader
    M("every_rank_reads_rank0_shards", "loader", "mimscale/data/streams.py",
      "mine, rank_filter = order[p.rank :: p.world_size], None", "mine, rank_filter = order[0 :: p.world_size], None",
      ("tests/data/test_loader.py",), "all ranks train on the same shards"),
    M("eval_range_skips_a_sample", "loader", "mimscale/data/streams.py",
      "lo_r = p.rank * p.total // p.world_size", "lo_r = p.rank * p.total // p.world_size + 1",
      ("tests/data/test_loader.py",), "evaluation misses the first sample of each rank's range"),
    M("same_shard_order_every_epoch", "loader", "mimscale/data/streams.py",
      "random.Random(mix_seed(p.seed, _TAG_SHARDS, p.epoch)).shuffle(order)",
      "random.Random(mix_seed(p.seed, _TAG_SHARDS)).shuffle(order)",
      ("tests/data/test_loader.py",), "the shard order does not change between epochs"),
    M("augmentation_seed_ignores_sample", "loader", "mimscale/data/streams.py",
      "gen = seeded_generator(p.seed, _TAG_AUG, p.epoch, p.rank, self.w, index)",
      "gen = seeded_generator(p.seed, _TAG_AUG, p.epoch, p.rank, self.w)",
      ("tests/data/test_loader.py", "tests/data/test_transforms.py"), "every sample of a stream gets the same crop"),
    # ------------------------------------------------------------------ evaluation
    M("knn_unweighted_votes", "evaluation", "mimscale/eval/knn.py",
      "votes.scatter_add_(1, top_lab, (top_sim / temperature).exp())",
      "votes.scatter_add_(1, top_lab, torch.ones_like(top_sim))",
      ("tests/eval/test_knn.py", "-m", "unit"), "kNN majority vote instead of exp(cos / T) weights"),
    M("knn_farthest_neighbours", "evaluation", "mimscale/eval/knn.py",
      "top_sim, top_idx = sim.topk(k, dim=1)  # [m, k]", "top_sim, top_idx = sim.topk(k, dim=1, largest=False)",
      ("tests/eval/test_knn.py", "-m", "unit"), "kNN votes with the k farthest samples"),
    M("layer_decay_exponent_off_by_one", "evaluation", "mimscale/eval/layer_decay.py",
      '"lr_scale": layer_decay ** (depth + 1 - lid),', '"lr_scale": layer_decay ** (depth - lid),',
      ("tests/eval/test_layer_decay.py",), "the head trains at lr / decay"),
    M("linear_augment_off", "evaluation", "mimscale/eval/linear.py",
      "if cfg.augment:", "if False:",
      ("tests/eval/test_linear.py", "-k", "augmented"), "issue 31 (3): both cfg.augment branches disabled", count=2),
]
# fmt: on


def scratch_copy(dest: Path, worktree: bool) -> str:
    """The repository at HEAD (or the working tree) under ``dest``; returns what was copied."""
    if worktree:
        files = subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, check=True, capture_output=True, text=True
        ).stdout.split()
        for f in files:
            src = REPO / f
            if src.is_file():
                (dest / f).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest / f)
        what = "working tree"
    else:
        tar = dest.parent / "head.tar"
        subprocess.run(["git", "archive", "--format=tar", "-o", str(tar), "HEAD"], cwd=REPO, check=True)
        with tarfile.open(tar) as t:
            t.extractall(dest, filter="data")
        tar.unlink()
        what = (
            "HEAD "
            + subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, check=True, capture_output=True, text=True
            ).stdout.strip()
        )
    (dest / ".venv").symlink_to(REPO / ".venv")
    return what


def run_tests(root: Path, tests: tuple[str, ...], timeout: int) -> tuple[int, float, str]:
    env = dict(os.environ, PYTHONPATH=str(root), WANDB_MODE="offline", WANDB_SILENT="true", MIMSCALE_TEST_LIMIT_S="0")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", *tests]
    t0 = time.time()
    try:
        p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
        rc, out = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        rc, out = -1, f"timeout after {timeout} s\n{e.stdout or ''}"
    return rc, time.time() - t0, out


def first_failure(out: str) -> str:
    for line in out.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line[:300]
    return out.strip().splitlines()[-1][:300] if out.strip() else ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help="comma-separated mutant ids")
    ap.add_argument("--list", action="store_true", help="print the mutants and exit")
    ap.add_argument("--worktree", action="store_true", help="mutate a copy of the working tree, not HEAD")
    ap.add_argument("--no-baseline", action="store_true", help="skip the clean run of each test selection")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per test run")
    ap.add_argument("--out", default=None, help="results file (default benchmarks/results/mutants-<date>.json)")
    a = ap.parse_args(argv)
    chosen = [m for m in MUTANTS if not a.only or m.id in a.only.split(",")]
    if a.list:
        for m in chosen:
            print(f"{m.id:36s} {m.area:12s} {m.file}: {m.why}")
        return 0
    if not chosen:
        print(f"mutants: no mutant named {a.only!r} (see --list)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="mimscale-mutants-") as tmp:
        root = Path(tmp) / "repo"
        root.mkdir()
        source = scratch_copy(root, a.worktree)
        stale = [m.id for m in chosen if (root / m.file).read_text().count(m.old) != m.count]
        if stale:
            print(f"mutants: the source no longer matches (update the list): {', '.join(stale)}", file=sys.stderr)
            return 2
        baseline: dict[tuple[str, ...], dict] = {}
        results = []
        for i, m in enumerate(chosen, 1):
            if not a.no_baseline and m.tests not in baseline:
                rc, took, out = run_tests(root, m.tests, a.timeout)
                baseline[m.tests] = {"rc": rc, "seconds": round(took, 1), "failure": first_failure(out) if rc else ""}
                if rc:
                    print(f"baseline FAILS ({' '.join(m.tests)}): {first_failure(out)}", flush=True)
            base = baseline.get(m.tests, {"rc": 0})
            path = root / m.file
            original = path.read_text()
            path.write_text(original.replace(m.old, m.new))
            try:
                rc, took, out = run_tests(root, m.tests, a.timeout)
            finally:
                path.write_text(original)
            verdict = "invalid (tests fail unmutated)" if base["rc"] else ("caught" if rc else "SURVIVED")
            results.append(
                {**asdict(m), "verdict": verdict, "rc": rc, "seconds": round(took, 1), "by": first_failure(out)}
            )
            print(f"[{i}/{len(chosen)}] {verdict:8s} {m.id} ({took:.0f} s) {first_failure(out) if rc else ''}")
            sys.stdout.flush()
    caught = sum(r["verdict"] == "caught" for r in results)
    print(f"caught {caught}/{len(results)}")
    date = dt.date.today().isoformat()
    out_path = Path(a.out) if a.out else REPO / "benchmarks" / "results" / f"mutants-{date}.json"
    for r in results:
        r["source"] = source
    base_rows = [{"tests": list(k), "source": source, **v} for k, v in baseline.items()]
    if a.only and out_path.exists():  # a re-run of some mutants: merge into that day's results
        old = json.loads(out_path.read_text())
        ids = {r["id"] for r in results}
        results = [r for r in old["mutants"] if r["id"] not in ids] + results
        order = {m.id: i for i, m in enumerate(MUTANTS)}
        results.sort(key=lambda r: order.get(r["id"], len(order)))
        base_rows = old.get("baseline", []) + base_rows
    caught = sum(r["verdict"] == "caught" for r in results)
    doc = {
        "benchmark": "mutants",
        "date": date,
        "machine": platform.node(),
        "caught": caught,
        "total": len(results),
        "baseline": base_rows,
        "mutants": results,
    }
    print(f"in {out_path.name}: caught {caught}/{len(results)}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {out_path}")
    return 0 if caught == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
