"""Streaming k-means (k-CLIP tokenizer): recovery, chunking invariance, bounded memory, the versioned file."""

from __future__ import annotations

import pytest
import torch

from mimscale.errors import CheckpointError, ConfigError
from mimscale.teachers.kmeans import KMeans, assign, fit_streaming


def _blobs(n=20000, k=16, dim=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, dim, generator=g) * 10
    labels = torch.randint(k, (n,), generator=g)
    return centers, labels, centers[labels] + 0.3 * torch.randn(n, dim, generator=g)


def _stream(x, chunk):
    return lambda: (x[i : i + chunk] for i in range(0, len(x), chunk))


def test_recovers_well_separated_clusters():
    centers, labels, x = _blobs()
    c, stats = fit_streaming(_stream(x, 1000), 16, iters=10, init_sample=2000, seed=0)
    assert torch.cdist(centers, c).min(1).values.max() < 0.05  # every true centre found
    codes = KMeans(c).assign(x)
    for j in range(16):  # each cluster maps to exactly one code
        assert codes[labels == j].unique().numel() == 1
    assert codes.unique().numel() == 16
    assert stats["inertia"] == pytest.approx(8 * 0.09, rel=0.05)  # dim * sigma^2


def test_same_result_regardless_of_chunking():
    _, _, x = _blobs(n=12000, k=12, dim=6, seed=3)
    x = x + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(9))  # overlapping blobs
    runs = [fit_streaming(_stream(x, chunk), 12, iters=6, init_sample=1500, seed=0) for chunk in (1000, 777, 4096)]
    for c, stats in runs[1:]:
        torch.testing.assert_close(c, runs[0][0], rtol=0, atol=1e-4)
        assert stats["inertia"] == pytest.approx(runs[0][1]["inertia"], rel=1e-5)


def test_memory_is_bounded_by_the_sample_plus_one_chunk():
    _, _, x = _blobs(n=30000, k=8, dim=4)
    _, stats = fit_streaming(_stream(x, 500), 8, iters=2, init_sample=1000, seed=0)
    assert stats["points"] == 30000 and stats["stored"] == 1000
    assert stats["max_held"] <= 1000 + 500 < stats["points"]


def test_assign_is_nearest_centroid_and_l2_option():
    g = torch.Generator().manual_seed(0)
    c, x = torch.randn(50, 5, generator=g), torch.randn(300, 5, generator=g)
    codes, d2 = assign(x, c, chunk=64)
    ref = torch.cdist(x, c).argmin(1)
    assert torch.equal(codes, ref)
    torch.testing.assert_close(d2, ((x - c[ref]) ** 2).sum(1), rtol=1e-4, atol=1e-4)
    km = KMeans(torch.nn.functional.normalize(c, dim=-1), l2_normalize=True)
    assert torch.equal(km.assign((3 * x).view(6, 50, 5)).view(-1), km.assign(x))


def test_file_roundtrip_and_errors(tmp_path):
    c = torch.randn(10, 4)
    km = KMeans(c, teacher={"sha256": "ab"}, view={"crop_rule": "r"}, stats={"points": 5})
    km.save(tmp_path / "km.pt")
    back = KMeans.load(tmp_path / "km.pt")
    assert (back.k, back.dim, back.teacher, back.view) == (10, 4, {"sha256": "ab"}, {"crop_rule": "r"})
    assert back.sha256 == km.sha256 and len(back.sha256) == 64
    torch.testing.assert_close(back.centroids, c)
    with pytest.raises(CheckpointError, match="not found"):
        KMeans.load(tmp_path / "missing.pt")
    (tmp_path / "bad.pt").write_bytes((tmp_path / "km.pt").read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt"):
        KMeans.load(tmp_path / "bad.pt")
    torch.save({"format": "x"}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="not a mimscale-kmeans/1"):
        KMeans.load(tmp_path / "x.pt")
    with pytest.raises(ConfigError, match="at least k"):
        fit_streaming(_stream(torch.randn(5, 2), 2), 8)


def test_online_kclip_tokenizer(tmp_path):
    from mimscale.teachers.clip import TINY_CLIP_CFG, CLIPTeacher, build_clip, save_clip
    from mimscale.teachers.kmeans import KCLIPTokenizer

    torch.manual_seed(0)
    clip = save_clip(build_clip(TINY_CLIP_CFG), TINY_CLIP_CFG, tmp_path / "c.pt", mean=[0.5] * 3, std=[0.5] * 3)
    teacher = CLIPTeacher(clip)
    KMeans(torch.randn(32, 64), teacher=teacher.teacher_id()).save(tmp_path / "km.pt")
    tok = KCLIPTokenizer(clip, tmp_path / "km.pt")
    x = torch.randn(3, 3, 32, 32)
    codes = tok(x)
    assert codes.shape == (3, 64) and codes.dtype == torch.long and tok.vocab_size == 32
    assert torch.equal(codes, KMeans.load(tmp_path / "km.pt").assign(teacher(x)))
    assert list(tok.parameters()) == [] and list(tok.state_dict()) == [] and not tok.train().training
    assert tok.teacher_id()["kmeans"]["sha256"] == KMeans.load(tmp_path / "km.pt").sha256
    KMeans(torch.randn(32, 64), teacher={"sha256": "f" * 64}).save(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="another teacher"):
        KCLIPTokenizer(clip, tmp_path / "other.pt")


def test_collective_flag_on_one_process_and_offset_keys():
    """``collective=True`` without a process group is the one-process result; ``offset`` shifts the sample
    keys exactly as if the points before it were streamed too (what rank r > 0 relies on)."""
    _, _, x = _blobs(n=6000, k=8, dim=4, seed=5)
    a = fit_streaming(_stream(x, 700), 8, iters=3, init_sample=900, seed=2)
    b = fit_streaming(_stream(x, 1100), 8, iters=3, init_sample=900, seed=2, collective=True)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-5)
    from mimscale.teachers.kmeans import _keys

    assert (_keys(3, 0, 10)[4:] == _keys(3, 4, 6)).all()


def _fit_like_before(shards, clip, k, iters, max_images, init_sample):
    """Today's (pre-cache) CPU path, verbatim in effect: re-encode every image with the teacher on every pass."""
    from mimscale.data.loader import ShardLoader
    from mimscale.data.targets import target_view, teacher_view_args
    from mimscale.teachers.clip import CLIPTeacher

    t = CLIPTeacher(clip)
    size, side, mean, std = teacher_view_args(t, None, None, None, None)
    loader = ShardLoader(
        shards,
        batch_size=64,
        mode="eval",
        num_workers=0,
        samples_per_epoch=max_images,
        transform=target_view(size, mean, std, 3, 1.0),
    )
    calls = [0]

    def batches():
        calls[0] += 1
        for batch in loader:
            yield t(batch["image"], grid=(side, side))[batch["valid"]].reshape(-1, t.out_dim)

    c, stats = fit_streaming(batches, k, iters=iters, init_sample=init_sample, seed=0)
    return c, stats, calls[0]


@pytest.mark.slow
def test_cached_multi_rank_fit_equals_the_cpu_path(tiny_clip, fmnist_small, tmp_path):
    """Real tiny CLIP on real Fashion-MNIST: the cached path (1 process in-process, then torchrun 2 gloo ranks
    through the CLI) gives today's CPU centroids; the teacher encodes once; a rerun reuses the cache."""
    import json

    from launch_utils import free_port, run

    from mimscale.teachers.kmeans import fit_kmeans_shards

    shards = str(fmnist_small["train"])
    ref, ref_stats, passes = _fit_like_before(shards, tiny_clip, 16, 4, 320, 3000)
    assert passes == 1 + ref_stats["passes"] and ref_stats["passes"] >= 3  # today: one encode per pass
    cache = tmp_path / "cache"
    one = fit_kmeans_shards(
        shards,
        tiny_clip,
        16,
        tmp_path / "one.pt",
        iters=4,
        max_images=320,
        init_sample=3000,
        batch_size=48,
        num_workers=0,
        progress=False,
        device="cpu",
        cache=cache,
        cache_dtype="float32",
    )
    assert one["points"] == 320 * 64 and one["ranks"] == 1 and one["passes"] == ref_stats["passes"]
    torch.testing.assert_close(KMeans.load(tmp_path / "one.pt").centroids, ref, rtol=0, atol=1e-4)
    assert one["inertia"] == pytest.approx(ref_stats["inertia"], rel=1e-5)
    (bin_file,) = cache.glob("features-rank0-of-1.bin")
    assert bin_file.stat().st_size == 320 * 64 * 64 * 4  # every patch feature once, float32
    mtime = bin_file.stat().st_mtime_ns
    again = fit_kmeans_shards(
        shards,
        tiny_clip,
        8,
        tmp_path / "k8.pt",
        iters=2,
        max_images=320,
        init_sample=3000,
        num_workers=0,
        progress=False,
        device="cpu",
        cache=cache,
        cache_dtype="float32",
    )
    assert bin_file.stat().st_mtime_ns == mtime and again["k"] == 8  # reused: nothing re-encoded
    # two ranks through the launcher, default cache (removed afterwards), float16 features
    for dtype, name in (("float32", "two32.pt"), ("float16", "two16.pt")):
        p = run(
            [
                "torchrun",
                "--nproc_per_node",
                "2",
                "--master_port",
                str(free_port()),
                "-m",
                "mimscale.cli",
                "teacher",
                "fit-kmeans",
                shards,
                "--teacher",
                str(tiny_clip),
                "--k",
                "16",
                "--out",
                str(tmp_path / name),
                "--iters",
                "4",
                "--max-images",
                "320",
                "--init-sample",
                "3000",
                "--batch-size",
                "48",
                "--workers",
                "0",
                "--device",
                "cpu",
                "--cache-dtype",
                dtype,
            ],
            timeout=300,
        )
        stats = json.loads(next(ln for ln in p.stdout.splitlines() if ln.startswith("{")))
        assert stats["ranks"] == 2 and stats["points"] == 320 * 64 and stats["device"] == "cpu"
        assert not (tmp_path / f"{name}.cache").exists()
    torch.testing.assert_close(KMeans.load(tmp_path / "two32.pt").centroids, ref, rtol=0, atol=1e-4)
    torch.testing.assert_close(KMeans.load(tmp_path / "two16.pt").centroids, ref, rtol=0, atol=2e-2)


def test_feature_cache_roundtrip_reuse_and_device_errors(tmp_path):
    from mimscale.teachers.kmeans import FeatureCache
    from mimscale.teachers.launch import resolve_device

    x = torch.randn(1000, 6)
    fc = FeatureCache(tmp_path / "c", 0, 1, 6, "float32", {"teacher": "ab"})
    assert not fc.complete()
    assert fc.write(x[i : i + 300] for i in range(0, 1000, 300)) == 1000
    back = torch.cat(list(fc.chunks(128, torch.device("cpu"))))
    assert torch.equal(back, x)
    assert FeatureCache(tmp_path / "c", 0, 1, 6, "float32", {"teacher": "ab"}).complete()
    assert not FeatureCache(tmp_path / "c", 0, 1, 6, "float32", {"teacher": "cd"}).complete()  # another teacher
    assert not FeatureCache(tmp_path / "c", 0, 2, 6, "float32", {"teacher": "ab"}).complete()  # another world
    (tmp_path / "c" / "features-rank0-of-1.bin").write_bytes(b"\0" * 10)  # truncated
    assert not FeatureCache(tmp_path / "c", 0, 1, 6, "float32", {"teacher": "ab"}).complete()
    half = FeatureCache(tmp_path / "h", 0, 1, 6, "float16", {})
    half.write([x])
    torch.testing.assert_close(torch.cat(list(half.chunks(999, torch.device("cpu")))), x, rtol=1e-3, atol=1e-3)
    with pytest.raises(ConfigError, match="cache-dtype"):
        FeatureCache(tmp_path, 0, 1, 6, "int8", {})
    with pytest.raises(ConfigError, match="not a device"):
        resolve_device("gpu-please")
    with pytest.raises(ConfigError, match="only cpu and cuda"):
        resolve_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            resolve_device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")


def test_cli_bad_device_is_one_error_line(tmp_path, capsys):
    from mimscale.cli import main

    rc = main(
        [
            "teacher",
            "fit-kmeans",
            str(tmp_path),
            "--teacher",
            str(tmp_path / "clip.pt"),
            "--k",
            "4",
            "--out",
            str(tmp_path / "km.pt"),
            "--device",
            "tpu",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == ["mimscale: error: --device 'tpu' is not a device (auto, cpu, cuda, cuda:N)"]
    assert not (tmp_path / "km.pt").exists()


class _MatmulPrecision(torch.overrides.TorchFunctionMode):
    """Records the fp32 matmul precision in effect at every matmul run under it."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("matmul", "__matmul__", "mm", "addmm", "bmm"):
            self.seen.append(torch.get_float32_matmul_precision())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("outside", ["high", "medium"])  # "high" = what train.tf32 (allow_tf32) turns on
def test_code_assignment_runs_in_full_fp32_and_restores_the_setting(outside):
    """k-CLIP codes are assigned with TF32 (and CPU reduced precision) off, whatever the process set, so codes
    made inside a TF32 training run equal offline ones at near-ties; the caller's setting comes back after."""
    _, _, x = _blobs(n=3000, k=8, dim=6)
    km = KMeans(torch.randn(8, 6, generator=torch.Generator().manual_seed(0)))
    want = km.assign(x)
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(outside)
    try:
        with _MatmulPrecision() as rec:
            got = km.assign(x)
            _, d = assign(x, km.centroids, chunk=1000)
        assert rec.seen and set(rec.seen) == {"highest"}, rec.seen
        assert torch.get_float32_matmul_precision() == outside
    finally:
        torch.set_float32_matmul_precision(saved)
    assert torch.equal(got, want) and d.shape == (3000,)
