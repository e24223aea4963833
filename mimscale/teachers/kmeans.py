"""k-CLIP tokenizer: streaming k-means over frozen-teacher patch features (MaPeT targets, docs/objectives/mapet.md).

``mimscale teacher fit-kmeans SHARDS --teacher clip.pt --k 8192 --out km.pt``

Pipeline (:func:`fit_kmeans_shards`, one process per device under the training launchers): the teacher encodes
each image ONCE, each rank its contiguous share, into a memory-mapped :class:`FeatureCache`; k-means then runs
on the cached features on the device (torch), collectively: per-pass sums and counts are all-reduced.

Algorithm (:func:`fit_streaming`; never holds more than ``init_sample + one chunk`` feature vectors per rank):

1. **Sample pass**: a uniform sample of ``init_sample`` feature vectors without replacement, chosen as the
   points with the smallest hash key ``h(seed, global index)`` (bottom-k sampling: independent of how the
   stream is chunked).
2. **k-means++ init** on that sample (D^2 sampling from a seeded generator).
3. ``iters`` **streaming Lloyd passes** over the whole stream: each point is assigned to its nearest centroid,
   per-centroid sums (float64) and counts are accumulated, and the centroids become the means at the end of
   the pass (exact k-means iterations, so the result does not depend on the chunking beyond float rounding).
   A centroid left empty is re-seeded with the sampled point farthest from its nearest centroid.

Output file (``torch.save``, read back with ``weights_only=True``)::

    {"format": "mimscale-kmeans/1", "k": int, "dim": int, "centroids": float32 [k, dim],
     "l2_normalize": bool, "teacher": {"path", "sha256", "arch"}, "view": {crop rule, image size, grid, ...},
     "stats": {"points", "inertia", ...}}

:meth:`KMeans.assign` maps features ``[..., dim]`` to codes ``int64 [...]`` (nearest centroid, L2).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import CheckpointError, ConfigError

__all__ = [
    "KMEANS_FORMAT",
    "KMeans",
    "KCLIPTokenizer",
    "assign",
    "full_fp32_matmul",
    "kmeans_pp",
    "fit_streaming",
    "fit_kmeans_shards",
]

KMEANS_FORMAT = "mimscale-kmeans/1"
log = logging.getLogger("mimscale.teachers")


@contextlib.contextmanager
def full_fp32_matmul() -> Iterator[None]:
    """fp32 matmuls at full IEEE precision inside the block: no TF32 on CUDA (the Trainer turns it on with
    ``train.tf32``), no reduced-precision fp32 on CPU. The process-wide setting is restored afterwards."""
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)


def assign(x: torch.Tensor, centroids: torch.Tensor, chunk: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of each row: ``x [M, D]``, ``centroids [k, D]`` -> ``(codes int64 [M], sq. dist [M])``.

    Always in full fp32 (:func:`full_fp32_matmul`): codes assigned inside a TF32 training process equal the
    offline ones (``add-targets``, ``fit-kmeans``) even at near-ties."""
    c = centroids.to(x.dtype)
    c2 = (c * c).sum(1)
    codes, dists = [], []
    with full_fp32_matmul():
        for i in range(0, x.shape[0], chunk):
            xi = x[i : i + chunk]
            score = xi @ c.T - 0.5 * c2  # argmax of x.c - |c|^2/2 = argmin |x - c|^2
            best, idx = score.max(1)
            codes.append(idx)
            dists.append(((xi * xi).sum(1) - 2 * best).clamp_min(0))
    if not codes:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=x.dtype)
    return torch.cat(codes), torch.cat(dists)


def kmeans_pp(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ (D^2 sampling) seeds: ``x [n, D]`` -> ``[k, D]`` (``n >= k``)."""
    n = x.shape[0]
    if n < k:
        raise ConfigError(f"k-means++ needs at least k={k} points, got {n}; lower --k or raise --init-sample")
    idx = [int(torch.randint(n, (1,), generator=generator))]
    d2 = ((x - x[idx[0]]) ** 2).sum(1)
    for _ in range(1, k):
        total = float(d2.sum())
        if total <= 0:  # all remaining points coincide with a seed: take any not yet chosen
            j = int(torch.randint(n, (1,), generator=generator))
        else:
            j = int(torch.multinomial((d2 / total).cpu(), 1, generator=generator))  # seeded CPU draw, any device
        idx.append(j)
        d2 = torch.minimum(d2, ((x - x[j]) ** 2).sum(1))
    return x[idx].clone()


def _keys(seed: int, start: int, count: int) -> np.ndarray:
    """Uniform [0, 1) keys of global point indices ``start .. start+count-1`` (splitmix64; chunk-independent)."""
    with np.errstate(over="ignore"):
        z = np.arange(start, start + count, dtype=np.uint64) + np.uint64(seed & 0xFFFFFFFF) * np.uint64(1 << 40)
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def fit_streaming(
    batches: Callable[[], Iterable[torch.Tensor]],
    k: int,
    iters: int = 10,
    init_sample: int | None = None,
    seed: int = 0,
    l2_normalize: bool = False,
    tol: float = 1e-4,
    progress: Callable[[str], None] | None = None,
    offset: int = 0,
    collective: bool = False,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, dict]:
    """k-means over a re-iterable stream: ``batches()`` yields ``[m, D]`` feature chunks (on any device: the
    work runs where they are), the same points in the same order each time it is called. Returns
    ``(centroids float32 [k, D], stats)``; ``stats`` has ``points`` (per pass), ``stored`` (sample size),
    ``max_held`` (most feature rows held at once by this rank), ``inertia`` (mean squared distance, last
    pass), ``empty_clusters``, ``passes``.

    ``collective=True``: a collective over the default process group: each rank streams ITS slice of the
    points, whose first point has global index ``offset`` (the slices in rank order are the whole stream).
    The sample is the global bottom-k (only keys, then the chosen rows, are all-gathered: the sample is on
    every rank); per-pass sums, counts and errors are all-reduced; every rank returns the same centroids,
    equal to the one-process result on the concatenated stream up to float rounding of the sums.
    ``device``: where a rank whose slice is empty keeps its (empty) part of the collectives (NCCL: its GPU).
    """
    from .launch import all_gather_rows, all_sum

    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    cap = int(init_sample or min(max(20 * k, 20000), 200000))
    prep = (lambda t: F.normalize(t.float(), dim=-1)) if l2_normalize else (lambda t: t.float())
    say = progress or (lambda s: None)

    # 1. bottom-k uniform sample of the stream (keys of global indices: independent of chunking and ranks)
    sample: torch.Tensor | None = None  # (sample and keys are None together)
    keys: torch.Tensor | None = None
    seen, max_held, t0, dev = 0, 0, time.time(), None if device is None else torch.device(device)
    for chunk in batches():
        x = prep(chunk)
        dev = x.device
        kx = torch.from_numpy(_keys(seed, offset + seen, x.shape[0])).to(dev)
        seen += x.shape[0]
        if sample is None or keys is None:
            sample, keys = x, kx
        else:
            sample, keys = torch.cat([sample, x]), torch.cat([keys, kx])
        max_held = max(max_held, sample.shape[0])
        if sample.shape[0] > cap:
            keep = torch.topk(keys, cap, largest=False).indices.sort().values
            sample, keys = sample[keep].contiguous(), keys[keep]
    if collective:
        dim = _agree_dim(sample, dev)
        dev = dev or torch.device("cpu")
        if sample is None or keys is None:
            sample, keys = torch.zeros(0, dim, device=dev), torch.zeros(0, dtype=torch.float64, device=dev)
        seen = int(all_sum(torch.tensor([seen], dtype=torch.long, device=dev)).item())
        every = torch.cat(all_gather_rows(keys))
        if every.numel() > cap:  # the global cap-th smallest key
            threshold = torch.topk(every, cap, largest=False).values.max()
            mine = keys <= threshold
            sample, keys = sample[mine], keys[mine]
        sample, keys = torch.cat(all_gather_rows(sample)), torch.cat(all_gather_rows(keys))
        max_held = max(max_held, sample.shape[0])
    if sample is None or keys is None or seen < k:
        raise ConfigError(f"k-means needs at least k={k} feature vectors, the stream has {seen}")
    order = torch.argsort(keys)  # canonical order of the sample: by key (chunk-independent)
    sample = sample[order]
    say(f"k-means: sampled {sample.shape[0]} of {seen} vectors ({time.time() - t0:.0f} s); k-means++ init, k={k}")

    # 2. k-means++ on the sample (the same on every rank: same sample, same seeded CPU generator)
    gen = torch.Generator().manual_seed(seed)
    centroids = kmeans_pp(sample, k, gen)

    # 3. streaming Lloyd passes
    stats = {"points": seen, "stored": int(sample.shape[0]), "inertia": float("nan"), "empty_clusters": 0, "passes": 0}
    prev = None
    for it in range(iters):
        t1 = time.time()
        sums = torch.zeros(k, centroids.shape[1], dtype=torch.float64, device=sample.device)
        counts = torch.zeros(k, dtype=torch.float64, device=sample.device)
        sse_n = torch.zeros(2, dtype=torch.float64, device=sample.device)  # [sum of d^2, points]
        for chunk in batches():
            x = prep(chunk)
            max_held = max(max_held, sample.shape[0] + x.shape[0])
            codes, d2 = assign(x, centroids)
            sums.index_add_(0, codes, x.double())
            counts += torch.bincount(codes, minlength=k).double()
            sse_n[0] += d2.double().sum()
            sse_n[1] += x.shape[0]
        if collective:
            for t in (sums, counts, sse_n):
                all_sum(t)
        sse, n = float(sse_n[0]), int(sse_n[1])
        if n != seen:
            raise ConfigError(f"the feature stream changed between passes ({seen} then {n} vectors)")
        empty = counts == 0
        new = (sums / counts.clamp_min(1).unsqueeze(1)).float()
        new[empty] = centroids[empty]
        if empty.any():
            _, far = assign(sample, new)
            pick = torch.topk(far, int(empty.sum())).indices
            new[empty] = sample[pick]
        centroids = new
        inertia = sse / n
        stats.update(inertia=inertia, empty_clusters=int(empty.sum()), passes=it + 1)
        say(
            f"k-means pass {it + 1}/{iters}: {n} vectors, inertia {inertia:.5g}, {int(empty.sum())} empty, "
            f"{n / max(time.time() - t1, 1e-9):.0f} vectors/s"
        )
        if prev is not None and not empty.any() and abs(prev - inertia) <= tol * max(prev, 1e-12):
            break
        prev = inertia
    stats["max_held"] = max_held
    return centroids.contiguous(), stats


def _agree_dim(sample: torch.Tensor | None, dev) -> int:
    """The feature width, agreed over ranks (a rank with no points learns it from the others)."""
    from .launch import all_sum

    d = torch.tensor([0 if sample is None else sample.shape[1]], dtype=torch.long, device=dev or "cpu")
    width = int(all_sum(d.clone()).item())
    ranks = int(all_sum(torch.tensor([int(d.item() > 0)], dtype=torch.long, device=d.device)).item())
    return width // max(ranks, 1)


class KMeans:
    """A fitted k-CLIP codebook. ``assign(features [..., D]) -> codes int64 [...]``."""

    def __init__(
        self,
        centroids: torch.Tensor,
        l2_normalize: bool = False,
        teacher: dict | None = None,
        view: dict | None = None,
        stats: dict | None = None,
        path: str | None = None,
        sha256: str | None = None,
    ):
        if centroids.dim() != 2:
            raise ConfigError(f"centroids must be [k, D], got {tuple(centroids.shape)}")
        self.centroids = centroids.float().contiguous()
        self.l2_normalize = bool(l2_normalize)
        self.teacher, self.view, self.stats = dict(teacher or {}), dict(view or {}), dict(stats or {})
        self.path, self.sha256 = path, sha256

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def dim(self) -> int:
        return int(self.centroids.shape[1])

    def assign(self, features: torch.Tensor) -> torch.Tensor:
        """``features [..., D]`` -> nearest-centroid codes ``int64 [...]``."""
        if features.shape[-1] != self.dim:
            raise ValueError(f"features have dim {features.shape[-1]}, the codebook {self.dim}")
        x = features.reshape(-1, self.dim).float()
        if self.l2_normalize:
            x = F.normalize(x, dim=-1)
        codes, _ = assign(x, self.centroids.to(x.device))
        return codes.view(features.shape[:-1])

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        blob = {
            "format": KMEANS_FORMAT,
            "k": self.k,
            "dim": self.dim,
            "centroids": self.centroids.cpu(),
            "l2_normalize": self.l2_normalize,
            "teacher": self.teacher,
            "view": self.view,
            "stats": self.stats,
        }
        tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
        torch.save(blob, tmp)
        os.replace(tmp, path)
        self.path, self.sha256 = str(path.resolve()), hashlib.sha256(path.read_bytes()).hexdigest()
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> KMeans:
        path = Path(path).expanduser()
        if not path.is_file():
            raise CheckpointError(f"k-means file {path} not found; fit one with mimscale teacher fit-kmeans")
        data = path.read_bytes()
        try:
            blob = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"k-means file {path} is corrupt ({type(e).__name__})") from None
        if not isinstance(blob, dict) or blob.get("format") != KMEANS_FORMAT:
            fmt = blob.get("format") if isinstance(blob, dict) else type(blob).__name__
            raise CheckpointError(f"{path} is not a {KMEANS_FORMAT} file (format {fmt!r})")
        c = blob.get("centroids")
        if not isinstance(c, torch.Tensor) or tuple(c.shape) != (blob.get("k"), blob.get("dim")):
            raise CheckpointError(f"k-means file {path} is damaged (centroids do not match k/dim)")
        return cls(
            c,
            bool(blob.get("l2_normalize")),
            blob.get("teacher"),
            blob.get("view"),
            blob.get("stats"),
            path=str(path.resolve()),
            sha256=hashlib.sha256(data).hexdigest(),
        )


class FeatureCache:
    """This rank's teacher features, written once and then streamed from a memory-mapped file.

    ``DIR/features-rank{r}-of-{w}.bin`` holds ``rows x dim`` values (``dtype``, row-major), beside a JSON
    ``.meta`` that records ``key`` (teacher, view, source: what the rows are features of), ``rows`` and
    ``complete``. A cache whose meta matches and is complete is reused as is (a rerun, or another k / seed /
    number of iterations, encodes nothing); anything else is rewritten.
    """

    def __init__(self, directory: str | os.PathLike, rank: int, world: int, dim: int, dtype: str, key: dict):
        if dtype not in ("float16", "float32"):
            raise ConfigError(f"--cache-dtype must be float16 or float32, got {dtype!r}")
        self.dir, self.dim, self.dtype = Path(directory), int(dim), dtype
        self.path = self.dir / f"features-rank{rank}-of-{world}.bin"
        self.meta = self.path.with_suffix(".meta")
        self.key = json.loads(json.dumps({**key, "dim": self.dim, "dtype": dtype}))
        self.rows = 0

    def complete(self) -> bool:
        try:
            meta = json.loads(self.meta.read_text())
        except (OSError, ValueError):
            return False
        itemsize = np.dtype(self.dtype).itemsize
        ok = (
            meta.get("complete")
            and meta.get("key") == self.key
            and self.path.is_file()
            and self.path.stat().st_size == int(meta.get("rows", -1)) * self.dim * itemsize
        )
        if ok:
            self.rows = int(meta["rows"])
        return bool(ok)

    def write(self, chunks: Iterable[torch.Tensor]) -> int:
        """Append every ``[m, dim]`` chunk (any device) to the file; returns the rows written."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.meta.unlink(missing_ok=True)
        rows = 0
        with open(self.path, "wb") as f:
            for c in chunks:
                f.write(c.detach().to("cpu", getattr(torch, self.dtype)).contiguous().numpy().tobytes())
                rows += c.shape[0]
        self.meta.write_text(json.dumps({"key": self.key, "rows": rows, "complete": True}))
        self.rows = rows
        return rows

    def array(self) -> np.ndarray:
        """The rows as a read-only memory map ``[rows, dim]``."""
        if not self.rows:
            return np.zeros((0, self.dim), dtype=self.dtype)
        return np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.rows, self.dim))

    def chunks(self, rows: int, device: torch.device) -> Iterator[torch.Tensor]:
        """Stream the rows to ``device`` as float32 ``[<= rows, dim]`` chunks (pinned host pages on CUDA)."""
        mm = self.array()
        for i in range(0, mm.shape[0], rows):
            part = torch.from_numpy(np.array(mm[i : i + rows]))  # a writable copy of the pages
            if device.type == "cuda":
                part = part.pin_memory()
            yield part.to(device, non_blocking=True).float()

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        self.meta.unlink(missing_ok=True)


def fit_kmeans_shards(
    src,
    teacher: str | os.PathLike,
    k: int,
    out: str | os.PathLike,
    arch: str | None = None,
    iters: int = 10,
    init_sample: int | None = None,
    max_images: int | None = None,
    image_size: int | None = None,
    grid: int | None = None,
    crop_pct: float = 1.0,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    l2_normalize: bool = False,
    batch_size: int = 256,
    num_workers: int = 1,
    seed: int = 0,
    progress: bool = True,
    device: str | None = "auto",
    cache: str | os.PathLike | None = None,
    cache_dtype: str = "float16",
    chunk_rows: int = 65536,
) -> dict:
    """Fit k-means on the teacher's patch features of the images of ``src`` (the deterministic centre crop
    of :func:`mimscale.data.targets.target_view`, the same view ``add-targets`` uses) and save ``out``.

    One process per device, under any training launcher (see :mod:`mimscale.teachers.launch`): each rank
    encodes its contiguous share of the images ONCE on ``device`` into a :class:`FeatureCache` (``cache``,
    default ``OUT.cache/``, removed afterwards unless given), then :func:`fit_streaming` runs collectively on
    the cached features, on the device. Rank 0 writes ``out``. Returns the saved info (``k``, ``dim``,
    ``points``, ``inertia``, ``empty_clusters``, ``seconds``, ``encode_seconds``, ...)."""
    from ..data.loader import ShardLoader
    from ..data.targets import crop_rule, target_view, teacher_view_args
    from ..telemetry.progress import Progress
    from .clip import CLIPTeacher
    from .launch import all_gather_rows, barrier, launched

    if not 1 <= k <= 65536:
        raise ConfigError(f"--k must be in [1, 65536] (codes are stored as uint16), got {k}")
    if chunk_rows < 1:
        raise ConfigError(f"chunk_rows must be >= 1, got {chunk_rows}")
    with launched(device) as (d, dev):
        t = CLIPTeacher(teacher, arch=arch).to(dev)
        size, side, mean, std = teacher_view_args(t, image_size, grid, mean, std)
        view = {
            "crop_rule": crop_rule(crop_pct),
            "image_size": [size, size],
            "crop_pct": float(crop_pct),
            "grid": [side, side],
            "mean": mean,
            "std": std,
            "source": str(src),
            "max_images": max_images,
        }
        loader = ShardLoader(
            src,
            batch_size=batch_size,
            mode="eval",
            num_workers=num_workers,
            rank=d.rank,
            world_size=d.world_size,
            transform=target_view(size, mean, std, 3, crop_pct),
            samples_per_epoch=max_images,
        )
        cache_dir = Path(cache) if cache else Path(f"{out}.cache")
        fc = FeatureCache(
            cache_dir, d.rank, d.world_size, t.out_dim, cache_dtype, {"teacher": t.info["sha256"], "view": view}
        )
        say = (lambda s: print(s, file=sys.stderr, flush=True)) if progress and d.is_main else None
        t0 = time.time()
        if not fc.complete():
            bar = Progress(
                max(len(loader), 1),
                images_per_step=batch_size * d.world_size,
                desc="fit-kmeans encode",
                enabled=progress and d.is_main,
            )

            def encoded():
                with torch.no_grad():
                    for i, batch in enumerate(loader):
                        feats = t(batch["image"].to(dev, non_blocking=True), grid=(side, side))  # [B, N, D]
                        yield feats[batch["valid"].to(dev)].reshape(-1, t.out_dim)
                        bar.update(i + 1)
                bar.close()

            fc.write(encoded())
        encode_s = time.time() - t0
        rows = [int(r) for r in torch.cat(all_gather_rows(torch.tensor([fc.rows], device=dev))).tolist()]
        offset = sum(rows[: d.rank])
        if say:
            say(
                f"k-means: {sum(rows)} cached feature vectors on {d.world_size} rank(s) ({encode_s:.0f} s to encode), "
                f"fitting on {dev}"
            )
        centroids, stats = fit_streaming(
            lambda: fc.chunks(chunk_rows, dev),
            k,
            iters=iters,
            init_sample=init_sample,
            seed=seed,
            l2_normalize=l2_normalize,
            progress=say,
            offset=offset,
            collective=True,
            device=dev,
        )
        stats.update(
            seconds=round(time.time() - t0, 1), encode_seconds=round(encode_s, 1), ranks=d.world_size, device=dev.type
        )
        km = KMeans(centroids.cpu(), l2_normalize, t.teacher_id(), view, stats)
        if d.is_main:
            km.save(out)
        barrier()
        if not cache:
            fc.remove()
            barrier()
            if d.is_main:
                shutil.rmtree(cache_dir, ignore_errors=True)
        info = {"k": km.k, "dim": km.dim, "path": str(Path(out).resolve()), **stats}
        if d.is_main:
            info.update(sha256=km.sha256)
        return info


class KCLIPTokenizer(torch.nn.Module):
    """Online k-CLIP tokenizer (MaPeT ``target_source: online``): frozen CLIP teacher + k-means codebook.

    ``forward(images [B, C, H, W], grid=None) -> codes int64 [B, gh*gw]`` (no grad, raster order), i.e.
    ``kmeans.assign(teacher(images, grid))``. Like :class:`~mimscale.teachers.clip.CLIPTeacher` it registers
    no parameters or buffers (nothing reaches DeepSpeed, the optimizer or checkpoints; ``.to()`` still
    moves the weights and centroids); return it from ``frozen_modules()``.
    """

    km: KMeans  # set in __init__, outside the module tree

    def __init__(
        self,
        teacher: str | os.PathLike,
        kmeans: str | os.PathLike,
        arch: str | None = None,
        resize: str = "input",
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        from .clip import CLIPTeacher

        self.teacher = CLIPTeacher(teacher, arch=arch, resize=resize, dtype=dtype)
        km = KMeans.load(kmeans)
        if km.teacher.get("sha256") != self.teacher.info["sha256"]:
            raise CheckpointError(
                f"{kmeans} was fit on features of another teacher than {teacher}; "
                f"fit it with mimscale teacher fit-kmeans --teacher {teacher}"
            )
        if km.dim != self.teacher.out_dim:
            raise CheckpointError(f"{kmeans} has dim {km.dim} but the teacher gives {self.teacher.out_dim}")
        self.__dict__["km"] = km

    @property
    def vocab_size(self) -> int:
        return self.km.k

    def _apply(self, fn, recurse: bool = True):
        self.km.centroids = fn(self.km.centroids)
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True) -> KCLIPTokenizer:
        return super().train(False)

    def teacher_id(self) -> dict:
        """``{"teacher": {path, sha256, arch}, "kmeans": {path, sha256, k}}`` (what checkpoints record)."""
        return {
            "teacher": self.teacher.teacher_id(),
            "kmeans": {"path": self.km.path, "sha256": self.km.sha256, "k": self.km.k},
        }

    @torch.no_grad()
    def forward(self, images: torch.Tensor, grid: Sequence[int] | None = None) -> torch.Tensor:
        return self.km.assign(self.teacher(images, grid))

    def flops_per_image(self, grid: Sequence[int] | None = None) -> float:
        gh, gw = self.teacher.grid if grid is None else grid
        return self.teacher.flops_per_image(grid) + 2.0 * gh * gw * self.km.k * self.km.dim
