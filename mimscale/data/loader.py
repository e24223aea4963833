"""Streaming WebDataset loader with rank/worker splitting, fixed epoch length and exact resume.

Data flow inside one *stream* (= one DataLoader worker of one rank)::

    shard list --(epoch permutation, split by rank then by worker, cycled)--> raw samples (bytes only)
      --(shuffle buffer)--> raw sample #c --(decode + transform with generator(seed, epoch, rank, worker, c))-->
      --(B at a time)--> collate(samples, generator(seed, epoch, rank, worker, batch_index)) --> batch

On the device-decode path (``decode="device"``) the per-sample transform only reads the JPEG header and draws
the crops from that same generator (:mod:`mimscale.data.device_decode`); :meth:`ShardLoader.to_device` decodes,
crops and normalises the batch on the accelerator.  The module layout: :mod:`~mimscale.data.sources` (shard
URLs), :mod:`~mimscale.data.tario` (streamed tar reading), :mod:`~mimscale.data.streams` (one worker's stream),
this module (the loader and its state).

Everything up to the shuffle-buffer output handles bytes only, so a resumed stream fast-forwards to
its saved cursor ``c`` without decoding a single image and without touching any augmentation RNG.
Worker ``w`` produces the batches ``j`` with ``j % num_workers == w``; ``torch.utils.data.DataLoader``
hands them out round-robin, so the batch order is deterministic.  The main process counts the batches
it hands to the caller (not what workers prefetched) and records each worker's cursor from metadata
carried inside the batches, together with corrupt-data events for ``loader.stats``.

(On a resume the DataLoader's worker ``i`` plays stream ``(i + batches_done) % num_workers`` so the
round-robin starts with the stream that owns the next batch.)

Train mode: shards are split by rank (``perm[rank::world_size]`` of a fresh permutation per epoch from
``(seed, epoch)``, identical on every rank), then by worker; a level with fewer shards than takers falls
back to sample-level striding (every k-th sample, with a warning about the extra reading).  Every
stream cycles over its shards as long as needed, so each rank yields exactly
``samples_per_epoch // (world_size * batch_size)`` batches per epoch; the shuffle buffer is drained at
the end of each pass, so a stream repeats a sample only after emitting its whole pass.

Eval mode reads each sample exactly once (contiguous position ranges per rank, then per worker; the
manifest counts let a worker open only the shards its range touches) and pads every rank to the same
number of full batches with ``valid=False`` entries.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import signal
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader

from mimscale.errors import DataError

from .device_decode import DeviceDecoder, DeviceViews, PackedCollate, device_views_of, resolve_decode
from .shards import MANIFEST_NAME, read_manifest
from .sources import expand_source, local_path_of, shard_command, url_shard_name
from .streams import EpochDataset, Plan, default_collate, passthrough
from .tario import ShardReadError, iter_tar_samples

__all__ = ["ShardLoader", "default_collate", "expand_source", "iter_tar_samples", "ShardReadError"]

log = logging.getLogger("mimscale.data")

STATE_FORMAT = "mimscale-loader/1"


#: the epoch generators whose DataLoader workers may still run (see :func:`_close_live_epochs`)
_LIVE_EPOCHS: weakref.WeakSet = weakref.WeakSet()


@atexit.register  # registered after multiprocessing's own exit hook (imported above), so it runs before it
def _close_live_epochs() -> None:
    """At interpreter exit, close every epoch still open so its workers are shut down through the DataLoader.

    Workers ignore SIGTERM (:func:`worker_ignores_signals`); an exception that ends the program leaves the epoch
    generator suspended in the traceback's frames, and multiprocessing's exit hook would then ``terminate()``
    (SIGTERM, ignored) and ``join()`` the workers forever: the crashed run would hang instead of exiting."""
    for gen in list(_LIVE_EPOCHS):
        gen.close()


def worker_ignores_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: a worker ignores SIGINT/SIGTERM/SIGUSR1 (Ctrl-C and schedulers signal the
    whole process group): the main process decides (:mod:`mimscale.engine.signals`: save, exit 42) and shuts the
    workers down through the DataLoader; they also exit when the main process is gone."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


class ShardLoader:
    """Iterable of batches over WebDataset shards; see the module docstring for the data flow.

    Args:
        source: a shard directory with ``manifest.json``, a path, a brace pattern
            (``/d/train-{000000..000011}.tar``), ``pipe:CMD ARGS`` (split with shlex, never run by a
            shell), an ``http(s)://`` / ``gs://`` ... URL (streamed by curl / gsutil, as webdataset does; see
            :mod:`mimscale.data.sources`), or a list of those.
        transform: ``transform(PIL.Image, torch.Generator) -> Tensor [C, H, W]`` (pickled to workers).
        collate: ``collate(samples: list[dict], torch.Generator) -> batch``; default: :func:`default_collate`.
            Each sample has ``image``, ``label`` (-1 if absent), ``key``, every extra tar field (``npy``
            decoded to a tensor, others raw bytes) and, in eval mode, ``valid``.
        samples_per_epoch: train: epoch size (default: the manifest counts of the shards); eval: the
            number of samples, needed only without a manifest.
        manifest: a manifest path/dir with the counts of the shards, when none lies beside them.
        mode: ``"train"`` (split, shuffle, cycle, exactly ``len(self)`` batches per rank) or ``"eval"``
            (every sample once across ranks, equal batch counts, padding marked ``valid=False``).
        multiprocessing_context: start method for the workers (default: the platform's; workers get the
            transform and collate pickled under ``spawn``/``forkserver``).
        decode: where training images are decoded: ``"cpu"`` (default: in the workers, by ``transform``),
            ``"device"`` (workers read bytes and draw the crops; :meth:`to_device` decodes, crops, resizes and
            normalises the batch on the device; needs a transform with ``device_views()``: TrainTransform,
            MultiCrop) or ``"auto"`` (device on CUDA when the transform allows it). The random draws, hence
            the batches' crops and an exact resume, are the same on both paths.

    ``len(loader)`` is this rank's number of batches per epoch; an epoch that was run to its end moves
    on to the next one at the next ``iter()``.  ``state_dict()`` / ``load_state_dict()`` give an exact
    mid-epoch resume (same world_size, rank, num_workers, seed, batch size and data).  ``stats`` counts
    corrupt samples and bad shards (skipped, logged once each on logger ``mimscale.data``).
    """

    def __init__(
        self,
        source: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        batch_size: int,
        transform: Callable,
        collate: Callable | None = None,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 2,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        samples_per_epoch: int | None = None,
        manifest: str | os.PathLike | None = None,
        mode: str = "train",
        pin_memory: bool = False,
        prefetch_factor: int = 2,
        multiprocessing_context: str | None = None,
        decode: str = "cpu",
    ):
        if mode not in ("train", "eval"):
            raise DataError(f"mode must be 'train' or 'eval', got {mode!r}")
        if int(batch_size) < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        if int(world_size) < 1 or not 0 <= int(rank) < int(world_size):
            raise DataError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if int(num_workers) < 0:
            raise DataError(f"num_workers must be >= 0, got {num_workers}")
        if samples_per_epoch is not None and int(samples_per_epoch) < 1:
            raise DataError(f"samples_per_epoch must be >= 1, got {samples_per_epoch}")
        if transform is None:
            raise DataError("ShardLoader needs a transform, e.g. mimscale.data.TrainTransform(img_size)")
        self.batch_size, self.rank, self.world_size = int(batch_size), int(rank), int(world_size)
        self.num_workers, self.seed, self.mode = int(num_workers), int(seed), mode
        self.shuffle = bool(shuffle) and mode == "train"
        self.shuffle_buffer = max(0, int(shuffle_buffer))
        self.transform, self.collate = transform, (collate or default_collate)
        self.decode = resolve_decode(decode, transform)
        self._decoder: DeviceDecoder | None = None
        if self.decode == "device":
            device_path = device_views_of(transform)
            assert device_path is not None  # resolve_decode chose "device" only for a transform that has one
            views, stacked = device_path
            self._decoder = DeviceDecoder(views, stacked)
            self.transform, self.collate = DeviceViews(views), PackedCollate(self.collate)
        self.pin_memory, self.prefetch_factor = bool(pin_memory), int(prefetch_factor)
        self.multiprocessing_context = multiprocessing_context

        self.urls, dir_manifest = expand_source(source)
        if not self.urls:
            raise DataError(f"data source {source!r} names no shards")
        for url in self.urls:
            if shard_command(url) is None and not os.path.isfile(url):  # (remote/pipe shards are read as streams)
                raise DataError(f"shard file not found: {url}")
        self.names = [url_shard_name(u) for u in self.urls]
        self.counts = self._find_counts(manifest or dir_manifest, samples_per_epoch)
        if samples_per_epoch is not None:
            self.samples_per_epoch = int(samples_per_epoch)
        else:
            assert self.counts is not None  # _find_counts raises when it has neither counts nor samples_per_epoch
            self.samples_per_epoch = sum(self.counts)
        self._streams = max(1, self.num_workers)
        if self.samples_per_epoch == 0:
            raise DataError(f"the shards of {source!r} hold no samples; write them again")
        if mode == "train":
            self._batches = self.samples_per_epoch // (self.world_size * self.batch_size)
            if self._batches < 1:
                raise DataError(
                    f"samples_per_epoch={self.samples_per_epoch} is less than world_size*batch_size="
                    f"{self.world_size * self.batch_size}; lower batch_size or add data"
                )
            n, W, nw = len(self.urls), self.world_size, self._streams
            rank_shards = n if n < W else len(range(self.rank, n, W))
            amplification = (W if n < W else 1) * (nw if rank_shards < nw else 1)
            if amplification > 1:
                log.warning(
                    "rank %d: %d shard(s) for world_size %d x %d workers, so streams share shards and keep "
                    "every k-th sample, reading %dx more data than needed; write at least %d shards",
                    self.rank,
                    n,
                    W,
                    nw,
                    amplification,
                    W * nw,
                )
        else:
            per_rank = math.ceil(self.samples_per_epoch / self.world_size)
            self._batches = math.ceil(per_rank / self.batch_size)
        self._epoch = 0
        self._consumed = 0
        self._cursors = [0] * self._streams
        self._epoch_done = False
        self._bad_samples: set[str] = set()
        self._bad_shards: set[str] = set()

    def _find_counts(self, manifest: str | os.PathLike | None, samples_per_epoch: int | None) -> list[int] | None:
        """Per-shard sample counts from the given manifest or the manifests beside local shards."""
        tables: dict[str, dict[str, int]] = {}

        def table(path: str) -> dict[str, int]:
            if path not in tables:
                tables[path] = {s["name"]: s["count"] for s in read_manifest(path)["shards"]}
            return tables[path]

        counts: list[int] = []
        for url, name in zip(self.urls, self.names):
            if manifest is not None:
                t = table(os.fspath(manifest))
            else:
                local = local_path_of(url)
                beside = os.path.join(os.path.dirname(local), MANIFEST_NAME) if local else None
                if beside is None or not os.path.isfile(beside):
                    if samples_per_epoch is None:
                        raise DataError(
                            f"no manifest.json beside shard {url}; pass manifest=PATH or samples_per_epoch=N"
                        )
                    return None
                t = table(beside)
            if name not in t:
                if samples_per_epoch is None:
                    where = manifest or os.path.join(os.path.dirname(local_path_of(url) or ""), MANIFEST_NAME)
                    raise DataError(
                        f"shard {name} is not listed in {where}; pass the right manifest= or samples_per_epoch=N"
                    )
                return None
            counts.append(t[name])
        return counts

    # ---- public API
    def to_device(self, batch: dict, device: torch.device | str) -> dict:
        """A collated batch on ``device``: tensors moved (on CUDA: non-blocking copies from pinned memory, a tensor
        the DataLoader did not pin is pinned first, so no copy blocks the host); on the
        device-decode path also ``image`` decoded, cropped, resized, flipped and normalised there (the
        batch's ``encoded*``, ``image_info`` and ``crop_boxes`` are consumed)."""
        device = torch.device(device)
        if self._decoder is not None:
            batch = self._decoder.decode(dict(batch), device)
        if device.type != "cuda":
            return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        return {k: _pinned(v).to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def __len__(self) -> int:
        return self._batches

    @property
    def batches_per_epoch(self) -> int:
        return self._batches

    @property
    def epoch(self) -> int:
        """The epoch the next batch belongs to."""
        return self._epoch + 1 if self._epoch_done else self._epoch

    @property
    def stats(self) -> dict[str, int]:
        """Distinct corrupt samples and bad shards met so far (each is logged once)."""
        stats = {"skipped_samples": len(self._bad_samples), "bad_shards": len(self._bad_shards)}
        if self._decoder is not None:
            stats["device_decode_failed"] = self._decoder.failed
        return stats

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning on the next iteration.  Setting the epoch that is already in
        progress keeps the position, so a trainer's customary ``set_epoch`` does not undo a resume."""
        epoch = int(epoch)
        if epoch == self._epoch and not self._epoch_done:
            return
        self._epoch, self._consumed, self._epoch_done = epoch, 0, False
        self._cursors = [0] * self._streams

    def state_dict(self) -> dict:
        epoch, consumed, cursors = self._epoch, self._consumed, list(self._cursors)
        if self._epoch_done:
            epoch, consumed, cursors = epoch + 1, 0, [0] * self._streams
        return {
            "format": STATE_FORMAT,
            "epoch": epoch,
            "batches": consumed,
            "cursors": cursors,
            **self._layout(),
            "bad_samples": sorted(self._bad_samples),
            "bad_shards": sorted(self._bad_shards),
        }

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise DataError(
                "loader state is not a mimscale-loader/1 state; pass what ShardLoader.state_dict() returned"
            )
        for key, value in self._layout().items():
            if state.get(key) != value:
                raise DataError(
                    f"loader state was saved with {key}={state.get(key)!r} but this loader has "
                    f"{key}={value!r}; exact resume needs the same {key}"
                )
        batches, cursors = int(state["batches"]), [int(c) for c in state["cursors"]]
        if not 0 <= batches <= self._batches or len(cursors) != self._streams:
            raise DataError(f"loader state has batches={batches} of {self._batches}; it belongs to another data layout")
        self._epoch, self._consumed, self._cursors, self._epoch_done = int(state["epoch"]), batches, cursors, False
        if batches == self._batches:
            self._epoch_done = True
        self._bad_samples = set(state.get("bad_samples", ()))
        self._bad_shards = set(state.get("bad_shards", ()))

    def _layout(self) -> dict:
        return {
            "mode": self.mode,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self._streams,
            "batch_size": self.batch_size,
            "samples_per_epoch": self.samples_per_epoch,
            "num_shards": len(self.urls),
            "shuffle": self.shuffle,
            "shuffle_buffer": self.shuffle_buffer if self.shuffle else 0,
        }

    def __iter__(self) -> Iterator[Any]:
        if self._epoch_done:
            self._epoch, self._consumed, self._epoch_done = self._epoch + 1, 0, False
            self._cursors = [0] * self._streams
        plan = Plan(
            urls=self.urls,
            names=self.names,
            counts=self.counts,
            transform=self.transform,
            collate=self.collate,
            mode=self.mode,
            epoch=self._epoch,
            seed=self.seed,
            rank=self.rank,
            world_size=self.world_size,
            num_streams=self._streams,
            batch_size=self.batch_size,
            batches_per_epoch=self._batches,
            total=self.samples_per_epoch,
            start_batch=self._consumed,
            cursors=list(self._cursors),
            shuffle=self.shuffle,
            shuffle_buffer=self.shuffle_buffer,
        )
        epoch = self._run(plan)
        _LIVE_EPOCHS.add(epoch)
        return epoch

    def _run(self, plan: Plan) -> Iterator[Any]:
        if self._consumed >= self._batches:
            self._epoch_done = True
            return
        kwargs: dict[str, Any] = {}
        if self.num_workers > 0:
            kwargs = {"prefetch_factor": self.prefetch_factor, "multiprocessing_context": self.multiprocessing_context}
        loader = DataLoader(
            EpochDataset(plan),
            batch_size=None,
            collate_fn=passthrough,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            generator=torch.Generator().manual_seed(0),  # keeps the global RNG untouched
            worker_init_fn=worker_ignores_signals if self.num_workers > 0 else None,
            **kwargs,
        )
        it = iter(loader)
        try:
            for item in it:
                if item[0] == "error":
                    raise DataError(item[1])
                _, batch, meta = item
                if meta["index"] != self._consumed:  # pragma: no cover - would be a bug in the worker split
                    raise RuntimeError(f"loader produced batch {meta['index']} where {self._consumed} was due")
                self._consumed += 1
                self._cursors[meta["worker"]] = meta["cursor"]
                self._record(meta["events"])
                if self._consumed == self._batches:
                    self._epoch_done = True
                yield batch
            if self._consumed < self._batches:  # pragma: no cover - would be a bug in the worker split
                raise RuntimeError(f"loader stopped after {self._consumed} of {self._batches} batches")
        finally:
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    def _record(self, events: list[tuple[str, str, str]]) -> None:
        for kind, name, reason in events:
            seen = self._bad_samples if kind == "sample" else self._bad_shards
            if name not in seen:
                seen.add(name)
                if kind == "sample":
                    log.warning("skipped corrupt sample %s (%s)", name, reason)
                else:
                    log.warning("skipped the rest of bad shard %s (%s)", name, reason)

    def __repr__(self) -> str:
        return (
            f"ShardLoader({len(self.urls)} shards, mode={self.mode}, rank={self.rank}/{self.world_size}, "
            f"batch_size={self.batch_size}, workers={self.num_workers}, batches_per_epoch={self._batches}, "
            f"decode={self.decode})"
        )


def _pinned(t: torch.Tensor) -> torch.Tensor:
    """``t`` in page-locked memory (as is when it already is, or lives on a device): a non-blocking copy source."""
    return t.pin_memory() if t.device.type == "cpu" and not t.is_pinned() else t
