"""Failures must not cascade (issue 31): a test that fails with a job still in the shared worker
leaves the worker idle for the next test (conftest's `_shared_worker_left_idle`), and deadlines
scale with the machine (`_deadlines.scaled`).

The conftest is checked by running it on two inner tests in a child pytest, with the shared
worker replaced by a client of a stuck fake worker (a process that never answers): the first test
fails with its job running, the second must still be able to submit a job.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parents[1]  # Testing/
REPO = HERE.parent

INNER = textwrap.dedent('''
    import pytest
    from RetrievalSegLib.worker.client import WorkerClient

    @pytest.fixture(scope="session")
    def worker_client(tmp_path_factory):  # the shared worker, here a process that never answers
        fake = tmp_path_factory.mktemp("bin") / "fake-python"
        fake.write_text("#!/bin/sh\\nexec sleep 60\\n")
        fake.chmod(0o755)
        client = WorkerClient(python=str(fake), log_dir=tmp_path_factory.mktemp("logs"), cancel_grace_s=0.5)
        yield client
        client.stop()

    def test_1_fails_with_its_job_still_running(worker_client):
        worker_client.submit("load", {})
        assert False, "fails while its job runs"

    def test_2_the_next_job_is_accepted(worker_client):
        job = worker_client.submit("load", {})  # "RetrievalSeg is still running" if test 1's job were left
        assert job.outcome is None
''')


@pytest.mark.skipif(os.name != "posix", reason="the fake worker is a shell script")
def test_a_failed_worker_test_leaves_the_shared_worker_idle(tmp_path) -> None:
    shutil.copy(HERE / "conftest.py", tmp_path / "conftest.py")
    shutil.copy(HERE / "_deadlines.py", tmp_path / "_deadlines.py")
    (tmp_path / "test_inner.py").write_text(INNER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(tmp_path), os.environ.get("PYTHONPATH", "")]),
               RSEG_TEST_TIME_FACTOR="1")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "", "--rootdir",
                          str(tmp_path), str(tmp_path / "test_inner.py")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    tail = run.stdout[-3000:] + run.stderr[-2000:]
    assert "1 failed, 1 passed" in run.stdout, tail
    assert "still running" not in run.stdout, tail


def test_deadlines_scale_with_the_time_factor(monkeypatch) -> None:
    from _deadlines import scaled, time_factor

    monkeypatch.setenv("RSEG_TEST_TIME_FACTOR", "3")
    assert scaled(60) == 180
    monkeypatch.delenv("RSEG_TEST_TIME_FACTOR")
    assert time_factor() >= 1.0  # the load per core, never below 1
    monkeypatch.setenv("RSEG_TEST_TIME_FACTOR", "0")
    with pytest.raises(ValueError, match="> 0"):
        time_factor()
