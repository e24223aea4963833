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
    return lambda: (x[i:i + chunk] for i in range(0, len(x), chunk))


def test_recovers_well_separated_clusters():
    centers, labels, x = _blobs()
    c, stats = fit_streaming(_stream(x, 1000), 16, iters=10, init_sample=2000, seed=0)
    assert torch.cdist(centers, c).min(1).values.max() < 0.05          # every true centre found
    codes = KMeans(c).assign(x)
    for j in range(16):  # each cluster maps to exactly one code
        assert codes[labels == j].unique().numel() == 1
    assert codes.unique().numel() == 16
    assert stats["inertia"] == pytest.approx(8 * 0.09, rel=0.05)     # dim * sigma^2


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
