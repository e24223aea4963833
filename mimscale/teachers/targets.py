"""``mimscale data add-targets``: cache a teacher's per-patch targets (CLIP features, or k-CLIP codes) into a copy
of the shards, one process per device (rank r writes output shards r, r + world, ...), resumable per output
shard. What the targets are, how they are checked and the view they are computed on live in
:mod:`mimscale.data.targets` (the data floor); this module runs the teacher (the teachers floor).
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..data.shards import IMAGE_EXTENSIONS, read_manifest, shard_name, write_manifest, write_shard
from ..data.shards import check_existing as _check_existing
from ..data.shards import fmt_eta as _fmt_eta
from ..data.shards import publish_dir as _publish
from ..data.targets import FIELD_NAMES, crop_rule, find_manifest, local_file, target_view, teacher_view_args
from ..errors import DataError

# --------------------------------------------------------------------------------------------- writing

_W: dict[str, Any] = {}  # per process: the teacher, the view, the k-means model, the device, a decode pool


def _init_worker(spec: dict) -> None:
    import torch

    from .clip import CLIPTeacher

    torch.set_num_threads(max(1, int(spec["threads"])))
    dev = torch.device(spec["device"])
    teacher = CLIPTeacher(spec["teacher"], arch=spec["arch"], dtype=torch.float32).to(dev)
    if teacher.info["sha256"] != spec["teacher_sha256"]:
        raise DataError(f"teacher file {spec['teacher']} changed while add-targets was running")
    km = None
    if spec["kmeans"]:
        from .kmeans import KMeans

        km = KMeans.load(spec["kmeans"])
        km.centroids = km.centroids.to(dev)
    _W.update(
        spec=spec,
        teacher=teacher,
        km=km,
        device=dev,
        view=target_view(spec["image_size"], spec["mean"], spec["std"], 3, spec["crop_pct"]),
    )


def _targets_for(images: list) -> list[np.ndarray]:
    """Teacher targets of a batch of PIL images, computed on the process's device."""
    import torch

    spec, teacher, km, dev = _W["spec"], _W["teacher"], _W["km"], _W["device"]
    pool = _W.get("decode_pool")
    views = list(pool.map(lambda img: _W["view"](img, None), images)) if pool else [_W["view"](i, None) for i in images]
    x = torch.stack(views).to(dev, non_blocking=True)
    with torch.no_grad():
        feats = teacher(x, grid=spec["grid"])  # [B, N, D] fp32
        if km is None:
            return list(feats.to(torch.float16).cpu().numpy())
        return list(km.assign(feats).to(torch.int32).cpu().numpy().astype(np.uint16))  # [B, N]


def _shard_task(args) -> dict:
    """Write one output shard: into ``out_path``'s temp name, then renamed into place, then its ``.json``
    record (what marks the shard finished for a resumed run). Returns ``{"name", "count", "sha1"}``."""
    src_url, out_path, name, batch_size = args
    from PIL import Image

    from ..data.tario import iter_tar_samples

    def samples():
        pending: list[dict] = []

        def flush():
            images = []
            for raw in pending:
                ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
                try:
                    if ext is None:
                        raise ValueError("no image field")
                    img = Image.open(io.BytesIO(raw[ext]))
                    img.load()
                except Exception as e:
                    raise DataError(
                        f"{src_url}: sample {raw['__key__']} has no decodable image ({e}); rewrite the source shards"
                    ) from None
                images.append(img)
            for raw, target in zip(pending, _targets_for(images)):
                yield {
                    "__key__": raw["__key__"],
                    **{k: v for k, v in raw.items() if not k.startswith("__")},
                    name: target,
                }
            pending.clear()

        try:
            with open(src_url, "rb", buffering=1 << 20) as f:
                for raw in iter_tar_samples(f, os.path.basename(src_url)):
                    pending.append(raw)
                    if len(pending) == batch_size:
                        yield from flush()
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"cannot read source shard {src_url} ({e}); rewrite it") from None
        if pending:
            yield from flush()

    out_path = Path(out_path)
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    try:
        info = write_shard(tmp, samples())
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    info["name"] = out_path.name
    record = out_path.with_name(out_path.name + ".json")
    record_tmp = record.with_name(f".{record.name}.tmp-{os.getpid()}")
    record_tmp.write_text(json.dumps(info))
    os.replace(record_tmp, record)
    return info


def _finished(out_path: Path) -> dict | None:
    """The record of a shard a previous (interrupted) run finished, if its file is there too."""
    try:
        info = json.loads(out_path.with_name(out_path.name + ".json").read_text())
    except (OSError, ValueError):
        return None
    return info if out_path.is_file() and info.get("name") == out_path.name else None


def add_targets(
    src,
    teacher: str | os.PathLike,
    out: str | os.PathLike,
    kind: str = "features",
    kmeans: str | os.PathLike | None = None,
    arch: str | None = None,
    image_size: int | None = None,
    grid: int | None = None,
    crop_pct: float = 1.0,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    batch_size: int = 256,
    workers: int = 1,
    progress: bool = True,
    device: str | None = "auto",
) -> Path:
    """Write ``out``: the shards of ``src`` + one cached target field per sample (see module docstring).

    ``image_size`` / ``mean`` / ``std`` default to the teacher's own; ``grid`` (side of the token grid)
    to ``image_size // teacher patch``. Atomic: shards and manifest appear together under ``out``.

    One process per device under any training launcher (``torchrun``, ``srun``, ...: see
    :mod:`mimscale.teachers.launch`): rank r writes output shards ``r, r + world, ...``, batched on ``device``.
    On the CPU ``workers`` processes share a rank's shards; on CUDA ``workers`` threads decode images.
    Resumable per output shard: shards finished by an interrupted run (same job) are kept, not recomputed.
    """
    import torch

    from ..data.sources import expand_source
    from .clip import CLIPTeacher

    if kind not in FIELD_NAMES:
        raise DataError(f"--kind must be one of {', '.join(FIELD_NAMES)}, got {kind!r}")
    if (kind == "codes") != (kmeans is not None):
        raise DataError("--kind codes needs --kmeans KM.pt (and --kmeans only goes with --kind codes)")
    if not 0 < crop_pct <= 1:
        raise DataError(f"crop_pct must be in (0, 1], got {crop_pct}")
    out = Path(out)
    urls, _ = expand_source(src)
    found = [local_file(u) for u in urls]
    if not urls or any(p is None or not os.path.isfile(p) for p in found):
        raise DataError(f"add-targets reads local shard files; {src!r} names none or a missing one")
    local = [p for p in found if p is not None]  # (all of them)
    manifest = read_manifest(find_manifest(src))
    counts = {s["name"]: s["count"] for s in manifest["shards"]}
    total = sum(counts.get(os.path.basename(p), 0) for p in local)
    if _check_existing(out, total, f"samples of {src}"):
        return out
    from .launch import barrier, launched

    with launched(device) as (d, dev):
        t = CLIPTeacher(teacher, arch=arch)
        size, side, mean, std = teacher_view_args(t, image_size, grid, mean, std)
        name = FIELD_NAMES[kind]
        km_info = None
        if kmeans is not None:
            from .kmeans import KMeans

            km = KMeans.load(kmeans)
            if km.teacher.get("sha256") != t.info["sha256"]:
                raise DataError(
                    f"{kmeans} was fit on features of teacher {km.teacher.get('sha256', '?')[:12]} but "
                    f"--teacher is {t.info['sha256'][:12]}; fit k-means with this teacher"
                )
            if km.k > 65536:
                raise DataError(f"k={km.k} codes do not fit uint16")
            km_info = {"path": km.path, "sha256": km.sha256, "k": km.k, "dim": km.dim}
        dim = t.out_dim
        entry: dict[str, Any] = {
            "kind": kind,
            "dtype": "float16" if kind == "features" else "uint16",
            "shape": [side * side, dim] if kind == "features" else [side * side],
            "grid": [side, side],
            "crop_rule": crop_rule(crop_pct),
            "image_size": [size, size],
            "crop_pct": float(crop_pct),
            "mean": mean,
            "std": std,
            "teacher": t.teacher_id(),
            "kmeans": km_info,
        }
        del t
        workers = max(1, int(workers))
        pool_workers = workers if dev.type == "cpu" else 1  # CUDA: one process per GPU, decode threads
        spec = {
            "teacher": str(teacher),
            "arch": arch,
            "teacher_sha256": entry["teacher"]["sha256"],
            "kmeans": str(kmeans) if kmeans else None,
            "image_size": size,
            "grid": (side, side),
            "crop_pct": crop_pct,
            "mean": mean,
            "std": std,
            "device": str(dev),
            "threads": max(1, torch.get_num_threads() // pool_workers),
        }
        # the staging directory is named after OUT (not this process): every rank writes its shards into it and
        # a rerun after an interruption finds the finished ones there (each shard is renamed into place, then
        # its .json record written; a shard without a record is redone)
        stage = out.parent / f".{out.name}.partial"
        key = {
            "sources": [os.path.basename(p) for p in local],
            "field": name,
            "batch_size": int(batch_size),
            "entry": {k: v for k, v in entry.items() if k != "teacher"},
            "teacher_sha256": entry["teacher"]["sha256"],
        }
        key = json.loads(json.dumps(key))
        if d.is_main:
            out.parent.mkdir(parents=True, exist_ok=True)
            try:
                old = json.loads((stage / "job.json").read_text())
            except (OSError, ValueError):
                old = None
            if old != key:
                shutil.rmtree(stage, ignore_errors=True)
                stage.mkdir()
                (stage / "job.json").write_text(json.dumps(key))
        barrier()
        tasks = [(p, stage / shard_name("targets", i), name, int(batch_size)) for i, p in enumerate(local)]
        mine = [i for i in range(len(tasks)) if i % d.world_size == d.rank]
        todo = [i for i in mine if _finished(tasks[i][1]) is None]
        t0 = time.monotonic()
        done = {"shards": len(mine) - len(todo), "samples": 0}
        mine_total = sum(counts.get(os.path.basename(local[i]), 0) for i in todo)
        show = progress and d.is_main

        def report(info: dict) -> None:
            done["shards"] += 1
            done["samples"] += info["count"]
            if show:
                rate = done["samples"] / max(time.monotonic() - t0, 1e-9)
                eta = (mine_total - done["samples"]) / rate if rate > 0 else 0.0
                print(
                    f"add-targets {out.name} (rank 0 of {d.world_size}, {dev.type}): {done['shards']}/{len(mine)} "
                    f"shards, {done['samples']}/{mine_total} samples this run, {rate:.0f} samples/s, ETA "
                    f"{_fmt_eta(eta)}",
                    file=sys.stderr,
                    flush=True,
                )

        if show and len(todo) < len(mine):
            print(
                f"add-targets {out.name}: resuming, {len(mine) - len(todo)} shard(s) already done",
                file=sys.stderr,
                flush=True,
            )
        if pool_workers > 1 and len(todo) > 1:
            ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
            with ctx.Pool(min(pool_workers, len(todo)), initializer=_init_worker, initargs=(spec,)) as pool:
                for _, info in pool.imap_unordered(_indexed_task, [(i, tasks[i]) for i in todo]):
                    report(info)
        elif todo:
            from concurrent.futures import ThreadPoolExecutor

            _init_worker(spec)
            if workers > 1:
                _W["decode_pool"] = ThreadPoolExecutor(workers)
            try:
                for i in todo:
                    report(_shard_task(tasks[i]))
            finally:
                if _W.get("decode_pool"):
                    _W["decode_pool"].shutdown()
                _W.clear()
        barrier()
        if d.is_main:
            records = [_finished(task[1]) for task in tasks]
            infos = [info for info in records if info is not None]
            if len(infos) < len(records):
                raise DataError(f"add-targets: {len(records) - len(infos)} shard(s) of {out} were not written")
            for task in tasks:
                task[1].with_name(task[1].name + ".json").unlink()
            (stage / "job.json").unlink()
            extra = {
                k: v
                for k, v in manifest.items()
                if k not in ("format", "num_samples", "shards", "classes", "source", "targets")
            }
            targets = dict(manifest.get("targets") or {})
            targets[name] = entry
            write_manifest(
                stage, infos, classes=manifest.get("classes", []), source=f"add-targets:{src}", targets=targets, **extra
            )
            _publish(stage, out)
        barrier()
    return out


def _indexed_task(arg):
    i, task = arg
    return i, _shard_task(task)


# --------------------------------------------------------------------------------------------- CLI


def run(args) -> int:
    out = add_targets(
        args.src,
        args.teacher,
        args.out,
        kind=args.kind,
        kmeans=args.kmeans,
        arch=args.arch,
        image_size=args.image_size,
        grid=args.grid,
        crop_pct=args.crop_pct,
        mean=args.mean,
        std=args.std,
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
    )
    print(out)
    return 0
