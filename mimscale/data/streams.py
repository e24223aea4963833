"""One loader worker's stream for one epoch: split, cycle, shuffle, decode, collate (see :mod:`mimscale.data.loader`)."""

from __future__ import annotations

import hashlib
import io
import random
import re
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from mimscale.errors import DataError

from .shards import IMAGE_EXTENSIONS
from .tario import ShardReadError, read_shard

__all__ = ["Plan", "EpochDataset", "default_collate", "stack_rows", "mix_seed", "seeded_generator"]

_CYCLE_END = object()  # marks the end of one pass of a train stream over its shards
_TAG_SHARDS, _TAG_CYCLE, _TAG_BUFFER, _TAG_AUG, _TAG_COLLATE = 1, 2, 3, 4, 5


def mix_seed(*parts: int) -> int:
    """Stable 63-bit seed from a tuple of ints (independent of PYTHONHASHSEED, platform and process)."""
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(int(p).to_bytes(16, "little", signed=True))
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def seeded_generator(*parts: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(mix_seed(*parts))
    return g


def _decode_npy(data: bytes) -> torch.Tensor:
    arr = np.load(io.BytesIO(data), allow_pickle=False)
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return torch.from_numpy(np.ascontiguousarray(arr))


def stack_rows(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``torch.stack(tensors)``, or without a copy the tensor they are the rows of (``base[0], base[1], ...``)."""
    base = tensors[0]._base
    if (
        base is not None
        and base.is_contiguous()
        and base.shape[0] == len(tensors)
        and all(
            t._base is base
            and t.storage_offset() == base.storage_offset() + i * t.numel()
            and t.shape == base.shape[1:]
            for i, t in enumerate(tensors)
        )
    ):
        return base
    return torch.stack(tensors)


def default_collate(samples: list[dict], generator: torch.Generator | None = None) -> dict:
    """Stack ``image`` -> ``[B, C, H, W]`` (when the samples have one), ``label`` -> LongTensor ``[B]``, ``valid`` -> BoolTensor ``[B]``;
    ``key`` -> ``list[str]``.  Extra fields: tensors of equal shape are stacked, anything else is a list."""
    batch: dict[str, Any] = {
        "label": torch.tensor([int(s["label"]) for s in samples], dtype=torch.long),
        "key": [s["key"] for s in samples],
    }
    if "image" in samples[0]:  # (absent on the device-decode path: ShardLoader.to_device makes it)
        batch = {"image": stack_rows([s["image"] for s in samples]), **batch}
    names: list[str] = []
    for s in samples:
        names.extend(k for k in s if k not in batch and k not in names)
    for name in names:
        values = [s.get(name) for s in samples]
        tensors = [v for v in values if isinstance(v, torch.Tensor)]
        if name == "valid":
            batch[name] = torch.tensor([bool(v) for v in values], dtype=torch.bool)
        elif len(tensors) == len(values) and len({tuple(v.shape) for v in tensors}) == 1:
            batch[name] = torch.stack(tensors)
        else:
            batch[name] = values
    return batch


@dataclass
class Plan:
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

    def __init__(self, plan: Plan, worker: int):
        self.p = plan
        self.w = worker
        self.events: list[tuple[str, str, str]] = []
        self.cycle_raw: int | None = None  # raw samples per full pass over this stream's shards (train)
        self.last_sample: dict | None = None
        self.last_failure = ""
        # a transform that normalises whole batches (TrainTransform(fast=True)): samples carry uint8 crops and
        # collate() writes them straight into the batch tensor (no per-sample float copy, no stack copy)
        self.batched = bool(getattr(plan.transform, "batched", False))

    # ---- decoding
    def decode(self, raw: dict, index: int) -> dict | None:
        p = self.p
        key, shard = raw["__key__"], raw["__shard__"]
        img_ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
        try:
            if img_ext is None:
                raise ValueError(f"no image field ({'/'.join(IMAGE_EXTENSIONS)})")
            from PIL import Image

            img = Image.open(io.BytesIO(raw[img_ext]))  # decoded by the transform (which may decode at reduced size)
            label = int(raw["cls"]) if "cls" in raw else -1
            extras: dict[str, Any] = {}
            for ext, value in raw.items():
                if ext.startswith("__") or ext == img_ext or ext == "cls":
                    continue
                extras[ext] = _decode_npy(value) if ext == "npy" or ext.endswith(".npy") else value
            gen = seeded_generator(p.seed, _TAG_AUG, p.epoch, p.rank, self.w, index)
            out = cast(Any, p.transform).crop_pixels(img, gen) if self.batched else p.transform(img, gen)
            views = out if isinstance(out, dict) else {"image": out}
            if "image" not in views and "encoded" not in views:  # (encoded: the device-decode path)
                raise ValueError(f"the transform returned {sorted(views)} without an 'image' entry")
        except Exception as e:
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
            yield from read_shard(self.p.urls[index])
        except ShardReadError as e:
            self.events.append(("shard", self.p.names[index], str(e)))

    def collate(self, samples: list[dict], j: int) -> Any:
        if self.batched:
            images = cast(Any, self.p.transform).finish_batch([s["image"] for s in samples])  # [B, C, H, W]
            samples = [dict(s, image=images[i]) for i, s in enumerate(samples)]  # views: stacked for free
        return self.p.collate(
            samples, seeded_generator(self.p.seed, _TAG_COLLATE, self.p.epoch, self.p.rank, self.w, j)
        )

    def emit(self, batch: Any, j: int, cursor: int) -> tuple:
        events, self.events = self.events, []
        return ("batch", batch, {"worker": self.w, "index": j, "cursor": cursor, "events": events})

    # ---- train
    def train_raw(self) -> Generator[Any, None, None]:
        """Endless raw samples of this stream: shard-level split when there are enough shards, else
        every stream reads all (of the rank's) shards and keeps every k-th sample."""
        p, w = self.p, self.w
        order = list(range(len(p.urls)))
        if p.shuffle:
            random.Random(mix_seed(p.seed, _TAG_SHARDS, p.epoch)).shuffle(order)
        if len(order) >= p.world_size:
            mine, rank_filter = order[p.rank :: p.world_size], None
        else:
            mine, rank_filter = order, (p.rank, p.world_size)
        if len(mine) >= p.num_streams:
            mine, worker_filter = mine[w :: p.num_streams], None
        else:
            worker_filter = (w, p.num_streams)
        rank_pos = worker_pos = 0
        cycle = 0
        while True:
            shards = list(mine)
            if cycle > 0 and p.shuffle:  # the same order in every stream that shares these shards
                random.Random(mix_seed(p.seed, _TAG_CYCLE, p.epoch, cycle)).shuffle(shards)
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
                raise DataError(
                    f"rank {p.rank} worker {w} cannot read any sample from its {len(mine)} shard(s) "
                    f"({names}); check or rewrite these shards"
                )
            self.cycle_raw = raw_count
            cycle += 1
            yield _CYCLE_END

    def shuffled(self, it: Iterator[Any]) -> Generator[dict, None, None]:
        """Shuffle buffer over raw samples, drained at every end of a pass (``_CYCLE_END``) so that a
        stream emits all of one pass before repeating anything."""
        p = self.p
        size = p.shuffle_buffer if p.shuffle else 0
        rng = random.Random(mix_seed(p.seed, _TAG_BUFFER, p.epoch, p.rank, self.w))
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
                        raise DataError(
                            f"rank {p.rank} worker {w}: no decodable sample in {failures} tries "
                            f"(last: {self.last_failure}); check the shards"
                        )
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
                sample = self.decode(raw, -1 - i)  # (also kept as last_sample)
                if sample is not None:
                    return sample
        raise DataError(
            f"no decodable sample in any of the {len(self.p.urls)} shard(s) "
            f"(last problem: {self.last_failure or 'no samples'}); check the shards"
        )

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


class EpochDataset(IterableDataset):
    """Yields ``("batch", batch, meta)`` tuples (or one ``("error", message)``) for one epoch of one rank."""

    def __init__(self, plan: Plan):
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


def passthrough(item):
    return item
