"""Shared test setup: offline switches, a loopback-only network guard, small helpers.

Every test runs with RSEG_OFFLINE=1 / HF_HUB_OFFLINE=1 and with outgoing connections to anything
but 127.0.0.0/8 (and ::1) refused, so a test that would reach a model hub fails instead of hanging.
"""
from __future__ import annotations

import atexit
import ipaddress
import os
import shutil
import socket
import tempfile

import pytest

os.environ.setdefault("RSEG_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Per-user caches (memories of read-only banks) go to a throwaway folder, never the real home.
if "RSEG_CACHE_DIR" not in os.environ:
    _cache_dir = tempfile.mkdtemp(prefix="rseg-test-cache-")
    os.environ["RSEG_CACHE_DIR"] = _cache_dir
    atexit.register(shutil.rmtree, _cache_dir, True)
# The Hugging Face cache too: tests never read (or fill) the developer's real one.
_hf_home = tempfile.mkdtemp(prefix="rseg-test-hf-home-")
os.environ["HF_HOME"] = _hf_home
os.environ.pop("HF_HUB_CACHE", None)
atexit.register(shutil.rmtree, _hf_home, True)
# Keep torch from oversubscribing the 2-core CI machine.
os.environ.setdefault("OMP_NUM_THREADS", "2")

_real_connect = socket.socket.connect
_real_create_connection = socket.create_connection


def _is_loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def _guarded_connect(self: socket.socket, address):  # type: ignore[no-untyped-def]
    if self.family in (socket.AF_INET, socket.AF_INET6):
        host = address[0]
        if not _is_loopback(str(host)):
            raise ConnectionRefusedError(f"tests may only contact loopback addresses, not {host!r}")
    return _real_connect(self, address)


@pytest.fixture(autouse=True)
def _loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket.socket, "connect", _guarded_connect)


@pytest.fixture(scope="session")
def slicer_scene():  # type: ignore[no-untyped-def]
    """(slicer, scene): a headless slicer-core MRML scene with the segmentation converter rules."""
    import slicer  # slicer-core is a test dependency: a missing install must fail, not skip
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    registered = {r.GetClassName() for r in factory.GetConverterRules()}
    for rule in (
        slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule,
        slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule,
        slicer.vtkFractionalLabelmapToClosedSurfaceConversionRule,
        slicer.vtkClosedSurfaceToFractionalLabelmapConversionRule,
    ):
        if rule.__name__ not in registered:  # the factory keeps duplicates
            factory.RegisterConverterRule(rule())
    scene = slicer.vtkMRMLScene()
    color_logic = slicer.vtkMRMLColorLogic()
    color_logic.SetMRMLScene(scene)
    yield slicer, scene
    color_logic.SetMRMLScene(None)
    scene.Clear(1)


@pytest.fixture(scope="session")
def slicer_launcher(tmp_path_factory):  # type: ignore[no-untyped-def]
    """`PythonSlicer` as Slicer has it: a CTKAppLauncher stand-in that runs this Python as its child."""
    from _launcher import make_launcher

    return make_launcher(tmp_path_factory.mktemp("slicer-bin"))


@pytest.fixture(scope="session")
def worker_client(tmp_path_factory, slicer_launcher):  # type: ignore[no-untyped-def]
    """One model worker process shared by the test session (models load once, as in Slicer).

    Started the way the Slicer module starts it: through the launcher stand-in, so the worker is
    the launcher's child, not ours. Tests that kill it or stop it are fine: the next job starts a
    new worker.
    """
    from RetrievalSegLib.worker.client import WorkerClient

    client = WorkerClient(python=str(slicer_launcher), log_dir=tmp_path_factory.mktemp("worker-logs"),
                          cancel_grace_s=30.0)
    yield client
    client.stop()


@pytest.fixture(autouse=True)
def _shared_worker_left_idle(request):  # type: ignore[no-untyped-def]
    """After every test that used the shared worker: no job left running, whatever happened.

    A test that fails (or times out) with a job still in the worker would otherwise hand the next
    worker test "RetrievalSeg is still running": one failure reported as many. The job is
    cancelled and waited for; one that does not end is stopped with its worker (the next job
    starts a fresh one).
    """
    yield
    if "worker_client" not in request.fixturenames:
        return
    from _deadlines import scaled

    client = request.getfixturevalue("worker_client")
    job = client.job
    if job is None or job.outcome is not None:
        return
    job.cancel()
    job.wait(scaled(client.cancel_grace_s + 10.0))  # pump() kills it after the grace time
    if job.outcome is None:
        client.stop()
