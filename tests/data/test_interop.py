"""Real WebDataset interop: shards from webdataset's TarWriter read by ShardLoader, shards from `mimscale data`
read by webdataset.WebDataset, and http:// sources streamed (curl, as webdataset does) from a local server."""

from __future__ import annotations

import functools
import http.server
import threading

import pytest
import webdataset as wds
from PIL import Image

from mimscale.data import EvalTransform, ShardLoader, TrainTransform, read_manifest

EVAL = EvalTransform(16)


def keys(loader):
    return [k for b in loader for k, v in zip(b["key"], b["valid"]) if v]


def test_webdataset_tarwriter_shards_are_read(tmp_path, images):
    """TarWriter's tars (tarfile headers with owners and mtimes, nested keys, a JSON field) through both decode paths."""
    paths, want = [], []
    for s in range(2):
        path = tmp_path / f"wds-{s:06d}.tar"
        with wds.TarWriter(str(path)) as w:
            for i in range(5):
                key = f"part{s}/img{i:03d}"
                w.write(
                    {
                        "__key__": key,
                        "jpg": images.jpeg(10 * s + i, size=(40, 32)),
                        "cls": (s + i) % 3,
                        "json": {"i": i},
                    }
                )
                want.append((key, (s + i) % 3))
        paths.append(str(path))
    ld = ShardLoader(paths, batch_size=5, transform=EVAL, num_workers=0, mode="eval", samples_per_epoch=10)
    got = [(k, int(y)) for b in ld for k, y in zip(b["key"], b["label"])]
    assert got == want
    batch = next(
        iter(ShardLoader(paths, batch_size=5, transform=EVAL, num_workers=0, mode="eval", samples_per_epoch=10))
    )
    assert batch["image"].shape == (5, 3, 16, 16) and batch["json"][0] == b'{"i": 0}'
    train = ShardLoader(
        paths, batch_size=4, transform=TrainTransform(16), num_workers=2, samples_per_epoch=10, decode="device"
    )
    b = train.to_device(next(iter(train)), "cpu")
    assert b["image"].shape == (4, 3, 16, 16) and {k.split("/")[0] for k in b["key"]} <= {"part0", "part1"}


def test_mimscale_shards_are_read_by_webdataset(tmp_path, images):
    from mimscale.cli import main

    for c in ("cat", "dog"):
        (tmp_path / "src" / c).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "src" / c / f"{i}.jpg").write_bytes(images.jpeg(i + (c == "dog") * 10, size=(60, 45)))
    out = tmp_path / "shards"
    assert (
        main(
            [
                "data",
                "folder",
                str(tmp_path / "src"),
                str(out),
                "--shard-size",
                "4",
                "--workers",
                "1",
                "--max-side",
                "50",
            ]
        )
        == 0
    )
    m = read_manifest(out)
    urls = [str(out / s["name"]) for s in m["shards"]]
    theirs = list(wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("__key__", "jpg", "cls"))
    ours = ShardLoader(str(out), batch_size=2, transform=EVAL, num_workers=0, mode="eval")
    assert [k for k, _, _ in theirs] == keys(ours) and len(theirs) == 6
    assert all(isinstance(img, Image.Image) and max(img.size) == 50 for _, img, _ in theirs)
    assert sorted(int(c) for _, _, c in theirs) == [0, 0, 0, 1, 1, 1]


@pytest.fixture
def http_dir():
    """Serve a directory over http://127.0.0.1 (a thread) for the test."""
    servers = []

    def serve(root):
        handler = functools.partial(_QuietHandler, directory=str(root))
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}"

    yield serve
    for s in servers:
        s.shutdown()
        s.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_http_sources_stream_like_webdataset(shards, http_dir):
    d, paths = shards([5, 4, 6])
    base = http_dir(d)
    urls = f"{base}/train-{{000000..000002}}.tar"
    local = keys(ShardLoader(d, batch_size=4, transform=EVAL, num_workers=2, mode="eval"))
    remote = keys(ShardLoader(urls, manifest=d, batch_size=4, transform=EVAL, num_workers=2, mode="eval"))
    theirs = [s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False)]
    assert remote == local and sorted(local) == theirs and len(local) == 15
    missing = ShardLoader(
        [f"{base}/train-000000.tar", f"{base}/nope.tar"],
        samples_per_epoch=10,
        batch_size=5,
        transform=EVAL,
        num_workers=0,
        mode="eval",
    )
    assert len(keys(missing)) == 5 and missing.stats["bad_shards"] == 1  # curl -f fails: a bad shard, logged
