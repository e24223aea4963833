"""ShardLoader on real tar shards with real DataLoader worker processes."""

from __future__ import annotations

import io
import json
import logging
import random
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
import webdataset as wds

from mimscale.data import EvalTransform, ShardLoader, TrainTransform, default_collate
from mimscale.errors import DataError

TRAIN = TrainTransform(8)
EVAL = EvalTransform(8)


def mask_collate(samples, generator):
    """A collate that draws from its generator (like a mask generator would)."""
    batch = default_collate(samples, generator)
    batch["mask"] = torch.rand(len(samples), 4, generator=generator)
    return batch


def take(loader, n):
    """The next ``n`` batches, moving through epochs like a trainer (auto epoch advance)."""
    out = []
    while len(out) < n:
        for batch in loader:
            out.append(batch)
            if len(out) == n:
                break
    return out


def keys_of(batches):
    return [k for b in batches for k in b["key"]]


def assert_same_batches(a, b):
    assert keys_of(a) == keys_of(b)
    for x, y in zip(a, b):
        assert torch.equal(x["image"], y["image"])  # identical augmentation
        assert torch.equal(x["label"], y["label"])
        assert torch.equal(x["mask"], y["mask"])  # identical collate randomness


def _loader(src, rank, **kw):
    args = dict(
        batch_size=4,
        transform=TRAIN,
        collate=mask_collate,
        rank=rank,
        world_size=2,
        num_workers=2,
        seed=5,
        shuffle_buffer=16,
    )
    args.update(kw)
    return ShardLoader(src, **args)


def test_exact_resume_two_ranks_mid_epoch_and_across_epochs(shards):
    # 8 shards x 12 samples with one corrupt sample: cursors != batches * batch_size
    d, _ = shards([12] * 8, corrupt={30})
    for rank in (0, 1):
        ref_loader = _loader(d, rank)
        nb = len(ref_loader)
        assert nb == 96 // (2 * 4)
        ref = take(ref_loader, 2 * nb + 2)  # two epochs and a bit
        assert len({tuple(keys_of(ref[:nb])), tuple(keys_of(ref[nb : 2 * nb]))}) == 2  # epochs differ
        for stop in (5, nb, nb + 3):  # mid-epoch, exactly at the epoch end, mid second epoch
            first = _loader(d, rank)
            got = take(first, stop)
            state = json.loads(json.dumps(first.state_dict()))  # JSON-able
            resumed = _loader(d, rank)
            resumed.load_state_dict(state)
            got += take(resumed, 2 * nb + 2 - stop)
            assert_same_batches(got, ref)
            assert resumed.stats == ref_loader.stats


def test_resume_without_workers_and_set_epoch(shards):
    d, _ = shards([10] * 3)
    kw = dict(batch_size=3, transform=TRAIN, collate=mask_collate, num_workers=0, seed=1, shuffle_buffer=8)
    ref = ShardLoader(d, **kw)
    ref.set_epoch(4)
    full = take(ref, len(ref))
    a = ShardLoader(d, **kw)
    a.set_epoch(4)
    part = take(a, 4)
    b = ShardLoader(d, **kw)
    b.load_state_dict(a.state_dict())
    b.set_epoch(4)  # the trainer's customary call must not rewind a resumed epoch
    assert_same_batches(part + take(b, len(b) - 4), full)
    assert b.epoch == 5 and b.state_dict()["epoch"] == 5 and b.state_dict()["batches"] == 0


def test_every_rank_same_batches_with_uneven_shards(shards):
    d, _ = shards([7, 3, 5, 9, 4, 6])  # 34 samples; 6 shards >= 2 ranks x 2 workers
    loaders = [
        ShardLoader(d, batch_size=3, transform=TRAIN, rank=r, world_size=2, num_workers=2, seed=0, shuffle_buffer=4)
        for r in (0, 1)
    ]
    assert [len(ld) for ld in loaders] == [34 // 6] * 2
    for epoch in range(3):
        per_rank = [list(ld) for ld in loaders]
        assert [len(b) for b in per_rank] == [5, 5]
        assert all(b["image"].shape == (3, 3, 8, 8) for bs in per_rank for b in bs)
        k0, k1 = set(keys_of(per_rank[0])), set(keys_of(per_rank[1]))
        assert not k0 & k1  # shard-level split: ranks never share samples
        assert loaders[0].epoch == epoch + 1


def test_balanced_train_epoch_is_one_pass_despite_a_large_buffer(shards):
    d, _ = shards([10] * 4)  # 2 workers x 2 shards x 10 samples; the buffer is larger than a pass
    ld = ShardLoader(d, batch_size=4, transform=TRAIN, num_workers=2, shuffle_buffer=1000, seed=9)
    epochs = [keys_of(ld) for _ in range(2)]
    for keys in epochs:
        assert sorted(keys) == [f"{i:09d}" for i in range(40)]  # every sample once, no repeats
    assert epochs[0] != epochs[1]  # reshuffled per epoch


@pytest.mark.parametrize("sizes", [[7, 8], [16]])
def test_few_shards_sample_level_split_warns(shards, caplog, sizes):
    # fewer shards than streams (2 ranks x 2 workers): streams that share shards keep every k-th sample
    d, _ = shards(sizes)
    with caplog.at_level(logging.WARNING, logger="mimscale.data"):
        loaders = [
            ShardLoader(d, batch_size=2, transform=TRAIN, rank=r, world_size=2, num_workers=2, shuffle=False)
            for r in (0, 1)
        ]
    assert "more data than needed" in caplog.text
    runs = [list(ld) for ld in loaders]
    assert [len(r) for r in runs] == [sum(sizes) // 4] * 2
    # an epoch this size fits in one pass: no sample is read twice, by any stream of any rank
    all_keys = keys_of(runs[0]) + keys_of(runs[1])
    assert len(all_keys) == len(set(all_keys)) == 4 * (sum(sizes) // 4)


def test_eval_each_key_once_equal_batches(shards):
    d, _ = shards([7, 3, 5, 9, 1])  # 25 samples over 3 ranks: 8, 8, 9
    results = []
    for r in range(3):
        ld = ShardLoader(d, batch_size=4, transform=EVAL, rank=r, world_size=3, num_workers=2, mode="eval")
        batches = list(ld)
        assert len(batches) == len(ld) == 3
        for b in batches:
            assert b["image"].shape == (4, 3, 8, 8) and b["valid"].dtype == torch.bool
            assert all(k == "" for k, v in zip(b["key"], b["valid"]) if not v)
            assert all(lab == -1 for lab, v in zip(b["label"].tolist(), b["valid"]) if not v)
        results.append([(k, int(lab)) for b in batches for k, lab, v in zip(b["key"], b["label"], b["valid"]) if v])
    keys = [k for res in results for k, _ in res]
    assert sorted(keys) == [f"{i:09d}" for i in range(25)]
    assert all(lab == int(k) % 5 for res in results for k, lab in res)
    assert [len(r) for r in results] == [8, 8, 9]


def test_eval_resume_and_no_manifest(shards, tmp_path):
    d, paths = shards([6, 6, 6, 6, 2])
    kw = dict(batch_size=4, transform=EVAL, rank=1, world_size=2, num_workers=2, mode="eval")
    ref = list(ShardLoader(d, **kw))
    a = ShardLoader(d, **kw)
    part = take(a, 1)
    b = ShardLoader(d, **kw)
    b.load_state_dict(a.state_dict())
    rest = list(b)
    assert keys_of(part + rest) == keys_of(ref)
    # without a manifest, samples_per_epoch gives the size; every sample still appears exactly once
    (d / "manifest.json").unlink()
    with pytest.raises(DataError, match="samples_per_epoch"):
        ShardLoader([str(p) for p in paths], **kw)
    keys = []
    for r in (0, 1):
        kw["rank"] = r
        keys += [
            k
            for bt in ShardLoader([str(p) for p in paths], samples_per_epoch=26, **kw)
            for k, v in zip(bt["key"], bt["valid"])
            if v
        ]
    assert sorted(keys) == [f"{i:09d}" for i in range(26)]


def test_corrupt_sample_and_truncated_shard_are_skipped(shards, caplog):
    d, _ = shards([10, 10, 10, 10], corrupt={12, 17}, truncate={2})
    with caplog.at_level(logging.WARNING, logger="mimscale.data"):
        ev = ShardLoader(d, batch_size=5, transform=EVAL, num_workers=2, mode="eval")
        keys = [k for b in ev for k, v in zip(b["key"], b["valid"]) if v]
    assert ev.stats == {"skipped_samples": 2, "bad_shards": 1}
    assert "000000012" not in keys and "000000017" not in keys
    assert 28 <= len(keys) < 38 and len(keys) == len(set(keys))  # shard 2 lost its second half
    assert caplog.text.count("train-000001.tar/000000012") == 1
    assert caplog.text.count("bad shard train-000002.tar") == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mimscale.data"):
        tr = ShardLoader(d, batch_size=5, transform=TRAIN, num_workers=2, shuffle=False, samples_per_epoch=80)
        for _ in range(2):
            batches = list(tr)
            assert len(batches) == 16 and all(b["image"].shape[0] == 5 for b in batches)
    assert tr.stats == {"skipped_samples": 2, "bad_shards": 1}
    assert caplog.text.count("train-000002.tar") == 1  # logged once, not once per cycle or epoch


def test_all_bad_shards_raise_data_error(tmp_path, shards):
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(2):
        (bad / f"x-{i}.tar").write_bytes(b"garbage, not a tar file" * 10)
    ld = ShardLoader(f"{bad}/x-{{0..1}}.tar", batch_size=2, transform=TRAIN, num_workers=2, samples_per_epoch=8)
    with pytest.raises(DataError, match="cannot read any sample") as e:
        list(ld)
    assert "\n" not in str(e.value)
    d, _ = shards([4, 4], corrupt=set(range(8)))
    with pytest.raises(DataError, match="no decodable sample"):
        list(ShardLoader(d, batch_size=2, transform=TRAIN, num_workers=0, shuffle_buffer=2))
    with pytest.raises(DataError, match="no decodable sample"):
        list(ShardLoader(d, batch_size=2, transform=EVAL, num_workers=1, mode="eval"))


def test_missing_shard_and_bad_arguments(shards, tmp_path):
    d, paths = shards([3, 3])
    missing = d / "train-000007.tar"
    with pytest.raises(DataError, match=str(missing)):
        ShardLoader([str(paths[0]), str(missing), str(d / "train-000009.tar")], batch_size=2, transform=TRAIN)
    with pytest.raises(DataError, match="train-000002.tar"):
        ShardLoader(f"{d}/train-{{000000..000003}}.tar", batch_size=2, transform=TRAIN)
    with pytest.raises(DataError, match="no shard manifest"):
        ShardLoader(str(tmp_path), batch_size=2, transform=TRAIN)
    with pytest.raises(DataError, match="lower batch_size"):
        ShardLoader(d, batch_size=4, world_size=2, transform=TRAIN)
    with pytest.raises(DataError, match="samples_per_epoch"):  # a remote shard has no manifest beside it
        ShardLoader("https://example.invalid/a.tar", batch_size=2, transform=TRAIN)
    with pytest.raises(DataError, match="unknown URL scheme ftp://"):
        ShardLoader("ftp://example.invalid/a.tar", batch_size=2, transform=TRAIN, samples_per_epoch=4)
    a = ShardLoader(d, batch_size=2, transform=TRAIN, num_workers=2)
    b = ShardLoader(d, batch_size=2, transform=TRAIN, num_workers=1)
    with pytest.raises(DataError, match="num_workers=2"):
        b.load_state_dict(a.state_dict())


def test_pipe_source_never_uses_a_shell(shards, tmp_path):
    d, paths = shards([5, 4, 6])
    kw = dict(batch_size=3, transform=EVAL, num_workers=2, mode="eval")
    local = keys_of(ShardLoader(d, **kw))
    piped = keys_of(ShardLoader([f"pipe:cat {p}" for p in paths], **kw))  # counts from the manifest beside
    assert piped == local and len([k for k in local if k]) == 15
    marker = tmp_path / "pwned"
    hostile = f"pipe:cat {paths[0]} ;touch {marker} $(touch {marker})"
    ld = ShardLoader([hostile], samples_per_epoch=5, batch_size=1, transform=TRAIN, num_workers=0)
    list(ld)  # cat fails on the extra arguments -> a bad shard, but the samples before are kept
    assert not marker.exists()


def test_extra_npy_field_and_custom_collate(shards):
    d, _ = shards([4, 4], extra_npy=True)
    batch = next(iter(ShardLoader(d, batch_size=4, transform=EVAL, num_workers=0, mode="eval")))
    assert batch["npy"].shape == (4, 2, 3) and batch["npy"].dtype == torch.int16
    assert [int(v) for v in batch["npy"][:, 0, 0]] == [int(k) for k in batch["key"]]

    seen = {}

    def collate(samples, generator):
        seen["fields"] = sorted(samples[0])
        seen["gen"] = isinstance(generator, torch.Generator)
        return {"n": len(samples)}

    out = next(iter(ShardLoader(d, batch_size=2, transform=TRAIN, collate=collate, num_workers=0)))
    assert out == {"n": 2} and seen == {"fields": ["image", "key", "label", "npy"], "gen": True}


def test_no_global_rng_use(shards):
    d, _ = shards([6, 6])
    torch_state, py_state, np_state = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    for nw in (0, 2):
        list(ShardLoader(d, batch_size=2, transform=TRAIN, collate=mask_collate, num_workers=nw))
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == py_state and np.array_equal(np.random.get_state()[1], np_state)


def test_spawned_workers_get_pickled_pipeline(shards):
    d, _ = shards([4, 4])
    kw = dict(batch_size=2, transform=TRAIN, collate=mask_collate, num_workers=1, seed=3, shuffle_buffer=4)
    forked = list(ShardLoader(d, **kw))
    spawned = list(ShardLoader(d, multiprocessing_context="spawn", **kw))
    assert_same_batches(spawned, forked)


def test_loader_reads_webdataset_compatible_shards(shards, tmp_path):
    d, paths = shards([3, 2])
    ours = keys_of(ShardLoader(d, batch_size=1, transform=EVAL, num_workers=0, mode="eval"))
    theirs = [s["__key__"] for s in wds.WebDataset([str(p) for p in paths], shardshuffle=False)]
    assert ours == theirs
    assert Counter(len(k) for k in ours) == {9: 5}
    # tars written by Python's tarfile (pax headers), gzipped, are read too
    gz = tmp_path / "other.tar.gz"
    with tarfile.open(gz, "w:gz", format=tarfile.PAX_FORMAT) as tf:
        for s in wds.WebDataset([str(p) for p in paths], shardshuffle=False):
            for ext in ("png", "cls"):
                info = tarfile.TarInfo(f"some/dir/{s['__key__']}.{ext}")
                info.size = len(s[ext])
                tf.addfile(info, io.BytesIO(s[ext]))
    got = keys_of(ShardLoader(str(gz), samples_per_epoch=5, batch_size=1, transform=EVAL, num_workers=0, mode="eval"))
    assert got == [f"some/dir/{k}" for k in ours]


def test_each_epoch_reorders_and_each_sample_draws_its_own_augmentation(shards, images):
    """A new epoch reads the shards in a new order (no shuffle buffer here, so the order is the shards'), and
    every sample of a stream has its own augmentation generator: identical images come out cropped differently."""
    d, _ = shards([6] * 4)
    ld = ShardLoader(d, batch_size=4, transform=TRAIN, num_workers=0, seed=3, shuffle_buffer=0)
    ld.set_epoch(0)
    first = keys_of(take(ld, len(ld)))
    ld.set_epoch(1)
    second = keys_of(take(ld, len(ld)))
    assert sorted(first) == sorted(second) and first != second
    same = images.png(0, size=(12, 10))
    d, _ = shards([8], image=lambda g: ("png", same))
    (batch,) = take(ShardLoader(d, batch_size=8, transform=TRAIN, num_workers=0, seed=3, shuffle_buffer=0), 1)
    assert len({img.numpy().tobytes() for img in batch["image"]}) > 1


def test_an_uncaught_error_with_workers_running_exits_instead_of_hanging(shards):
    """Workers ignore SIGTERM (a signal to the process group is the main process's to handle); an exception that
    ends the program leaves the epoch suspended, and multiprocessing's exit hook would terminate() + join() the
    workers forever. The loader closes open epochs at exit, so the process exits with the error."""
    import subprocess
    import sys
    import textwrap

    d, _ = shards([6, 6])
    script = textwrap.dedent(
        f"""
        from mimscale.data import ShardLoader, TrainTransform
        ld = ShardLoader({str(d)!r}, batch_size=2, transform=TrainTransform(8), num_workers=2, seed=0)
        it = iter(ld)
        next(it)
        raise RuntimeError("planted error with workers running")
        """
    )
    try:
        r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the process hung at exit with its loader workers alive: {e}")
    assert r.returncode == 1 and "planted error with workers running" in r.stderr
