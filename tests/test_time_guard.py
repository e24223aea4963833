"""The suite's time guard (tests/conftest.py): a test over its CPU limit fails unless marked allow_slow."""

from __future__ import annotations

from pathlib import Path

pytest_plugins = ["pytester"]


def test_time_guard_fails_a_slow_test_unless_allowed(pytester, monkeypatch):
    pytester.makeconftest(Path(__file__).with_name("conftest.py").read_text())
    pytester.makeini("[pytest]\nmarkers =\n    allow_slow: exempt\n")
    pytester.makepyfile(
        test_x="""
import time
import pytest

def spin(s):
    t = time.process_time()
    while time.process_time() - t < s:
        pass

def test_slow():
    spin(0.5)

@pytest.mark.allow_slow("spins on purpose", limit_s=5)
def test_allowed():
    spin(0.5)

@pytest.mark.allow_slow("spins on purpose", 5)
def test_allowed_positional_limit():
    spin(0.5)

def test_fast():
    pass
"""
    )
    monkeypatch.setenv("MIMSCALE_TEST_LIMIT_S", "0.25")
    r = pytester.runpytest_subprocess("-p", "no:randomly", "-p", "no:cacheprovider")
    r.assert_outcomes(passed=3, failed=1)
    r.stdout.fnmatch_lines(["*test_slow*", "*time guard: call took * s CPU*over the limit of 0.25 s CPU*"])
