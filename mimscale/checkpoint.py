"""Checkpoints that survive clusters: atomic saves, a ``latest`` pointer, keep-last-K, fallback past a bad
checkpoint, and DeepSpeed universal checkpoints when the world size changes.

Layout of ``RUN_DIR/checkpoints/``::

    latest                  the tag of the newest complete checkpoint (switched last, atomically)
    step_00000100/          DeepSpeed's files (model states, per-rank ZeRO optimizer shards) plus
        meta.json           format, step, world size, ZeRO stage, objective, model shape, file sizes
        trainer.pt          the loop's counters (time, kNN results, non-finite counts), the
                            objective's outside-DeepSpeed state (EMA teacher, adversarial params) and
                            the module's buffers (restored by us after a universal load)
        rank_00000.pt       per rank: data-loader position and RNG states
    universal/step_...      a universal conversion, made on demand for a new world size

A save goes to ``.tmp-step_X`` and is renamed once every rank has written its files; a crash mid-save
leaves the previous checkpoint and the pointer untouched. Nothing is deleted except checkpoints older than
the newest ``keep_last`` complete ones, and only after a newer save has been published.

This module and ``engine/deepspeed.py`` are the only ones that import deepspeed. Our own files load with
``weights_only=True``; DeepSpeed's loader reads its own files (written by this run) with pickle.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as tdist

from .errors import CheckpointError

log = logging.getLogger("mimscale.checkpoint")

FORMAT = "mimscale-checkpoint/1"
CKPT_DIR = "checkpoints"
LATEST = "latest"
EXIT_REQUEUE = 42  # process exit code after a save on SIGUSR1/SIGTERM: "requeue me"
_TAG = re.compile(r"^step_(\d{8})$")


def tag_of(step: int) -> str:
    return f"step_{step:08d}"


def _barrier() -> None:
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        tdist.barrier()


def _fsync_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temp file, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _accelerator_rng() -> tuple[str, Any] | None:
    """``(name, torch.<name>)`` of the accelerator this process computes on (``cuda``), ``None`` on CPU nodes."""
    from .dist import accelerator_name

    name = accelerator_name()
    return None if name == "cpu" else (name, getattr(torch, name))


def rng_state() -> dict[str, Any]:
    """This process's RNG states (torch CPU, every visible accelerator device, numpy, python) as
    weights_only-loadable values. The device generators drive what is drawn on the device (drop-path masks)."""
    np_state = cast(tuple, np.random.get_state())  # legacy=True (the default): the MT19937 tuple
    acc = _accelerator_rng()
    device = None
    if acc is not None:
        name, mod = acc
        device = {"type": name, "states": list(mod.get_rng_state_all()), "current": int(mod.current_device())}
    return {
        "torch": torch.get_rng_state(),
        "device": device,
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "gauss": float(np_state[4]),
        },
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
    }


def set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    _set_device_rng(s.get("device"))
    n = s["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = s["python"]
    random.setstate((version, tuple(internal), gauss))


def _set_device_rng(saved: dict[str, Any] | None) -> None:
    """Restore the device generators: all of them when this process sees as many devices as the saver did,
    else this device's from the saver's current one (e.g. resumed with one GPU bound per task)."""
    acc = _accelerator_rng()
    if saved is None or acc is None or saved["type"] != acc[0]:
        if saved is not None or acc is not None:
            log.warning(
                "checkpoint RNG: saved on %s, resumed on %s; the device random streams start afresh",
                saved["type"] if saved else "cpu",
                acc[0] if acc else "cpu",
            )
        return
    mod, states = acc[1], saved["states"]
    if len(states) == mod.device_count():
        mod.set_rng_state_all(states)
    else:
        mod.set_rng_state(states[saved["current"]], mod.current_device())


@dataclass
class Found:
    """A complete checkpoint on disk."""

    tag: str
    path: Path
    meta: dict


def _files(d: Path) -> dict[str, int]:
    return {
        str(p.relative_to(d)): p.stat().st_size for p in sorted(d.rglob("*")) if p.is_file() and p.name != "meta.json"
    }


def check_complete(path: Path) -> dict:
    """The checkpoint's meta after checking every file it lists is there with its recorded size."""
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: no readable meta.json ({type(e).__name__})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} checkpoint (format {meta.get('format')!r})")
    for name, size in meta.get("files", {}).items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path}: file {name} is missing")
        if f.stat().st_size != size:
            raise CheckpointError(f"{path}: file {name} is truncated or changed ({f.stat().st_size} of {size} bytes)")
    return meta


def candidates(run_dir: Path) -> list[Path]:
    """Complete-looking checkpoint directories, the ``latest`` one first, then newest first."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    tags = sorted((p for p in root.iterdir() if p.is_dir() and _TAG.match(p.name)), reverse=True)
    latest = root / LATEST
    if latest.is_file():
        pointed = root / latest.read_text().strip()
        if pointed in tags:
            tags.remove(pointed)
            tags.insert(0, pointed)
    return tags


def find(run_dir: Path, expect: dict) -> Found | None:
    """The newest usable checkpoint of ``run_dir`` (or None). Bad ones are skipped with one warning each;
    a checkpoint of another objective or model is an error (a different run in the same directory)."""
    problems = []
    for path in candidates(run_dir):
        try:
            meta = check_complete(path)
        except CheckpointError as e:
            log.warning("skipping checkpoint: %s", e)
            problems.append(str(e))
            continue
        for key, want in expect.items():
            got = meta.get("identity", {}).get(key)
            if key == "img_size" and got is not None and got != want:
                raise CheckpointError(
                    f"{path} was saved at model.img_size={got} but this run has model.img_size={want}; a run "
                    f"resumes only at its own size: set model.img_size={got} to resume it, or go on at {want} px in "
                    f"a new run directory with model.init={Path(run_dir)} (its newest weights, position embeddings "
                    "resampled; docs/guide/weights.md)"
                )
            if got != want:
                raise CheckpointError(
                    f"{path} was written for {key}={got!r} but this "
                    f"run has {key}={want!r}; use another train.run_dir or resume=never"
                )
        return Found(path.name, path, meta)
    if problems:
        raise CheckpointError(
            f"no usable checkpoint in {Path(run_dir) / CKPT_DIR} ({problems[0]}); "
            "nothing was deleted: move the directory away or set train.resume=never"
        )
    return None


def param_shapes(module) -> dict[str, list[int]]:
    """``name -> shape`` of every trainable parameter of ``module`` (the full shape under ZeRO-3)."""
    return {n: list(getattr(p, "ds_shape", p.shape)) for n, p in module.named_parameters() if p.requires_grad}


def check_shapes(found: Found, shapes: dict[str, list[int]]) -> None:
    """CheckpointError (one line) when ``found`` was saved for other parameter shapes than the model built now
    (a changed objective or model knob, e.g. a decoder width): DeepSpeed would fail deep inside its loader."""
    saved = found.meta.get("shapes")
    if saved is None:  # written before shapes were recorded
        return
    for name in sorted(set(saved) | set(shapes)):
        if saved.get(name) != shapes.get(name):
            raise CheckpointError(
                f"{found.path} holds {name} {saved.get(name)} but this run builds {shapes.get(name)} "
                "(a changed model or objective knob); restore the knob, use another "
                "train.run_dir, or set train.resume=never"
            )


class Checkpointer:
    """Saves and restores one run's training state (collective: every rank calls every method)."""

    def __init__(
        self,
        run_dir: Path,
        engine,
        *,
        rank: int,
        world_size: int,
        keep_last: int,
        identity: dict,
        shapes: dict[str, list[int]] | None = None,
    ):
        self.root = Path(run_dir) / CKPT_DIR
        self.engine, self.rank, self.world_size = engine, rank, world_size
        self.keep_last, self.identity, self.shapes = max(1, keep_last), identity, shapes

    # ------------------------------------------------------------------ save
    def save(self, step: int, trainer: dict, loader_state: dict, objective_state: dict, extra=None) -> Path:
        """Write checkpoint ``step`` (collective). ``extra(tmp_dir)`` is called on every rank before the
        checkpoint is published, to add files (e.g. the consolidated encoder)."""
        tag = tag_of(step)
        tmp_tag = f".tmp-{tag}"
        tmp, final = self.root / tmp_tag, self.root / tag
        t0 = time.time()
        try:
            if self.rank == 0:
                self.root.mkdir(parents=True, exist_ok=True)
                if tmp.exists():
                    shutil.rmtree(tmp)  # debris of a save that crashed
            _barrier()
            self.engine.save_checkpoint(str(self.root), tag=tmp_tag, save_latest=False, exclude_frozen_parameters=True)
            torch.save({"loader": loader_state, "rng": rng_state()}, tmp / f"rank_{self.rank:05d}.pt")
            if self.rank == 0:
                torch.save(
                    {"trainer": trainer, "objective": objective_state, "buffers": _buffers(self.engine.module)},
                    tmp / "trainer.pt",
                )
            if extra is not None:
                extra(tmp)
            _barrier()
            if self.rank == 0:
                meta = {
                    "format": FORMAT,
                    "step": step,
                    "world_size": self.world_size,
                    "zero_stage": self.engine.zero_optimization_stage(),
                    "identity": self.identity,
                    **({"shapes": self.shapes} if self.shapes is not None else {}),
                    "saved_at": time.time(),
                    "files": _files(tmp),
                }
                _fsync_write(tmp / "meta.json", json.dumps(meta, indent=1))
                if final.exists():  # an older, unusable copy of this step: set it aside
                    final.rename(self.root / f"{tag}.replaced-{int(time.time())}")
                tmp.rename(final)
        except Exception as e:
            raise self._save_failed(step, tmp, e) from None
        if self.rank == 0:
            try:
                _fsync_write(self.root / LATEST, tag)
            except OSError as e:  # the new checkpoint is complete; find() still sees it
                log.warning("saved %s but could not update %s (%s)", final, self.root / LATEST, e.strerror)
            self._prune(keep=final)
            log.info("saved checkpoint step=%d to %s (%.1f s)", step, final, time.time() - t0)
        _barrier()
        return final

    def _save_failed(self, step: int, tmp: Path, e: Exception) -> CheckpointError:
        """Remove this save's partial files (frees the space a full disk needs) and say, in one line, why it
        failed and which checkpoint is still there to resume from. No collective: under a launcher the other
        ranks are ended when this one exits (torchrun, srun --kill-on-bad-exit)."""
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        why = e.strerror if isinstance(e, OSError) and e.strerror else (str(e).strip().splitlines() or [""])[-1]
        last = next(iter(candidates(self.root.parent)), None)
        previous = last.name if last is not None else None
        try:
            free = shutil.disk_usage(self.root).free / 2**20
            need = sum(f.stat().st_size for f in last.rglob("*") if f.is_file()) / 2**20 if last else 0.0
            where = f"{free:.1f} MiB free" + (
                f": the file system is full, a checkpoint takes {need:.1f} MiB" if free < need else ""
            )
        except OSError:
            where = "free space unknown"
        if not os.access(self.root, os.W_OK):
            where = "not writable"
        kept = (
            f"the previous checkpoint {previous} is intact; the run resumes from it once the run dir is "
            "writable and has room"
            if previous
            else "no earlier checkpoint exists"
        )
        return CheckpointError(
            f"cannot save checkpoint step={step} in {self.root} ({where}; {type(e).__name__}: {why[:200]}); {kept}"
        )

    def _prune(self, keep: Path) -> None:
        tags = sorted((p for p in self.root.iterdir() if p.is_dir() and _TAG.match(p.name)), reverse=True)
        for old in tags[self.keep_last :]:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)
                universal = self.root / "universal" / old.name
                shutil.rmtree(universal, ignore_errors=True)

    # ------------------------------------------------------------------ load
    def load(self, found: Found, universal: bool) -> dict:
        """Load ``found`` into the engine and restore this rank's RNG states. Returns ``trainer`` (the loop's
        counters), ``objective`` (its outside-DeepSpeed state), ``loader`` (this rank's data position, None
        when the world size differs: it cannot be mapped exactly) and ``epoch`` (the data epoch in progress)."""
        load_dir = self.root / "universal" if universal else self.root
        try:
            path, _ = self.engine.load_checkpoint(
                str(load_dir),
                tag=found.tag,
                load_module_strict=False,
                load_optimizer_states=True,
                load_lr_scheduler_states=False,
            )
        except Exception as e:
            first = (str(e).splitlines() or [""])[0][:200]
            raise CheckpointError(f"{found.path}: DeepSpeed could not load it ({type(e).__name__}: {first})") from None
        if path is None:
            raise CheckpointError(f"{found.path}: DeepSpeed found nothing to load")
        own = torch.load(found.path / "trainer.pt", map_location="cpu", weights_only=True)
        if universal and own.get("buffers"):
            _load_buffers(self.engine.module, own["buffers"])
        same = found.meta["world_size"] == self.world_size
        mine = torch.load(found.path / f"rank_{self.rank if same else 0:05d}.pt", map_location="cpu", weights_only=True)
        if same:
            set_rng_state(mine["rng"])
        return {
            "trainer": own["trainer"],
            "objective": own["objective"],
            "loader": mine["loader"] if same else None,
            "epoch": int(mine["loader"].get("epoch", 0)),
        }


def check_reshard(found: Found, world_size: int) -> None:
    """CheckpointError (one line) unless ``found`` can be loaded on ``world_size`` ranks: the same world size
    always; another one through a universal conversion, which DeepSpeed supports for ZeRO stages 1-3 only."""
    saved = found.meta["world_size"]
    if saved != world_size and found.meta.get("zero_stage", 0) == 0:
        raise CheckpointError(
            f"{found.path} is a ZeRO-0 checkpoint of {saved} ranks and cannot be loaded on "
            f"{world_size} (DeepSpeed's universal checkpoint has no ZeRO-0 support, deepspeed#7200): "
            f"resume it on {saved} ranks, or start runs that will change size with "
            "train.zero_stage >= 1"
        )


def _buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's persistent buffers (e.g. BatchNorm running statistics), replicated on every rank at any
    ZeRO stage: saved by rank 0 beside DeepSpeed's files."""
    out = {}
    for prefix, m in module.named_modules():
        for name, b in m._buffers.items():
            if b is not None and name not in m._non_persistent_buffers_set:
                out[f"{prefix}.{name}" if prefix else name] = b.detach().cpu().clone()
    return out


def _load_buffers(module: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Put ``saved`` buffers back: DeepSpeed's universal load restores parameters and optimizer state but, at
    ZeRO-3, leaves buffers at their initial values (BatchNorm running statistics came back as zeros)."""
    own = _buffers(module)
    if own.keys() != saved.keys():
        raise CheckpointError(
            f"the checkpoint's module buffers {sorted(saved)[:3]} do not match the model's {sorted(own)[:3]}"
        )
    for prefix, m in module.named_modules():
        for name, b in m._buffers.items():
            key = f"{prefix}.{name}" if prefix else name
            if key in saved:
                b.data.copy_(saved[key].to(b.device, b.dtype))


def convert_to_universal(found: Found, rank: int) -> None:
    """Rank 0 converts ``found`` into ``checkpoints/universal/<tag>`` (once); the others wait at a barrier.
    Refuses (:func:`check_reshard`) what DeepSpeed cannot convert, on every rank, before any collective."""
    check_reshard(found, tdist.get_world_size() if tdist.is_initialized() else 1)
    out = found.path.parent / "universal" / found.tag
    if rank == 0 and not (out / "done").is_file():
        from deepspeed.checkpoint import ds_to_universal

        t0 = time.time()
        tmp = out.with_name(f".tmp-{found.tag}")
        shutil.rmtree(tmp, ignore_errors=True)
        ds_to_universal.main(_universal_args(found.path, tmp))
        (tmp / "done").write_text(found.tag)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        log.info(
            "converted %s (world size %d) to a universal checkpoint in %.1f s",
            found.path,
            found.meta["world_size"],
            time.time() - t0,
        )
    _barrier()


def _universal_args(src: Path, dst: Path):
    import argparse

    return argparse.Namespace(
        input_folder=str(src),
        output_folder=str(dst),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        no_strict=False,
        inject_missing_state=True,
    )


def export(run_dir: Path, out: Path, step: int | None = None) -> dict:
    """Copy the consolidated fp32 encoder (timm key names) of ``run_dir``'s newest usable checkpoint (or of
    checkpoint ``step``) to ``out`` as safetensors. Works for any ZeRO stage: every checkpoint holds the
    encoder gathered from the fp32 master weights at save time. Returns what was exported."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {run_dir} does not exist")
    paths = [run_dir / CKPT_DIR / tag_of(step)] if step is not None else candidates(run_dir)
    problems = []
    for path in paths:
        try:
            meta = check_complete(path)
            if "encoder.safetensors" not in meta["files"]:
                raise CheckpointError(f"{path}: holds no encoder.safetensors")
            tensors = load_file(str(path / "encoder.safetensors"))
        except (CheckpointError, SafetensorError, OSError) as e:
            problems.append(str(e))
            log.warning("skipping checkpoint: %s", e)
            continue
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        ident = meta["identity"]
        save_file(
            tensors,
            str(tmp),
            metadata={
                "format": "pt",
                "arch": str(ident["arch"]),
                "img_size": str(ident["img_size"]),
                "patch_size": str(ident["patch_size"]),
                "step": str(meta["step"]),
            },
        )
        os.replace(tmp, out)
        return {"checkpoint": str(path), "step": meta["step"], "tensors": len(tensors), **ident}
    if step is not None and not paths[0].exists():
        raise CheckpointError(f"{paths[0]} does not exist")
    raise CheckpointError(
        f"no usable checkpoint to export in {run_dir / CKPT_DIR}" + (f" ({problems[0]})" if problems else "")
    )
