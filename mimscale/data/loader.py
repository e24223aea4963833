"""Streaming WebDataset loader with rank/worker splitting, fixed epoch length and exact resume.

Data flow inside one *stream* (= one DataLoader worker of one rank)::

    shard list --(epoch permutation, split by rank then by worker, cycled)--> raw samples (bytes only)
      --(shuffle buffer)--> raw sample #c --(decode + transform with generator(seed, epoch, rank, worker, c))-->
      --(B at a time)--> collate(samples, generator(seed, epoch, rank, worker, batch_index)) --> batch

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

import gzip
import hashlib
import io
import logging
import math
import os
import random
import re
import shlex
import subprocess
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mimscale.errors import DataError

from .shards import IMAGE_EXTENSIONS, MANIFEST_NAME, read_manifest

__all__ = ["ShardLoader", "default_collate", "expand_source", "iter_tar_samples"]

log = logging.getLogger("mimscale.data")

STATE_FORMAT = "mimscale-loader/1"
_CYCLE_END = object()  # marks the end of one pass of a train stream over its shards
_TAG_SHARDS, _TAG_CYCLE, _TAG_BUFFER, _TAG_AUG, _TAG_COLLATE = 1, 2, 3, 4, 5


def _mix(*parts: int) -> int:
    """Stable 63-bit seed from a tuple of ints (independent of PYTHONHASHSEED, platform and process)."""
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(int(p).to_bytes(16, "little", signed=True))
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def _generator(*parts: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(_mix(*parts))
    return g


# --------------------------------------------------------------------------------------------- sources


def _expand(pattern: str) -> list[str]:
    import braceexpand

    return list(braceexpand.braceexpand(pattern))


def expand_source(source: str | os.PathLike | Sequence[str | os.PathLike]) -> tuple[list[str], str | None]:
    """Shard URLs of ``source`` and the manifest that lists them (for a shard directory), else None.

    ``source``: a directory with ``manifest.json``; a path, brace pattern
    (``/d/train-{000000..000011}.tar``) or ``pipe:CMD ARGS``; or a list of those.
    """
    if isinstance(source, (str, os.PathLike)):
        items = [os.fspath(source)]
    else:
        items = [os.fspath(s) for s in source]
    urls: list[str] = []
    manifest = None
    for item in items:
        if not item.startswith("pipe:") and os.path.isdir(item):
            m = read_manifest(item)
            urls.extend(os.path.join(item, s["name"]) for s in m["shards"])
            manifest = os.path.join(item, MANIFEST_NAME) if len(items) == 1 else None
        else:
            urls.extend(_expand(item))
    return urls, manifest


def _shard_name(url: str) -> str:
    if url.startswith("pipe:"):
        parts = shlex.split(url[5:])
        return os.path.basename(parts[-1]) if parts else url
    return os.path.basename(url)


def _local_path_of(url: str) -> str | None:
    """The file a shard URL reads: the path itself, or a pipe's last argument if that is an existing file."""
    if not url.startswith("pipe:"):
        return url
    parts = shlex.split(url[5:])
    if parts and os.path.isfile(parts[-1]):
        return parts[-1]
    return None


class ShardReadError(Exception):
    """A shard could not be (completely) read."""


_BLOCK = 512


def _read_exact(f, n: int) -> bytes:
    data = f.read(n)
    if len(data) == n or not data:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        more = f.read(n - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for big values
        return int.from_bytes(field[1:], "big")
    field = field.split(b"\0", 1)[0].strip()
    return int(field, 8) if field else 0


def _tar_members(f) -> Iterator[tuple[str, bytes]]:
    """``(name, data)`` of the regular files of a tar stream (ustar, GNU long names, pax paths).

    Raises ShardReadError on a bad header, truncated data or a missing end-of-archive marker."""
    long_name: str | None = None
    while True:
        head = _read_exact(f, _BLOCK)
        if len(head) < _BLOCK:
            raise ShardReadError("unexpected end of file (no end-of-archive marker; truncated?)")
        if head.count(0) == _BLOCK:
            return
        try:
            stored = _octal(head[148:156])
            size = _octal(head[124:136])
        except ValueError:
            raise ShardReadError("corrupt tar header") from None
        rest = head[:148] + head[156:]
        unsigned = sum(rest) + 8 * 0x20  # the checksum field counts as 8 spaces
        if stored != unsigned and stored != unsigned - 256 * sum(1 for b in rest if b > 127):  # old signed variant
            raise ShardReadError("corrupt tar header (checksum mismatch)")
        kind = head[156:157]
        padded = size + (-size % _BLOCK)
        data = _read_exact(f, padded)
        if len(data) < padded:
            raise ShardReadError("unexpected end of file inside a member (truncated?)")
        data = data[:size]
        if kind in (b"L",):  # GNU long name for the next member
            long_name = data.split(b"\0", 1)[0].decode("utf-8", "replace")
            continue
        if kind == b"x":  # pax header: only 'path' matters here
            for rec in data.split(b"\n"):
                _, _, kv = rec.partition(b" ")
                k, eq, v = kv.partition(b"=")
                if eq and k == b"path":
                    long_name = v.decode("utf-8", "replace")
            continue
        if kind not in (b"0", b"\0", b"7"):
            long_name = None
            continue
        if long_name is not None:
            name, long_name = long_name, None
        else:
            name = head[0:100].split(b"\0", 1)[0].decode("utf-8", "replace")
            if head[257:262] == b"ustar" and head[345] != 0:
                name = head[345:500].split(b"\0", 1)[0].decode("utf-8", "replace") + "/" + name
        yield name, data


def iter_tar_samples(fileobj, shard: str) -> Iterator[dict]:
    """Group the members of a (streamed, optionally gzipped) WebDataset tar into samples
    ``{"__key__", "__shard__", ext: bytes}``; the key is the member path up to the first dot of its basename.

    Raises :class:`ShardReadError` on a truncated or corrupt archive, after yielding every sample that was
    complete before the damage (the sample being read when it happened is dropped).
    """
    f = fileobj
    peek = getattr(f, "peek", None)
    if peek is not None and peek(2)[:2] == b"\x1f\x8b":
        f = gzip.GzipFile(fileobj=f, mode="rb")
    current: dict | None = None
    try:
        for name, data in _tar_members(f):
            dirname, _, base = name.rpartition("/")
            stem, dot, ext = base.partition(".")
            if not dot or not stem:
                continue
            key = f"{dirname}/{stem}" if dirname else stem
            if current is not None and current["__key__"] != key:
                yield current
                current = None
            if current is None:
                current = {"__key__": key, "__shard__": shard}
            current[ext.lower()] = data
    except ShardReadError:
        raise
    except (EOFError, OSError, zlib.error) as e:
        raise ShardReadError(f"{type(e).__name__}: {e}") from None
    if current is not None:
        yield current


def _read_shard(url: str) -> Iterator[dict]:
    """Samples of one shard (local file or ``pipe:`` command, never through a shell)."""
    name = _shard_name(url)
    if not url.startswith("pipe:"):
        try:
            f = open(url, "rb", buffering=1 << 20)
        except OSError as e:
            raise ShardReadError(f"cannot open: {e.strerror}") from None
        with f:
            yield from iter_tar_samples(f, name)
        return
    argv = shlex.split(url[5:])
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, bufsize=1 << 20)
    except (OSError, ValueError) as e:
        raise ShardReadError(f"cannot start {argv[:1]}: {e}") from None
    finished = False
    try:
        yield from iter_tar_samples(proc.stdout, name)
        finished = True
        while proc.stdout.read(1 << 20):  # drain trailing padding so the writer does not die of SIGPIPE
            pass
    finally:
        proc.stdout.close()
        if not finished and proc.poll() is None:
            proc.kill()
        rc = proc.wait()
    if rc != 0:
        raise ShardReadError(f"command {argv[0]} exited with status {rc}")


# --------------------------------------------------------------------------------------------- samples


def _decode_npy(data: bytes) -> torch.Tensor:
    arr = np.load(io.BytesIO(data), allow_pickle=False)
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return torch.from_numpy(np.ascontiguousarray(arr))


def default_collate(samples: list[dict], generator: torch.Generator | None = None) -> dict:
    """Stack ``image`` -> ``[B, C, H, W]``, ``label`` -> LongTensor ``[B]``, ``valid`` -> BoolTensor ``[B]``;
    ``key`` -> ``list[str]``.  Extra fields: tensors of equal shape are stacked, anything else is a list."""
    batch: dict[str, Any] = {
        "image": torch.stack([s["image"] for s in samples]),
        "label": torch.tensor([int(s["label"]) for s in samples], dtype=torch.long),
        "key": [s["key"] for s in samples],
    }
    names: list[str] = []
    for s in samples:
        names.extend(k for k in s if k not in batch and k not in names)
    for name in names:
        values = [s.get(name) for s in samples]
        if name == "valid":
            batch[name] = torch.tensor([bool(v) for v in values], dtype=torch.bool)
        elif all(isinstance(v, torch.Tensor) for v in values) and len({tuple(v.shape) for v in values}) == 1:
            batch[name] = torch.stack(values)
        else:
            batch[name] = values
    return batch


@dataclass
class _Plan:
    """Everything a worker needs for one epoch (pickled to each worker when it starts)."""

    urls: list[str]
    names: list[str]
    counts: list[int] | None
    transform: Callable
    collate: Callable
    mode: str
    epoch: int
    seed: int
    rank: int
    world_size: int
    num_streams: int  # workers per rank (>= 1)
    batch_size: int
    batches_per_epoch: int
    total: int  # eval: number of sample positions covered
    start_batch: int
    cursors: list[int]
    shuffle: bool
    shuffle_buffer: int


class _Stream:
    """One worker's stream for one epoch."""

    def __init__(self, plan: _Plan, worker: int):
        self.p = plan
        self.w = worker
        self.events: list[tuple[str, str, str]] = []
        self.cycle_raw: int | None = None  # raw samples per full pass over this stream's shards (train)
        self.last_sample: dict | None = None
        self.last_failure = ""

    # ---- decoding
    def decode(self, raw: dict, index: int) -> dict | None:
        p = self.p
        key, shard = raw["__key__"], raw["__shard__"]
        img_ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
        try:
            if img_ext is None:
                raise ValueError(f"no image field ({'/'.join(IMAGE_EXTENSIONS)})")
            from PIL import Image

            img = Image.open(io.BytesIO(raw[img_ext]))
            img.load()
            label = int(raw["cls"]) if "cls" in raw else -1
            extras: dict[str, Any] = {}
            for ext, value in raw.items():
                if ext.startswith("__") or ext == img_ext or ext == "cls":
                    continue
                extras[ext] = _decode_npy(value) if ext == "npy" or ext.endswith(".npy") else value
            gen = _generator(p.seed, _TAG_AUG, p.epoch, p.rank, self.w, index)
            out = p.transform(img, gen)
            views = out if isinstance(out, dict) else {"image": out}
            if "image" not in views:
                raise ValueError(f"the transform returned {sorted(views)} without an 'image' entry")
        except Exception as e:  # noqa: BLE001 - any undecodable sample is skipped, counted and reported
            reason = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>", "", f"{type(e).__name__}: {e}")
            reason = (reason.splitlines() or [""])[0][:200]
            self.last_failure = f"{shard}/{key}: {reason}"
            self.events.append(("sample", f"{shard}/{key}", reason))
            return None
        sample = {**views, "label": label, "key": key, **extras}
        self.last_sample = sample
        return sample

    def shard_samples(self, index: int) -> Iterator[dict]:
        """Samples of shard ``index``; a read error ends the shard and is reported."""
        try:
            yield from _read_shard(self.p.urls[index])
        except ShardReadError as e:
            self.events.append(("shard", self.p.names[index], str(e)))

    def collate(self, samples: list[dict], j: int) -> Any:
        return self.p.collate(samples, _generator(self.p.seed, _TAG_COLLATE, self.p.epoch, self.p.rank, self.w, j))

    def emit(self, batch: Any, j: int, cursor: int) -> tuple:
        events, self.events = self.events, []
        return ("batch", batch, {"worker": self.w, "index": j, "cursor": cursor, "events": events})

    # ---- train
    def train_raw(self) -> Iterator[dict]:
        """Endless raw samples of this stream: shard-level split when there are enough shards, else
        every stream reads all (of the rank's) shards and keeps every k-th sample."""
        p, w = self.p, self.w
        order = list(range(len(p.urls)))
        if p.shuffle:
            random.Random(_mix(p.seed, _TAG_SHARDS, p.epoch)).shuffle(order)
        if len(order) >= p.world_size:
            mine, rank_filter = order[p.rank::p.world_size], None
        else:
            mine, rank_filter = order, (p.rank, p.world_size)
        if len(mine) >= p.num_streams:
            mine, worker_filter = mine[w::p.num_streams], None
        else:
            worker_filter = (w, p.num_streams)
        rank_pos = worker_pos = 0
        cycle = 0
        while True:
            shards = list(mine)
            if cycle > 0 and p.shuffle:  # the same order in every stream that shares these shards
                random.Random(_mix(p.seed, _TAG_CYCLE, p.epoch, cycle)).shuffle(shards)
            raw_count = 0
            for idx in shards:
                for sample in self.shard_samples(idx):
                    raw_count += 1
                    if rank_filter is not None:
                        rank_pos += 1
                        if (rank_pos - 1) % rank_filter[1] != rank_filter[0]:
                            continue
                    if worker_filter is not None:
                        worker_pos += 1
                        if (worker_pos - 1) % worker_filter[1] != worker_filter[0]:
                            continue
                    yield sample
            if raw_count == 0:
                names = ", ".join(p.names[i] for i in mine[:3]) + (", ..." if len(mine) > 3 else "")
                raise DataError(f"rank {p.rank} worker {w} cannot read any sample from its {len(mine)} shard(s) "
                                f"({names}); check or rewrite these shards")
            self.cycle_raw = raw_count
            cycle += 1
            yield _CYCLE_END

    def shuffled(self, it: Iterator[Any]) -> Iterator[dict]:
        """Shuffle buffer over raw samples, drained at every end of a pass (``_CYCLE_END``) so that a
        stream emits all of one pass before repeating anything."""
        p = self.p
        size = p.shuffle_buffer if p.shuffle else 0
        rng = random.Random(_mix(p.seed, _TAG_BUFFER, p.epoch, p.rank, self.w))
        buf: list[dict] = []
        for x in it:
            if x is _CYCLE_END:
                while buf:
                    k = rng.randrange(len(buf))
                    buf[k], buf[-1] = buf[-1], buf[k]
                    yield buf.pop()
                continue
            if size <= 1:
                yield x
            elif len(buf) < size:
                buf.append(x)
            else:
                k = rng.randrange(size)
                buf[k], x = x, buf[k]
                yield x

    def train_batches(self) -> Iterator[tuple]:
        p, w, nw = self.p, self.w, self.p.num_streams
        first = p.start_batch + (w - p.start_batch) % nw
        batch_ids = iter(range(first, p.batches_per_epoch, nw))
        j = next(batch_ids, None)
        if j is None:
            return
        skip = p.cursors[w]
        raw = self.train_raw()
        stream = self.shuffled(raw)
        samples: list[dict] = []
        failures = 0
        try:
            for cursor, item in enumerate(stream):
                if cursor < skip:  # fast-forward after a resume: bytes only, no decoding, no RNG
                    continue
                sample = self.decode(item, cursor)
                if sample is None:
                    failures += 1
                    limit = None if self.cycle_raw is None else 10 * p.shuffle_buffer + 2 * self.cycle_raw + 100
                    if limit is not None and failures > limit:
                        raise DataError(f"rank {p.rank} worker {w}: no decodable sample in {failures} tries "
                                        f"(last: {self.last_failure}); check the shards")
                    continue
                failures = 0
                samples.append(sample)
                if len(samples) == p.batch_size:
                    yield self.emit(self.collate(samples, j), j, cursor + 1)
                    samples = []
                    j = next(batch_ids, None)
                    if j is None:
                        return
        finally:
            stream.close()
            raw.close()

    # ---- eval
    def positions(self, lo: int, hi: int) -> Iterator[tuple[int, dict]]:
        """``(position, raw sample)`` for the global sample positions in ``[lo, hi)``, in order."""
        p = self.p
        if lo >= hi:
            return
        if p.counts is not None:
            offset = 0
            for idx, count in enumerate(p.counts):
                start, offset = offset, offset + count
                if offset <= lo:
                    continue
                if start >= hi:
                    return
                for i, sample in enumerate(self.shard_samples(idx)):
                    if i >= count or start + i >= hi:
                        break
                    if start + i >= lo:
                        yield start + i, sample
        else:
            pos = 0
            for idx in range(len(p.urls)):
                for sample in self.shard_samples(idx):
                    if pos >= hi:
                        return
                    if pos >= lo:
                        yield pos, sample
                    pos += 1

    def template(self) -> dict:
        """A decoded sample to copy into padding slots."""
        if self.last_sample is not None:
            return self.last_sample
        for idx in range(len(self.p.urls)):
            for i, raw in enumerate(self.shard_samples(idx)):
                if self.decode(raw, -1 - i) is not None:
                    return self.last_sample
        raise DataError(f"no decodable sample in any of the {len(self.p.urls)} shard(s) "
                        f"(last problem: {self.last_failure or 'no samples'}); check the shards")

    def eval_batches(self) -> Iterator[tuple]:
        p, w, nw, B = self.p, self.w, self.p.num_streams, self.p.batch_size
        nb = p.batches_per_epoch
        lo_r = p.rank * p.total // p.world_size
        hi_r = (p.rank + 1) * p.total // p.world_size
        per_worker = [len(range(v, nb, nw)) for v in range(nw)]
        base = lo_r + B * sum(per_worker[:w])  # this worker owns [base, base + per_worker[w] * B) ∩ [lo_r, hi_r)
        k = len(range(w, p.start_batch, nw))  # this worker's batches already handed out
        if k >= per_worker[w]:
            return
        slots: list[dict] = []

        def finish(k: int) -> tuple:
            j = w + k * nw
            if len(slots) < B:
                pad = dict(self.template(), label=-1, key="", valid=False)
                slots.extend([pad] * (B - len(slots)))
            batch = self.collate(slots, j)
            if isinstance(batch, dict) and "valid" not in batch:
                batch["valid"] = torch.tensor([bool(s.get("valid")) for s in slots], dtype=torch.bool)
            return self.emit(batch, j, 0)

        for pos, raw in self.positions(base + k * B, min(base + per_worker[w] * B, hi_r)):
            while (pos - base) // B > k:
                yield finish(k)
                slots, k = [], k + 1
            sample = self.decode(raw, pos)
            if sample is not None:
                sample["valid"] = True
                slots.append(sample)
        while k < per_worker[w]:
            yield finish(k)
            slots, k = [], k + 1


class _EpochDataset(IterableDataset):
    """Yields ``("batch", batch, meta)`` tuples (or one ``("error", message)``) for one epoch of one rank."""

    def __init__(self, plan: _Plan):
        super().__init__()
        self.plan = plan

    def __iter__(self):
        info = get_worker_info()
        worker = 0 if info is None else (info.id + self.plan.start_batch) % self.plan.num_streams
        stream = _Stream(self.plan, worker)
        try:
            if self.plan.mode == "train":
                yield from stream.train_batches()
            else:
                yield from stream.eval_batches()
        except DataError as e:
            yield ("error", str(e))


def _passthrough(item):
    return item


# --------------------------------------------------------------------------------------------- loader


class ShardLoader:
    """Iterable of batches over WebDataset shards; see the module docstring for the data flow.

    Args:
        source: a shard directory with ``manifest.json``, a path, a brace pattern
            (``/d/train-{000000..000011}.tar``), ``pipe:CMD ARGS`` (split with shlex, never run by a
            shell), or a list of those.
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
        targets: cached teacher targets the caller will use, ``{"names": ["kclip.npy"], "image_size": S,
            "crop_pct": 1.0}``: refused (DataError) unless the manifest records that crop rule and size
            (:func:`mimscale.data.targets.check_targets`).

    ``len(loader)`` is this rank's number of batches per epoch; an epoch that was run to its end moves
    on to the next one at the next ``iter()``.  ``state_dict()`` / ``load_state_dict()`` give an exact
    mid-epoch resume (same world_size, rank, num_workers, seed, batch size and data).  ``stats`` counts
    corrupt samples and bad shards (skipped, logged once each on logger ``mimscale.data``).
    """

    def __init__(self, source: str | os.PathLike | Sequence[str | os.PathLike], *, batch_size: int,
                 transform: Callable, collate: Callable | None = None, rank: int = 0, world_size: int = 1,
                 num_workers: int = 2, seed: int = 0, shuffle: bool = True, shuffle_buffer: int = 1000,
                 samples_per_epoch: int | None = None, manifest: str | os.PathLike | None = None,
                 mode: str = "train", pin_memory: bool = False, prefetch_factor: int = 2,
                 multiprocessing_context: str | None = None, targets: dict | None = None):
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
        self.pin_memory, self.prefetch_factor = bool(pin_memory), int(prefetch_factor)
        self.multiprocessing_context = multiprocessing_context

        self.urls, dir_manifest = expand_source(source)
        if not self.urls:
            raise DataError(f"data source {source!r} names no shards")
        if targets:
            from .targets import check_targets

            check_targets(source, **targets)
        for url in self.urls:
            if not url.startswith("pipe:") and not os.path.isfile(url):
                if "://" in url:
                    raise DataError(f"shard {url} is not a local file; stream remote shards with 'pipe:curl -sL {url}'")
                raise DataError(f"shard file not found: {url}")
        self.names = [_shard_name(u) for u in self.urls]
        self.counts = self._find_counts(manifest or dir_manifest, samples_per_epoch)
        total = sum(self.counts) if self.counts is not None else None
        self.samples_per_epoch = int(samples_per_epoch) if samples_per_epoch is not None else total
        self._streams = max(1, self.num_workers)
        if self.samples_per_epoch == 0:
            raise DataError(f"the shards of {source!r} hold no samples; write them again")
        if mode == "train":
            self._batches = self.samples_per_epoch // (self.world_size * self.batch_size)
            if self._batches < 1:
                raise DataError(f"samples_per_epoch={self.samples_per_epoch} is less than world_size*batch_size="
                                f"{self.world_size * self.batch_size}; lower batch_size or add data")
            n, W, nw = len(self.urls), self.world_size, self._streams
            rank_shards = n if n < W else len(range(self.rank, n, W))
            amplification = (W if n < W else 1) * (nw if rank_shards < nw else 1)
            if amplification > 1:
                log.warning("rank %d: %d shard(s) for world_size %d x %d workers, so streams share shards and keep "
                            "every k-th sample, reading %dx more data than needed; write at least %d shards",
                            self.rank, n, W, nw, amplification, W * nw)
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
                local = _local_path_of(url)
                beside = os.path.join(os.path.dirname(local), MANIFEST_NAME) if local else None
                if beside is None or not os.path.isfile(beside):
                    if samples_per_epoch is None:
                        raise DataError(f"no manifest.json beside shard {url}; pass manifest=PATH or samples_per_epoch=N")
                    return None
                t = table(beside)
            if name not in t:
                if samples_per_epoch is None:
                    where = manifest or os.path.join(os.path.dirname(_local_path_of(url) or ""), MANIFEST_NAME)
                    raise DataError(f"shard {name} is not listed in {where}; pass the right manifest= or samples_per_epoch=N")
                return None
            counts.append(t[name])
        return counts

    # ---- public API
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
        return {"skipped_samples": len(self._bad_samples), "bad_shards": len(self._bad_shards)}

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
            "format": STATE_FORMAT, "epoch": epoch, "batches": consumed, "cursors": cursors,
            **self._layout(),
            "bad_samples": sorted(self._bad_samples), "bad_shards": sorted(self._bad_shards),
        }

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise DataError("loader state is not a mimscale-loader/1 state; pass what ShardLoader.state_dict() returned")
        for key, value in self._layout().items():
            if state.get(key) != value:
                raise DataError(f"loader state was saved with {key}={state.get(key)!r} but this loader has "
                                f"{key}={value!r}; exact resume needs the same {key}")
        batches, cursors = int(state["batches"]), [int(c) for c in state["cursors"]]
        if not 0 <= batches <= self._batches or len(cursors) != self._streams:
            raise DataError(f"loader state has batches={batches} of {self._batches}; it belongs to another data layout")
        self._epoch, self._consumed, self._cursors, self._epoch_done = int(state["epoch"]), batches, cursors, False
        if batches == self._batches:
            self._epoch_done = True
        self._bad_samples = set(state.get("bad_samples", ()))
        self._bad_shards = set(state.get("bad_shards", ()))

    def _layout(self) -> dict:
        return {"mode": self.mode, "seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                "num_workers": self._streams, "batch_size": self.batch_size,
                "samples_per_epoch": self.samples_per_epoch, "num_shards": len(self.urls),
                "shuffle": self.shuffle, "shuffle_buffer": self.shuffle_buffer if self.shuffle else 0}

    def __iter__(self) -> Iterator[Any]:
        if self._epoch_done:
            self._epoch, self._consumed, self._epoch_done = self._epoch + 1, 0, False
            self._cursors = [0] * self._streams
        plan = _Plan(
            urls=self.urls, names=self.names, counts=self.counts, transform=self.transform, collate=self.collate,
            mode=self.mode, epoch=self._epoch, seed=self.seed, rank=self.rank, world_size=self.world_size,
            num_streams=self._streams, batch_size=self.batch_size, batches_per_epoch=self._batches,
            total=self.samples_per_epoch, start_batch=self._consumed, cursors=list(self._cursors),
            shuffle=self.shuffle, shuffle_buffer=self.shuffle_buffer,
        )
        return self._run(plan)

    def _run(self, plan: _Plan) -> Iterator[Any]:
        if self._consumed >= self._batches:
            self._epoch_done = True
            return
        kwargs: dict[str, Any] = {}
        if self.num_workers > 0:
            kwargs = {"prefetch_factor": self.prefetch_factor, "multiprocessing_context": self.multiprocessing_context}
        loader = DataLoader(_EpochDataset(plan), batch_size=None, collate_fn=_passthrough,
                            num_workers=self.num_workers, pin_memory=self.pin_memory,
                            generator=torch.Generator().manual_seed(0),  # keeps the global RNG untouched
                            **kwargs)
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
        return (f"ShardLoader({len(self.urls)} shards, mode={self.mode}, rank={self.rank}/{self.world_size}, "
                f"batch_size={self.batch_size}, workers={self.num_workers}, batches_per_epoch={self._batches})")
