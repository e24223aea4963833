"""Weighted kNN classification of frozen features (cosine similarity, exp(cos / T) votes)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from mimscale.eval.knn import knn_predict, knn_top1


def clusters(per_class: int, num_classes: int = 4, dim: int = 16, noise: float = 0.05, seed: int = 0):
    """Tight clusters around random unit centres: ``feats [num_classes*per_class, dim]``, ``labels [..]``."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(num_classes, dim, generator=g), dim=1) * 5.0
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    feats = centres[labels] + noise * torch.randn(len(labels), dim, generator=g)
    perm = torch.randperm(len(labels), generator=g)
    return feats[perm], labels[perm]


def test_separable_clusters_are_classified_perfectly():
    xtr, ytr = clusters(50, seed=0)  # [200, 16], [200]
    xte, yte = clusters(20, seed=0)  # same centres (same seed), new points below
    xte = xte + 0.05 * torch.randn(xte.shape, generator=torch.Generator().manual_seed(1))
    pred = knn_predict(xtr, ytr, xte, num_classes=4, k=20, temperature=0.07)
    assert pred.shape == (80,) and pred.dtype == torch.long
    assert torch.equal(pred, yte)
    assert knn_top1(xtr, ytr, xte, yte, num_classes=4) == 100.0


def test_accuracy_in_percent():
    xtr, ytr = clusters(10, num_classes=2)
    yte_wrong = 1 - ytr[:10]
    assert knn_top1(xtr, ytr, xtr[:10], yte_wrong, num_classes=2, k=1) == 0.0
    half = torch.cat([ytr[:5], 1 - ytr[5:10]])
    assert knn_top1(xtr, ytr, xtr[:10], half, num_classes=2, k=1) == 50.0


def test_features_are_normalised_scale_does_not_matter():
    xtr, ytr = clusters(10)
    q = xtr[:8]
    a = knn_predict(xtr, ytr, q, 4, k=5)
    scale = torch.rand(len(xtr), 1, generator=torch.Generator().manual_seed(2)) * 100 + 0.01  # per-row scale
    b = knn_predict(xtr * scale, ytr, q * 7.0, 4, k=5)
    assert torch.equal(a, b)


def _weighting_case():
    """Query q = e0. One class-1 neighbour at cos 0.99, two class-0 neighbours at cos 0.5.

    Unweighted majority (or a very high T) says class 0 (2 votes vs 1); with T = 0.07 the close
    neighbour wins: exp(0.99/0.07) = 1.4e6 > 2 exp(0.5/0.07) = 2.5e3.
    """
    q = torch.tensor([[1.0, 0.0, 0.0]])  # [1, 3]
    near = torch.tensor([0.99, (1 - 0.99**2) ** 0.5, 0.0])
    far_a = torch.tensor([0.5, 0.0, 0.75**0.5])
    far_b = torch.tensor([0.5, -(0.75**0.5), 0.0])
    very_far = torch.tensor([-1.0, 0.0, 0.0])  # outside k = 3
    train = torch.stack([near, far_a, far_b, very_far])  # [4, 3]
    labels = torch.tensor([1, 0, 0, 1])
    return train, labels, q


def test_temperature_weighting_beats_majority():
    train, labels, q = _weighting_case()
    assert knn_predict(train, labels, q, num_classes=2, k=3, temperature=0.07).tolist() == [1]
    # nearly uniform weights: the plain majority of the same three neighbours wins
    assert knn_predict(train, labels, q, num_classes=2, k=3, temperature=1e3).tolist() == [0]
    # k = 1: only the nearest neighbour votes, at any temperature
    assert knn_predict(train, labels, q, num_classes=2, k=1, temperature=1e3).tolist() == [1]


def test_k_larger_than_the_bank():
    train, labels, q = _weighting_case()
    # k = 50 > 4 entries: every entry votes; class 1 still wins through the weighted close neighbour
    assert knn_predict(train, labels, q, num_classes=2, k=50, temperature=0.07).tolist() == [1]
    # a one-entry bank
    assert knn_predict(train[:1], labels[:1], q, num_classes=2, k=20).tolist() == [1]


def test_chunking_gives_the_same_result():
    xtr, ytr = clusters(30, num_classes=5, noise=1.5, seed=3)  # overlapping: non-trivial votes
    xte, _ = clusters(13, num_classes=5, noise=1.5, seed=4)  # 65 queries
    full = knn_predict(xtr, ytr, xte, num_classes=5, k=7, chunk=1024)
    for chunk in (1, 7, 64, 65):
        assert torch.equal(knn_predict(xtr, ytr, xte, num_classes=5, k=7, chunk=chunk), full)
    assert full.shape == (65,)
    assert len(set(full.tolist())) > 1


def test_empty_queries():
    xtr, ytr = clusters(5)
    out = knn_predict(xtr, ytr, torch.zeros(0, 16), num_classes=4)
    assert out.shape == (0,) and out.dtype == torch.long


def test_half_precision_features():
    xtr, ytr = clusters(20)
    a = knn_predict(xtr, ytr, xtr[:10], 4, k=5)
    b = knn_predict(xtr.bfloat16(), ytr, xtr[:10].bfloat16(), 4, k=5)
    assert torch.equal(a, b) and torch.equal(a, ytr[:10])


def test_self_query_with_k1_returns_own_label():
    xtr, ytr = clusters(10, noise=0.5)
    pred = knn_predict(xtr, ytr, xtr, 4, k=1)
    assert torch.equal(pred, ytr)


# ----------------------------------------------------------------------------- sharded bank (many ranks)


def test_sharded_path_on_one_process_equals_the_reference():
    from mimscale.eval.knn import knn_predict_sharded

    xtr, ytr = clusters(30, num_classes=5, noise=1.5, seed=3)
    xte, _ = clusters(13, num_classes=5, noise=1.5, seed=4)
    ref = knn_predict(xtr, ytr, xte, num_classes=5, k=7)
    for chunk in (1, 10, 4096):
        assert torch.equal(knn_predict_sharded(xtr, ytr, xte, 5, k=7, chunk=chunk), ref)
    assert torch.equal(knn_predict_sharded(xtr[:3], ytr[:3], xte, 5, k=7), knn_predict(xtr[:3], ytr[:3], xte, 5, k=7))
    assert knn_predict_sharded(xtr, ytr, xte[:0], 5).shape == (0,)
    with pytest.raises(ValueError, match="empty"):
        knn_predict_sharded(xtr[:0], ytr[:0], xte, 5)


@pytest.mark.slow
def test_one_two_and_three_ranks_agree(tmp_path, fmnist_small):
    """torchrun 2 and 3 gloo ranks vs one process: same predictions (synthetic) and top-1 (real shards);
    every sample counted once; each rank holds only its share of the bank."""
    import json
    import sys
    from pathlib import Path

    from launch_utils import free_port, run

    from mimscale.data.loader import ShardLoader
    from mimscale.data.transforms import EvalTransform
    from mimscale.eval.knn import KNNEvaluator
    from mimscale.models.vit import build_vit

    sys.path.insert(0, str(Path(__file__).parent))
    from knn_worker import synthetic

    bank, labels, queries = synthetic()
    ref = knn_predict(bank, labels, queries, 5, k=7)
    assert len(set(ref.tolist())) == 5  # a non-trivial case
    torch.manual_seed(0)
    enc = build_vit("vit_micro", 16, 4, 1)
    tf = EvalTransform(16, mean=(0.3,), std=(0.35,), in_chans=1)
    loaders = [
        ShardLoader(str(fmnist_small[s]), batch_size=100, transform=tf, num_workers=0, mode="eval", shuffle=False)
        for s in ("train", "test")
    ]
    one = KNNEvaluator(*loaders, num_classes=10, chunk=200)(enc, torch.device("cpu"))
    assert (one["eval/knn_bank"], one["eval/knn_queries"]) == (2048, 512)
    assert 10.0 < one["eval/knn_top1"] < 100.0
    worker = Path(__file__).with_name("knn_worker.py")
    for world in (2, 3):
        out = tmp_path / f"w{world}"
        out.mkdir()
        run(
            [
                "torchrun",
                "--nproc_per_node",
                str(world),
                "--master_port",
                str(free_port()),
                str(worker),
                str(out),
                str(fmnist_small["train"]),
                str(fmnist_small["test"]),
            ],
            timeout=300,
        )
        recs = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
        got = torch.full((97,), -1)
        for rec in recs:
            got[rec["queries"]] = torch.tensor(rec["pred"])
            assert rec["lopsided"] == ref[rec["queries"]].tolist()
            assert rec["real"] == recs[0]["real"]  # every rank reports the same result
        assert torch.equal(got, ref), world
        assert recs[0]["real"]["eval/knn_top1"] == one["eval/knn_top1"], world
        assert (recs[0]["real"]["eval/knn_bank"], recs[0]["real"]["eval/knn_queries"]) == (2048, 512)
        rows = [rec["real_bank_rows"] for rec in recs]
        assert sum(rows) == 2048 and max(rows) <= 2048 // world + 256, rows  # ~1/world each (256-sample shards)


def test_extract_features_drops_padding_once_per_pass():
    """Padding rows (``valid`` False, the eval loader's fill of the last batch) are dropped, in order, and
    batches without ``valid`` keep every row."""
    from mimscale.eval.knn import extract_features
    from mimscale.models.vit import build_vit

    torch.manual_seed(0)
    enc = build_vit("vit_micro", img_size=16, patch_size=4, depth=1)
    imgs = torch.randn(7, 3, 16, 16)
    batches = [
        {"image": imgs[:3], "label": torch.tensor([0, 1, 2])},
        {"image": imgs[3:], "label": torch.tensor([3, 4, 5, 6]), "valid": torch.tensor([True, False, True, False])},
    ]
    f, y = extract_features(enc, batches, torch.device("cpu"))
    assert y.tolist() == [0, 1, 2, 3, 5]
    with torch.no_grad():
        want = enc.pool(enc.forward_features(imgs[[0, 1, 2, 3, 5]]), "cls").float()
    torch.testing.assert_close(f, want, rtol=1e-5, atol=1e-6)
    f0, y0 = extract_features(enc, [], torch.device("cpu"))
    assert f0.shape == (0, enc.embed_dim) and y0.shape == (0,)


def test_eval_autocast_is_bf16_on_cuda_off_elsewhere_and_the_knob_turns_it_off(caplog):
    """Standalone `eval knn|linear`: bf16 autocast on CUDA by default (like the in-training evaluation), requested
    for the device type the encoder runs on; fp32 turns it off; a device type without autocast gets none."""
    from mimscale.errors import ConfigError
    from mimscale.eval.knn import eval_autocast

    calls = []

    def recorder(device_type, dtype):
        calls.append((device_type, dtype))
        return contextlib.nullcontext()

    eval_autocast(torch.device("cuda", 1), "auto", recorder)
    eval_autocast("cuda:0", "fp16", recorder)
    eval_autocast("cpu", "bf16", recorder)
    assert calls == [("cuda", torch.bfloat16), ("cuda", torch.float16), ("cpu", torch.bfloat16)]
    calls.clear()
    for device, precision in (("cuda", "fp32"), ("cpu", "auto"), ("cpu", "fp32")):
        assert isinstance(eval_autocast(device, precision, recorder), contextlib.nullcontext)
    with caplog.at_level("WARNING", logger="mimscale.eval"):
        assert isinstance(eval_autocast("meta", "bf16", recorder), contextlib.nullcontext)
    assert calls == [] and "no autocast on device type meta" in caplog.text
    with pytest.raises(ConfigError, match="precision='tf32'"):
        eval_autocast("cuda", "tf32", recorder)


def test_extract_features_runs_the_encoder_under_the_requested_autocast():
    """The real ViT's blocks see autocast bf16 with precision=bf16 and none with fp32; features stay fp32."""
    from mimscale.eval.cli import KNNConfig, _knobs
    from mimscale.eval.knn import extract_features
    from mimscale.models.vit import build_vit

    enc = build_vit("vit_micro", img_size=16, patch_size=4, depth=1)
    seen = []
    enc.blocks[0].register_forward_hook(lambda m, i, o: seen.append((torch.is_autocast_enabled("cpu"), o.dtype)))
    batches = [{"image": torch.randn(2, 3, 16, 16), "label": torch.tensor([0, 1])}]
    f16, _ = extract_features(enc, batches, torch.device("cpu"), precision="bf16")
    f32, _ = extract_features(
        enc, batches, torch.device("cpu"), precision=_knobs(KNNConfig, ["precision=fp32"]).precision
    )
    assert seen == [(True, torch.bfloat16), (False, torch.float32)]
    assert f16.dtype == f32.dtype == torch.float32
    torch.testing.assert_close(f16, f32, rtol=0.05, atol=0.05)  # bf16 rounding only
    assert _knobs(KNNConfig, []).precision == "auto"
