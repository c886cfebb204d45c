"""The conftest's marker check: a test that is not marked slow fails when it starts Ray or asks for the Ray or
MLflow server fixtures, so `make test-fast` (-m "not slow") never starts them."""
from __future__ import annotations

import os
from pathlib import Path

CONFTEST = (Path(__file__).parent / "conftest.py").read_text()

INNER = '''
import os

import pytest


def _fake_ray_start(name):
    # What every Ray start leaves: a new session folder in Ray's temp dir (RAY_TMPDIR is set by the outer test).
    os.makedirs(os.path.join(os.environ["RAY_TMPDIR"], "ray", f"session_2099-01-01_00-00-00_{name}"))


def test_fast_and_starts_ray():
    _fake_ray_start("fast")


@pytest.mark.slow
def test_slow_and_starts_ray():
    _fake_ray_start("slow")


def test_fast_with_a_server(mlflow_server):
    pass


def test_fast_and_quiet():
    pass
'''


def test_a_test_not_marked_slow_that_starts_ray_or_a_server_fails(pytester, monkeypatch, tmp_path):
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    # The conftest imports the project (benchmarks.s3_local): the inner session runs elsewhere, so point at it.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(Path(__file__).parents[1]),
                                                                   os.environ.get("PYTHONPATH")])))
    pytester.makeconftest(CONFTEST.replace('pytest_plugins = ["pytester"]', ""))
    pytester.makepyfile(test_inner=INNER)
    pytester.makeini("[pytest]\nmarkers =\n    slow: slow\n    gpu: gpu\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-m", "not gpu", "-rA")
    result.assert_outcomes(passed=3, errors=2)
    result.stdout.fnmatch_lines(["*test_fast_and_starts_ray started Ray*but is not marked slow*",
                                 "*test_fast_with_a_server uses mlflow_server but is not marked slow*"])
    assert "test_slow_and_starts_ray started Ray" not in result.stdout.str()
