"""Progress: plain lines on a non-TTY stream, a tqdm bar on a TTY, and a rate
that starts at the first update. Time is a fake clock, so nothing sleeps."""

from __future__ import annotations

import io
import types

import pytest
import torch

from mimscale.telemetry import Progress
from mimscale.telemetry import progress as progress_mod
from mimscale.telemetry.progress import format_value


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(progress_mod, "time", types.SimpleNamespace(monotonic=c))
    return c


class TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_on_non_tty(clock):
    out = io.StringIO()
    p = Progress(100, images_per_step=32, file=out, plain_interval=10.0)
    assert p.plain
    clock.t += 60.0  # start-up
    for step in range(1, 41):
        p.update(step, loss=0.523 - step * 1e-3, lr=torch.tensor(1.2e-4))
        clock.t += 0.5
    p.close()
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    # first update (t=0), one 10 s later (step 21), then the final line (step 40)
    assert [line.split(" | ")[0] for line in lines] == [
        "pretrain: step 1/100 (1.0%)",
        "pretrain: step 21/100 (21.0%)",
        "pretrain: step 40/100 (40.0%)",
    ]
    last = lines[-1]
    assert last.startswith("pretrain: step 40/100 (40.0%)")
    assert "64.0 img/s" in last  # 32 images / 0.5 s
    assert "ETA 00:30" in last  # 60 steps * 0.5 s
    assert "elapsed 00:20" in last  # the 60 s start-up is not counted
    assert "loss=0.483" in last and "lr=1.2e-4" in last
    assert "ETA ?" in lines[0]  # nothing measured yet at the first update


def test_rate_excludes_startup_and_follows_recent_steps(clock):
    p = Progress(1000, start_step=200, images_per_step=256, enabled=False, window=5)
    assert p.rate() == 0.0 and p.eta() is None
    clock.t += 300.0  # model build, loader warm-up, first (compiled) step
    p.update(201)
    assert p.rate() == 0.0
    for step in range(202, 211):
        clock.t += 0.25
        p.update(step)
    assert p.rate() == pytest.approx(256 / 0.25)
    assert p.eta() == pytest.approx((1000 - 210) * 0.25)
    assert p.elapsed() == pytest.approx(9 * 0.25)
    # slower now: after a full window only the recent speed counts
    for step in range(211, 216):
        clock.t += 1.0
        p.update(step)
    assert p.rate() == pytest.approx(256.0)
    p.close()


def test_tty_uses_a_tqdm_bar(clock):
    out = TTY()
    with Progress(50, images_per_step=8, file=out, desc="mae") as p:
        assert not p.plain
        for step in range(1, 11):
            p.update(step, loss=1.5)
            clock.t += 0.1
    text = out.getvalue()
    assert "\r" in text and "mae:" in text
    assert "10/50" in text and "img/s" in text and "ETA" in text and "loss=1.5" in text


def test_disabled_prints_nothing(clock):
    out = io.StringIO()
    p = Progress(10, images_per_step=4, enabled=False, file=out, plain_interval=0.0)
    for step in range(1, 4):
        p.update(step)
        clock.t += 1.0
    p.close()
    assert out.getvalue() == ""
    assert p.rate() == pytest.approx(4.0)


def test_defaults_to_stderr_and_validates(capsys):
    p = Progress(3, images_per_step=1)
    p.update(1)
    p.close()
    assert "pretrain: step 1/3" in capsys.readouterr().err  # pytest's capture is not a TTY
    with pytest.raises(ValueError):
        Progress(3, images_per_step=0)


@pytest.mark.parametrize(
    "value,text",
    [
        (0.523, "0.523"),
        (1.2e-4, "1.2e-4"),
        (3.0e-5, "3e-5"),
        (812.4, "812.4"),
        (123456.0, "1.23e5"),
        (7, "7"),
        (0.0, "0.0"),
        (float("nan"), "nan"),
        ("adamw", "adamw"),
        (torch.tensor(0.25), "0.25"),
    ],
)
def test_format_value(value, text):
    assert format_value(value) == text
