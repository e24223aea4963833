"""Reading WebDataset tar shards as a stream (local files and ``pipe:`` commands): no seeking, no ``tarfile``."""

from __future__ import annotations

import gzip
import subprocess
import zlib
from collections.abc import Iterator

from .sources import shard_command, url_shard_name

__all__ = ["ShardReadError", "iter_tar_samples", "read_shard"]


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


def read_shard(url: str) -> Iterator[dict]:
    """Samples of one shard: a local file, or the stdout of a ``pipe:`` command or of curl/gsutil for a
    remote URL (:func:`mimscale.data.sources.shard_command`; never through a shell)."""
    name = url_shard_name(url)
    argv = shard_command(url)
    if argv is None:
        try:
            f = open(url, "rb", buffering=1 << 20)  # noqa: SIM115 - opened here to report an open error apart
        except OSError as e:
            raise ShardReadError(f"cannot open: {e.strerror}") from None
        with f:
            yield from iter_tar_samples(f, name)
        return
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, bufsize=1 << 20)
    except (OSError, ValueError) as e:
        raise ShardReadError(f"cannot start {argv[:1]}: {e}") from None
    assert proc.stdout is not None  # stdout=PIPE
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
