"""The worker as Slicer starts it: under CTKAppLauncher (`PythonSlicer`), from Slicer's working folder.

In Slicer the process the client starts is the launcher, and the worker is the launcher's child
(`_launcher.py` says what the stand-in copies from ctkAppLauncher.cpp). What is checked:
* the worker stays while Slicer (here: this test process) lives, although its parent is the
  launcher, and a job finishes through the launcher (issue "Slicer" defect 1);
* kill, stop and a forced cancel end the real worker, checked by its pid, not only the launcher
  (defect 2); a launcher killed from outside does not leave its worker running either;
* the worker does not import packages from Slicer's working folder (a `numpy/` there), and two
  clients in one process write two logs (defect 9).
"""
from __future__ import annotations

import os
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest

from _launcher import make_launcher, running, wait_gone
from RetrievalSegLib.bank.support_bank import LabelInfo, SupportBank
from RetrievalSegLib.worker.client import WorkerClient
from RetrievalSegLib import __version__
from RetrievalSegLib.worker.protocol import PROTOCOL_VERSION

#: What a fake worker says in its "ready" line to pass the client's version check.
READY = {"protocol": PROTOCOL_VERSION, "version": __version__}

IDENTITY = "dinov2-small:sha256-0123456789abcdef@224"


@pytest.fixture()
def bank(tmp_path: Path) -> Path:
    """An empty bank: `verify` checks it in the worker without loading a model."""
    return SupportBank.create(tmp_path / "bank", [LabelInfo(1, "LV", (1.0, 0.0, 0.0))], IDENTITY).path


def _ready(client: WorkerClient, timeout: float = 60.0) -> int:
    client.start()
    deadline = time.monotonic() + timeout
    while client.worker_pid is None and time.monotonic() < deadline:
        client.pump(block_s=0.05)
    assert client.worker_pid is not None, client.log_tail()
    return client.worker_pid


def _stubborn_worker(folder: Path) -> Path:
    """A 'python' that says ready, then ignores cancel, shutdown, stdin EOF and SIGTERM."""
    fake = folder / "stubborn-python"
    fake.write_text(f"#!{sys.executable}\n" + textwrap.dedent("""
        import json, os, signal, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        sys.stdout.write(json.dumps({"type": "ready", "pid": os.getpid(), **READY}) + "\\n")
        sys.stdout.flush()
        time.sleep(120)
    """).replace("READY", repr(READY)))
    fake.chmod(0o755)
    return fake


def test_worker_under_the_launcher_stays_and_finishes_a_job(tmp_path, slicer_launcher, bank) -> None:  # type: ignore[no-untyped-def]
    client = WorkerClient(python=str(slicer_launcher), log_dir=tmp_path)
    try:
        pid = _ready(client)
        assert pid != client.process.pid  # the launcher is in between, as in Slicer
        time.sleep(1.5)  # several parent checks (worker.PARENT_POLL_S; 1 s before the fix)
        assert running(pid), f"the worker left while Slicer was alive:\n{client.log_tail()}"
        result = client.run("verify", {"bank": str(bank)}, timeout=60)
        assert result["ok"], result["summary"]
        launcher = client.process.pid
    finally:
        client.stop()
    assert wait_gone(pid) and wait_gone(launcher), "stop() left a process behind"
    assert "worker exiting: shutdown" in Path(client.log_path).read_text()


def test_kill_ends_the_real_worker_not_only_the_launcher(tmp_path) -> None:
    """The worker ignores everything but SIGKILL (a job stuck in native code), so only its pid can end it."""
    client = WorkerClient(python=str(make_launcher(tmp_path, python=_stubborn_worker(tmp_path))), log_dir=tmp_path)
    pid = _ready(client)
    launcher = client.process.pid
    client.kill()
    client._reap()
    assert wait_gone(pid), "kill() ended the launcher; the worker (and its models) live on"
    assert wait_gone(launcher)


def test_forced_cancel_and_stop_end_a_worker_that_ignores_them(tmp_path) -> None:
    """A job stuck in native code ignores cancel: after the grace time the worker itself is ended."""
    launcher = make_launcher(tmp_path, python=_stubborn_worker(tmp_path))
    client = WorkerClient(python=str(launcher), log_dir=tmp_path, cancel_grace_s=0.5)
    job = client.submit("load", {"settings": {}})
    pid = _ready(client)
    job.cancel()
    events = job.wait(20)
    assert job.outcome == "cancelled" and "stopped by force" in events[-1].message
    assert wait_gone(pid), "the forced cancel left the worker running"

    pid = _ready(client)  # stop(): shutdown and EOF are ignored too
    t0 = time.monotonic()
    client.stop(timeout=0.5)
    assert wait_gone(pid), "stop() left the worker running"
    assert time.monotonic() - t0 < 10


def test_a_killed_launcher_does_not_leave_its_worker_running(tmp_path) -> None:
    """Someone kills PythonSlicer (not the worker): the client notices and ends the worker too."""
    client = WorkerClient(python=str(make_launcher(tmp_path, python=_stubborn_worker(tmp_path))), log_dir=tmp_path)
    pid = _ready(client)
    os.kill(client.process.pid, signal.SIGKILL)  # the launcher only; its child lives on, as in Slicer
    deadline = time.monotonic() + 10
    while client.process is not None and client.process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    client.pump()  # the poll after it: the launcher is gone
    assert not client.alive
    assert wait_gone(pid), "the worker outlived its killed launcher"


def test_the_worker_ignores_packages_in_the_working_folder(tmp_path, monkeypatch, slicer_launcher, bank) -> None:  # type: ignore[no-untyped-def]
    """Slicer's working folder holding a `numpy/` (the issue's case: `sam2/`) must not shadow the real one."""
    here = tmp_path / "slicer-working-folder"
    (here / "numpy").mkdir(parents=True)
    (here / "numpy" / "__init__.py").write_text("raise ImportError('shadowed by the working folder')\n")
    monkeypatch.chdir(here)
    client = WorkerClient(python=str(slicer_launcher), log_dir=tmp_path)
    try:
        result = client.run("verify", {"bank": str(bank)}, timeout=60)
        assert result["ok"], result["summary"]
    finally:
        client.stop()


def test_two_clients_write_two_logs(tmp_path, slicer_launcher) -> None:  # type: ignore[no-untyped-def]
    a = WorkerClient(python=str(slicer_launcher), log_dir=tmp_path)
    b = WorkerClient(python=str(slicer_launcher), log_dir=tmp_path)
    try:
        pids = _ready(a), _ready(b)
        assert a.log_path != b.log_path
    finally:
        a.stop()
        b.stop()
    # Each log holds its own worker's lines only ("ready" is logged just after it is sent).
    assert f"worker {pids[0]} ready" in a.log_path.read_text() and f"[{pids[1]}]" not in a.log_path.read_text()
    assert f"worker {pids[1]} ready" in b.log_path.read_text() and f"[{pids[0]}]" not in b.log_path.read_text()
