"""The model worker process and its client, as the Slicer module uses them.

What is checked:
* a job round trip with the real architectures (random weights): bank creation, adding a volume,
  segmenting; progress arrives in order, diagnostics before the result, the job folder is removed;
* cancel mid-volume ends the job as "cancelled" with no result and nothing written;
* `kill -9` of the worker mid-job: a clear error naming the cause and the log, the bank's files
  byte for byte as before, and the next job runs in a new worker;
* a malformed message from either side gives a clear error and never a hang; an array that needs
  pickle is refused; no module of the protocol imports pickle or multiprocessing;
* the worker exits when its parent dies, and after its idle timeout (a job sent then still runs);
* untrusted frames (issue "untrusted" item 10): a line nested too deeply for the JSON parser and a
  line longer than MAX_LINE_BYTES are reported as protocol errors (the long one before its end
  arrives) and the worker keeps serving; `run(timeout=...)` cancels and the client recovers.

The shared worker runs under the CTKAppLauncher stand-in (conftest), as in Slicer; the launcher's
own behaviour is tested in test_worker_launcher.py.
"""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from _deadlines import scaled
from _launcher import running
from RetrievalSegLib.worker import protocol as wp
from RetrievalSegLib.bank.support_bank import LabelInfo
from RetrievalSegLib.data.synthetic import LABELS, make_synthetic_study
from RetrievalSegLib.worker.client import WorkerClient, WorkerError, labels_json, volume_spec
from RetrievalSegLib import __version__
from RetrievalSegLib.worker.protocol import PROTOCOL_VERSION

#: What a fake worker says in its "ready" line to pass the client's version check.
READY = {"protocol": PROTOCOL_VERSION, "version": __version__}

SETTINGS = wp.EngineSettings(device="cpu", image_size=256, random_weights=True)
SHAPE = (6, 48, 48)
SPACING = (1.2, 1.0, 5.0)
LIB = Path(__file__).resolve().parents[2] / "RetrievalSegLib"


@pytest.fixture(scope="module")
def cases():  # type: ignore[no-untyped-def]
    return make_synthetic_study(n_cases=2, shape=SHAPE, spacing=SPACING, seed=5)


@pytest.fixture(scope="module")
def client(worker_client):  # type: ignore[no-untyped-def]
    return worker_client  # conftest: one worker for the session


@pytest.fixture(scope="module")
def bank_path(tmp_path_factory, client, cases) -> Path:  # type: ignore[no-untyped-def]
    """A bank made and filled entirely by worker jobs."""
    path = tmp_path_factory.mktemp("worker-bank") / "bank"
    labels = [LabelInfo(v, name, rgb) for v, (name, rgb) in sorted(LABELS.items())]
    made = client.run("create_bank", {"settings": SETTINGS.to_json(), "bank": str(path), "labels": labels_json(labels)})
    assert made == {"bank": str(path)}
    folder = client.new_job_folder()
    added = client.run("add_volume", {
        "settings": SETTINGS.to_json(), "bank": str(path), "volume": volume_spec(folder, "volume", cases[0].image),
        "labelmap": wp.save_array(folder, "labels", cases[0].labels.array), "case_id": cases[0].case_id,
        "axis": None, "window": [0.0, 1000.0],
    }, folder=folder)
    assert len(added["entries"]) >= 3
    assert not folder.exists()  # the job folder goes with the job
    return path


def _segment_job(client: WorkerClient, bank_path: Path, volume, k: int = 2):  # type: ignore[no-untyped-def]
    folder = client.new_job_folder()
    params = {
        "settings": SETTINGS.to_json(), "bank": str(bank_path), "volume": volume_spec(folder, "volume", volume),
        "runs": [[0, SHAPE[0]]], "axis": 2, "k": k, "window": [0.0, 1000.0],
    }
    return client.submit("segment", params, folder)


def _bank_files(path: Path) -> dict[str, str]:
    """sha256 of every bank file except the rebuildable memory cache."""
    out = {}
    for f in sorted(path.rglob("*")):
        rel = f.relative_to(path).as_posix()
        if f.is_file() and not rel.startswith("memories/") and rel != ".lock":
            out[rel] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def _until(job, predicate, timeout: float = 120.0) -> list:  # type: ignore[no-untyped-def]
    """Poll `job` (never blocking long) until predicate(events so far) holds; return the events."""
    seen: list = []
    deadline = time.monotonic() + scaled(timeout)
    while time.monotonic() < deadline:
        seen += job.wait(0.05)
        if predicate(seen):
            return seen
    raise TimeoutError(f"no such event within {timeout} s; got {[e.kind for e in seen]}")


# ------------------------------------------------------------------------------- round trip
def test_worker_round_trip_progress_in_order(client, bank_path, cases) -> None:  # type: ignore[no-untyped-def]
    job = _segment_job(client, bank_path, cases[1].image)
    folder = job.folder
    events = job.wait(scaled(180))
    assert job.outcome == "finished", [(e.kind, e.message) for e in events]
    kinds = [e.kind for e in events]
    assert kinds[-1] == "finished" and kinds[-2] == "diagnostics"
    progress = [(e.done, e.total) for e in events if e.kind == "progress"]
    assert progress == [(i, SHAPE[0]) for i in range(SHAPE[0] + 1)]  # every slice, in order, once
    assert all(e.remaining_s is not None for e in events if e.kind == "progress" and e.done > 0)
    result = job.result
    assert sorted(d["index"] for d in result["slices"]) == list(range(SHAPE[0]))
    assert [d["name"] for d in result["labels"]] == [name for _, (name, _) in sorted(LABELS.items())]
    assert events[-2].result == result["slices"]
    assert not folder.exists()  # inputs and outputs removed with the job
    assert client.alive and client.job is job


def test_worker_result_is_read_before_the_folder_goes(client, bank_path, cases) -> None:  # type: ignore[no-untyped-def]
    """A converter sees the worker's arrays; then the folder is removed."""
    seen = {}

    def convert(result, folder):  # type: ignore[no-untyped-def]
        seen["labelmap"] = wp.load_array(folder, result["labelmap"])
        seen["run"] = (result["precision"], result["batch_size"])
        return "converted"

    folder = client.new_job_folder()
    params = {
        "settings": SETTINGS.to_json(), "bank": str(bank_path), "volume": volume_spec(folder, "volume", cases[1].image),
        "runs": [[1, 3]], "axis": 2, "k": 2, "window": [0.0, 1000.0], "precision": "fp32", "batch_size": 1,
    }
    assert client.run("segment", params, folder, on_result=convert) == "converted"
    labelmap = seen["labelmap"]
    assert labelmap.shape == SHAPE and not labelmap[[0, 3, 4, 5]].any()  # only the run was segmented
    assert seen["run"] == ("fp32", 1)  # the run options reached segment_volume
    assert not folder.exists()


def test_worker_job_errors_reach_the_user(client, tmp_path) -> None:  # type: ignore[no-untyped-def]
    missing = tmp_path / "no-bank"
    with pytest.raises(RuntimeError, match="no-bank"):
        client.run("verify", {"bank": str(missing)})
    # The worker lives on after a failed job.
    assert client.run("load", {"settings": SETTINGS.to_json()})["sam2_identity"].startswith("sam2.1-tiny@256")


def test_worker_suggest_job(client, bank_path, cases, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The slices to annotate next, computed in the worker with the job's bank and last segmentation."""
    from RetrievalSegLib.bank.support_bank import SupportBank
    from RetrievalSegLib.segmentation.provenance import BEYOND_EXTENT, SEGMENTED
    from RetrievalSegLib.segmentation.suggest import Suggestions

    folder = client.new_job_folder()
    status = [SEGMENTED] * 4 + [BEYOND_EXTENT] * 2
    last = {"status": status, "confidence": [0.9, 0.1, 0.9, 0.9, None, None],
            "found_nothing": [True, False, False, False, False, False], "axis": 2}
    job = client.submit("suggest", {
        "settings": SETTINGS.to_json(), "bank": str(bank_path), "volume": volume_spec(folder, "volume", cases[1].image),
        "n": SHAPE[0], "axis": None, "window": [0.0, 1000.0], "case_id": cases[1].case_id, "last": last,
    }, folder, on_result=lambda result, _: Suggestions.from_json(result))
    events = job.wait(scaled(180))
    assert job.outcome == "finished", [(e.kind, e.message) for e in events]
    assert [(e.done, e.total) for e in events if e.kind == "progress"][-1] == (SHAPE[0], SHAPE[0])
    result = job.result
    assert result.axis == 2 and result.n_slices == SHAPE[0] and result.bank_entries == len(SupportBank.open(bank_path))
    assert sorted(s.index for s in result.picks) == list(range(SHAPE[0]))
    assert result.picks[-1].index == 0 and result.picks[-1].empty  # the last run found nothing there
    assert [s.status for s in sorted(result.picks, key=lambda s: s.index)] == status
    assert not folder.exists()
    # A refresh (the panel after an annotation): the worker reuses the volume's DINOv2 embeddings.
    from RetrievalSegLib.segmentation.suggest import REUSED_NOTE

    assert REUSED_NOTE not in result.notes
    folder = client.new_job_folder()
    again = client.run("suggest", {
        "settings": SETTINGS.to_json(), "bank": str(bank_path), "volume": volume_spec(folder, "volume", cases[1].image),
        "n": SHAPE[0], "axis": None, "window": [0.0, 1000.0], "case_id": cases[1].case_id, "last": last,
    }, folder, on_result=lambda result, _: Suggestions.from_json(result))
    assert REUSED_NOTE in again.notes and again.picks == result.picks
    # A bank made with another DINOv2 is refused, with the command that re-embeds it.
    other = SupportBank.create(tmp_path / "other", [LabelInfo(1, "x", (1.0, 0.0, 0.0))], "dinov2-base:sha256-0123456789abcdef@224")
    folder = client.new_job_folder()
    with pytest.raises(RuntimeError, match="rseg bank verify --reembed"):
        client.run("suggest", {"settings": SETTINGS.to_json(), "bank": str(other.path),
                               "volume": volume_spec(folder, "volume", cases[1].image)}, folder)


# ------------------------------------------------------------------------------- cancel and crash
def test_worker_cancel_mid_volume_writes_nothing(client, bank_path, cases) -> None:  # type: ignore[no-untyped-def]
    before = _bank_files(bank_path)
    job = _segment_job(client, bank_path, cases[1].image)
    folder = job.folder
    events = _until(job, lambda evs: any(e.kind == "progress" and e.done >= 1 for e in evs))
    job.cancel()
    events += job.wait(scaled(60))
    assert job.outcome == "cancelled" and job.result is None
    done = max(e.done for e in events if e.kind == "progress")
    assert 1 <= done < SHAPE[0]
    assert "finished" not in [e.kind for e in events] and "diagnostics" not in [e.kind for e in events]
    assert not folder.exists()
    assert _bank_files(bank_path) == before
    assert client.alive  # a cooperative cancel keeps the warm worker


def test_worker_killed_mid_job_clear_error_bank_unchanged_next_job_works(client, bank_path, cases) -> None:  # type: ignore[no-untyped-def]
    before = _bank_files(bank_path)
    job = _segment_job(client, bank_path, cases[1].image)
    _until(job, lambda evs: any(e.kind == "progress" and e.done >= 1 for e in evs))
    pid = client.worker_pid
    assert pid is not None and pid not in (os.getpid(), client.process.pid)  # the launcher's child
    os.kill(pid, signal.SIGKILL)
    events = job.wait(scaled(30))
    assert job.outcome == "failed"
    message = events[-1].message
    # The launcher turns the signal into exit code 1: the message says what that means, not "exit code 1".
    assert "stopped unexpectedly" in message and "crashed or killed" in message and str(client.log_path) in message
    assert "exit abnormally" in events[-1].traceback  # the launcher's own line, from the log
    assert isinstance(job.error, WorkerError)
    assert _bank_files(bank_path) == before
    assert not client.alive
    # The next action starts a new worker and works.
    again = _segment_job(client, bank_path, cases[1].image)
    again.wait(scaled(180))
    assert again.outcome == "finished" and client.worker_pid not in (None, pid)


def test_worker_cancel_that_is_ignored_kills_after_the_grace_time(tmp_path) -> None:
    """A job that does not stop (here: a stuck fake worker) is killed after cancel_grace_s."""
    fake = tmp_path / "fake-python"
    fake.write_text("#!/bin/sh\nexec sleep 60\n")
    fake.chmod(0o755)
    c = WorkerClient(python=str(fake), log_dir=tmp_path, cancel_grace_s=0.5)
    job = c.submit("load", {"settings": SETTINGS.to_json()})
    job.cancel()
    t0 = time.monotonic()
    events = job.wait(20)
    assert job.outcome == "cancelled" and "stopped by force" in events[-1].message
    assert time.monotonic() - t0 < 10 and not c.alive


# ------------------------------------------------------------------------------- protocol
def test_worker_malformed_message_from_the_parent_is_reported_not_fatal(client) -> None:  # type: ignore[no-untyped-def]
    errors_before = len(client.protocol_errors)
    client.send_raw(b"this is not json\n")
    client.send_raw(b'{"type": "explode"}\n')
    deadline = time.monotonic() + scaled(30)
    while len(client.protocol_errors) < errors_before + 2 and time.monotonic() < deadline:
        client.pump(block_s=0.05)
    new = client.protocol_errors[errors_before:]
    assert len(new) == 2 and "not JSON" in new[0] and "unknown message type 'explode'" in new[1]
    # A job with a bad kind or bad params fails with a message; the worker keeps serving.
    bad = client.submit("load", {"settings": {"sam2_size": "tiny", "colour": "red"}})
    bad.wait(scaled(60))
    assert bad.outcome == "failed" and "unknown engine settings ['colour']" in str(bad.error)
    assert client.run("load", {"settings": SETTINGS.to_json()})["dinov2_identity"].startswith("dinov2-small")


def test_worker_malformed_message_from_the_worker_fails_the_job_without_hanging(tmp_path) -> None:
    fake = tmp_path / "fake-python"
    fake.write_text("#!/bin/sh\necho 'garbage {'\nexec sleep 60\n")
    fake.chmod(0o755)
    c = WorkerClient(python=str(fake), log_dir=tmp_path)
    job = c.submit("load", {"settings": SETTINGS.to_json()})
    t0 = time.monotonic()
    events = job.wait(20)
    assert job.outcome == "failed" and time.monotonic() - t0 < 10
    assert "malformed message" in events[-1].message and "not JSON" in events[-1].message
    assert not c.alive  # a worker that breaks the protocol is stopped


def test_worker_survives_a_line_nested_too_deeply_for_the_parser(client) -> None:  # type: ignore[no-untyped-def]
    """`[` x 200000 makes json recurse past Python's limit: a protocol error, and the worker still reads."""
    errors_before = len(client.protocol_errors)
    client.send_raw(b"[" * 200_000 + b"\n")
    client.send_raw(b'{"type": "still-listening"}\n')
    deadline = time.monotonic() + scaled(30)
    while len(client.protocol_errors) < errors_before + 2 and time.monotonic() < deadline:
        client.pump(block_s=0.05)
    new = client.protocol_errors[errors_before:]
    assert len(new) == 2, f"the worker went deaf after the nested line: {new}"
    assert "nested too deeply" in new[0] and "'still-listening'" in new[1]
    assert client.run("load", {"settings": SETTINGS.to_json()}, timeout=scaled(120))["dinov2_identity"].startswith("dinov2-small")


def test_worker_reports_an_overlong_line_before_its_end_arrives(client) -> None:  # type: ignore[no-untyped-def]
    """A line past MAX_LINE_BYTES is refused once the bound is passed, not buffered until its newline."""
    errors_before = len(client.protocol_errors)
    client.send_raw(b"x" * (wp.MAX_LINE_BYTES + 4096))  # no newline yet
    deadline = time.monotonic() + scaled(30)
    while len(client.protocol_errors) == errors_before and time.monotonic() < deadline:
        client.pump(block_s=0.05)
    new = client.protocol_errors[errors_before:]
    assert len(new) == 1 and f"longer than {wp.MAX_LINE_BYTES} bytes" in new[0]
    client.send_raw(b"y" * 1000 + b'\n{"type": "explode"}\n')  # the rest of the long line is dropped
    deadline = time.monotonic() + scaled(30)
    while len(client.protocol_errors) < errors_before + 2 and time.monotonic() < deadline:
        client.pump(block_s=0.05)
    assert len(client.protocol_errors) == errors_before + 2 and "'explode'" in client.protocol_errors[-1]
    assert client.alive


def test_decode_turns_every_failure_into_a_protocol_error() -> None:
    for line in (b"\xff\xfe", b"[" * 100_000, b"1" * 5000, b"[1, 2]", b'{"type": 3}', b"{", "\ud800"):
        with pytest.raises(wp.ProtocolError):
            wp.decode(line, wp.TO_WORKER)


def test_worker_refuses_arrays_that_need_pickle(client, bank_path, tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="Python objects"):
        wp.save_array(tmp_path, "objects", np.array([{"a": 1}], dtype=object))
    folder = client.new_job_folder()
    np.save(folder / "volume.npy", np.array([[[1]]], dtype=object), allow_pickle=True)
    job = client.submit("segment", {
        "settings": SETTINGS.to_json(), "bank": str(bank_path),
        "volume": {"array": "volume.npy", "spacing": [1, 1, 1], "origin": [0, 0, 0], "direction": [1, 0, 0, 0, 1, 0, 0, 0, 1]},
        "runs": [[0, 1]], "axis": 2, "k": 1,
    }, folder)
    job.wait(scaled(60))
    assert job.outcome == "failed" and "cannot be read without pickle" in str(job.error)
    with pytest.raises(wp.ProtocolError, match="inside the job folder"):
        wp.load_array(tmp_path, "../elsewhere.npy")


def test_worker_run_timeout_cancels_and_the_client_takes_the_next_job(tmp_path, slicer_launcher) -> None:  # type: ignore[no-untyped-def]
    """A job past its time limit is cancelled (killed when it ignores the cancel); the next job is accepted."""
    from _launcher import make_launcher

    fake = _deaf_worker(tmp_path)
    c = WorkerClient(python=str(make_launcher(tmp_path, python=fake)), log_dir=tmp_path, cancel_grace_s=0.5)
    try:
        with pytest.raises(TimeoutError, match="cancelled"):
            c.run("load", {"settings": SETTINGS.to_json()}, timeout=1.0)
        assert c.job is not None and c.job.outcome == "cancelled"
        pid = int((tmp_path / "deaf.pid").read_text())
        assert not running(pid), "the timed-out worker is still running"
        job = c.submit("load", {"settings": SETTINGS.to_json()})  # not "still running"
        assert job.running
    finally:
        c.kill()
        c._reap()


def _deaf_worker(folder: Path) -> Path:
    """A 'python' that says ready (with its pid) and then ignores everything, even cancel."""
    fake = folder / "deaf-python"
    fake.write_text(f"#!{sys.executable}\n" + textwrap.dedent(f"""
        import json, os, sys, time
        open({str(folder / "deaf.pid")!r}, "w").write(str(os.getpid()))
        sys.stdout.write(json.dumps({{"type": "ready", "pid": os.getpid(), **{READY!r}}}) + "\\n")
        sys.stdout.flush()
        time.sleep(120)
    """))
    fake.chmod(0o755)
    return fake


def test_worker_protocol_has_no_pickle() -> None:
    for name in ("worker/server.py", "worker/client.py", "worker/protocol.py", "slicer_logic/logic.py", "slicer_logic/results.py"):
        source = (LIB / name).read_text(encoding="utf-8")
        for forbidden in ("import pickle", "multiprocessing", "allow_pickle=True", "torch.load("):
            assert forbidden not in source, f"{name} uses {forbidden}"
    # Every message is JSON: a non-JSON value cannot be sent.
    with pytest.raises(TypeError):
        wp.encode({"type": "job", "params": {"x": object()}})


# ------------------------------------------------------------------------------- lifetime
def test_worker_exits_when_its_parent_dies(tmp_path, slicer_launcher) -> None:  # type: ignore[no-untyped-def]
    """Slicer (here a script) dies; the worker, a child of the launcher, notices its pid is gone."""
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(LIB.parent)!r})
        from RetrievalSegLib.worker.client import WorkerClient
        import subprocess
        c = WorkerClient({str(slicer_launcher)!r}, log_dir={str(tmp_path)!r})
        c.start()
        while c.worker_pid is None:
            c.pump(block_s=0.1)
        # A grandchild keeps the worker's stdin open, so only the parent-pid watch can notice.
        fd = c.process.stdin.fileno()
        holder = subprocess.Popen(["sleep", "120"], pass_fds=[fd])
        print(c.worker_pid, holder.pid, flush=True)
        time.sleep(120)
    """))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE)
    assert parent.stdout is not None
    worker_pid, holder_pid = (int(x) for x in parent.stdout.readline().split())
    try:
        time.sleep(1.5)  # several parent checks: the living parent is seen as alive
        assert running(worker_pid), "the worker left while its parent was alive"
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 20
        while running(worker_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not running(worker_pid), "the worker outlived its parent"
    finally:
        os.kill(holder_pid, signal.SIGKILL)


def test_worker_exits_when_its_stdin_closes(tmp_path, slicer_launcher) -> None:  # type: ignore[no-untyped-def]
    c = WorkerClient(python=str(slicer_launcher), log_dir=tmp_path)
    c.start()
    assert c.process is not None and c.process.stdin is not None
    c.process.stdin.close()
    assert c.process.wait(20) == 0
    assert "worker exiting: eof" in Path(c.log_path).read_text()
    c.stop()


def test_worker_idle_timeout_then_the_next_job_starts_a_new_worker(tmp_path, slicer_launcher) -> None:  # type: ignore[no-untyped-def]
    c = WorkerClient(python=str(slicer_launcher), log_dir=tmp_path, idle_timeout_s=0.5)
    try:
        c.start()
        first = c.process.pid
        deadline = time.monotonic() + 20
        while c.alive and time.monotonic() < deadline:
            c.pump(block_s=0.1)
        assert not c.alive and c._exit_reason == "idle"  # reaped; its reason was read
        assert "worker exiting: idle" in Path(c.log_path).read_text()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            job = c.submit("verify", {"bank": str(tmp_path / "none")})
        job.wait(scaled(60))
        assert job.outcome == "failed" and "none" in str(job.error)  # answered by a new worker
        assert c.process is not None and c.process.pid != first
    finally:
        c.stop()
