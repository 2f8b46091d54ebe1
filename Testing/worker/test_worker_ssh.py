"""The model worker on another host, through a real OpenSSH sshd on 127.0.0.1.

A bank created by a job through ssh, a segmentation that equals the local worker's bit for bit,
a cancel, a connection killed mid-job that leaves no worker process (its real pid), the next job
reconnecting, an unknown host key refused with a message saying how to accept it, and the exact
version message. Skipped only where sshd is absent and this is not CI ($CI or $RSEG_REQUIRE_SSHD, which `.ci/run` sets;
it installs Debian's openssh-server).
The arrays of every job travel in the protocol (`worker.protocol` frames), checked here too.
"""
from __future__ import annotations

import os
import signal
import sys
import textwrap
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from _launcher import running, wait_gone
from _sshd import Sshd, remote_python, start_or_skip
from RetrievalSegLib import __version__
from RetrievalSegLib.bank.support_bank import LabelInfo, SupportBank
from RetrievalSegLib.data.synthetic import LABELS, make_synthetic_study
from RetrievalSegLib.worker import protocol as wp
from RetrievalSegLib.worker.client import WorkerClient, labels_json, volume_spec
from RetrievalSegLib.worker.remote import SSH_OPTIONS, SshTarget

SETTINGS = wp.EngineSettings(device="cpu", image_size=256, random_weights=True)
SHAPE = (6, 48, 48)
SPACING = (1.2, 1.0, 5.0)
REMOTE_PYTHON = remote_python()


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):  # type: ignore[no-untyped-def]
    server = start_or_skip(tmp_path_factory.mktemp("sshd"))
    yield server
    server.stop()


def _client(sshd: Sshd, folder: Path, **kwargs) -> WorkerClient:  # type: ignore[no-untyped-def]
    known = kwargs.pop("known_hosts", None)
    target = SshTarget.parse(sshd.target, kwargs.pop("python", REMOTE_PYTHON))
    return WorkerClient(target=target, ssh_options=sshd.ssh_options(known), log_dir=folder, **kwargs)


@pytest.fixture(scope="module")
def remote(sshd, tmp_path_factory):  # type: ignore[no-untyped-def]
    client = _client(sshd, tmp_path_factory.mktemp("ssh-logs"), cancel_grace_s=30.0)
    yield client
    client.stop()


@pytest.fixture(scope="module")
def cases():  # type: ignore[no-untyped-def]
    return make_synthetic_study(n_cases=2, shape=SHAPE, spacing=SPACING, seed=7)


@pytest.fixture(scope="module")
def remote_bank(remote, cases, tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    """A bank created and filled through ssh (its path is taken on the server; here the same disk)."""
    path = tmp_path_factory.mktemp("server") / "bank"
    labels = [LabelInfo(v, name, rgb) for v, (name, rgb) in sorted(LABELS.items())]
    assert remote.run("create_bank", {"settings": SETTINGS.to_json(), "bank": str(path),
                                      "labels": labels_json(labels)}, timeout=300) == {"bank": str(path)}
    folder = remote.new_job_folder()
    added = remote.run("add_volume", {
        "settings": SETTINGS.to_json(), "bank": str(path), "volume": volume_spec(folder, "volume", cases[0].image),
        "labelmap": wp.save_array(folder, "labels", cases[0].labels.array), "case_id": cases[0].case_id,
        "axis": None, "window": [0.0, 1000.0],
    }, folder=folder, timeout=300)
    assert len(added["entries"]) >= 3
    return path


def _segment(client: WorkerClient, bank: Path, volume, timeout: float = 300):  # type: ignore[no-untyped-def]
    folder = client.new_job_folder()
    params = {"settings": SETTINGS.to_json(), "bank": str(bank), "volume": volume_spec(folder, "volume", volume),
              "runs": [[0, SHAPE[0]]], "axis": 2, "k": 2, "window": [0.0, 1000.0]}
    return client.run("segment", params, folder, on_result=lambda r, f: wp.load_array(f, r["labelmap"]),
                      timeout=timeout)


# ------------------------------------------------------------------------------- through sshd
def test_bank_created_over_ssh_and_segmentation_equals_the_local_worker(remote, remote_bank, cases,
                                                                         worker_client) -> None:  # type: ignore[no-untyped-def]
    bank = SupportBank.open(remote_bank)  # the bank the server's worker wrote
    assert len(bank.entries()) >= 3
    assert remote.target is not None and remote.remote_pid is not None and remote.worker_pid is None
    assert remote.compress  # arrays are compressed over ssh by default
    over_ssh = _segment(remote, remote_bank, cases[1].image)
    local = _segment(worker_client, remote_bank, cases[1].image)
    assert over_ssh.dtype == local.dtype and over_ssh.shape == local.shape == SHAPE
    assert over_ssh.tobytes() == local.tobytes()  # bit for bit
    assert over_ssh.any()


def test_cancel_over_ssh(remote, remote_bank, cases) -> None:  # type: ignore[no-untyped-def]
    folder = remote.new_job_folder()
    job = remote.submit("segment", {
        "settings": SETTINGS.to_json(), "bank": str(remote_bank), "volume": volume_spec(folder, "volume", cases[1].image),
        "runs": [[0, SHAPE[0]]], "axis": 2, "k": 2, "window": [0.0, 1000.0]}, folder)
    job.cancel()
    job.wait(120)
    assert job.outcome == "cancelled", job.error
    assert remote.alive  # a cooperative cancel keeps the connection and the warm worker


def test_killed_connection_fails_the_job_leaves_no_worker_and_the_next_job_reconnects(
        sshd, remote_bank, cases, tmp_path) -> None:  # type: ignore[no-untyped-def]
    client = _client(sshd, tmp_path)
    try:
        big = make_synthetic_study(n_cases=1, shape=(40, 48, 48), spacing=SPACING, seed=3)[0].image
        folder = client.new_job_folder()
        job = client.submit("segment", {
            "settings": SETTINGS.to_json(), "bank": str(remote_bank), "volume": volume_spec(folder, "volume", big),
            "runs": [[0, 40]], "axis": 2, "k": 2, "window": [0.0, 1000.0]}, folder)
        deadline = time.monotonic() + 300
        while not job.started and job.running and time.monotonic() < deadline:
            job.wait(0.1)
        assert job.started and job.running, client.log_tail()
        pid = client.remote_pid  # the real worker (sshd's host is this machine, so its pid is visible here)
        assert pid is not None and running(pid)
        assert client.process is not None
        os.kill(client.process.pid, signal.SIGKILL)  # the connection drops (ssh dies), not the worker
        job.wait(30)
        assert job.outcome == "failed"
        assert f"the worker ran on {client.target}" in str(job.error)
        assert wait_gone(pid, 60), "the worker is still running on the server after its connection dropped"
        # The next job connects again.
        assert client.run("load", {"settings": SETTINGS.to_json()}, timeout=300)["dinov2_identity"]
        assert client.remote_pid not in (None, pid)
    finally:
        client.stop()


def test_unknown_host_key_is_refused_with_how_to_accept_it(sshd, tmp_path) -> None:  # type: ignore[no-untyped-def]
    client = _client(sshd, tmp_path, known_hosts=sshd.empty_known_hosts)
    job = client.submit("load", {"settings": SETTINGS.to_json()})
    job.wait(60)
    assert job.outcome == "failed"
    text = str(job.error)
    assert "host key of" in text and "is not known" in text and "never accepts one silently" in text, text
    assert f"ssh -p {sshd.port} {sshd.user}@127.0.0.1 true" in text
    assert sshd.empty_known_hosts.read_text() == ""  # nothing was accepted
    client.stop()


def test_another_version_on_the_server_is_refused_with_what_to_install(sshd, tmp_path) -> None:  # type: ignore[no-untyped-def]
    fake = tmp_path / "old-python"
    fake.write_text(f"#!{sys.executable}\n" + textwrap.dedent("""
        import json, os, sys, time
        sys.stdout.write(json.dumps({"type": "ready", "pid": os.getpid(), "protocol": PROTOCOL, "version": "0.0.1"}) + "\\n")
        sys.stdout.flush()
        sys.stdin.read()
    """).replace("PROTOCOL", str(wp.PROTOCOL_VERSION)))
    fake.chmod(0o755)
    client = _client(sshd, tmp_path, python=str(fake))
    job = client.submit("load", {"settings": SETTINGS.to_json()})
    job.wait(60)
    assert job.outcome == "failed"
    assert str(job.error) == (
        f"the worker on {client.target} runs RetrievalSeg 0.0.1 (protocol {wp.PROTOCOL_VERSION}), this client RetrievalSeg {__version__} "
        f"(protocol {wp.PROTOCOL_VERSION}); install the same version there: "
        f"`{fake} -m pip install retrievalseg=={__version__}`")
    client.stop()


# ------------------------------------------------------------------------------- no sshd needed
def test_ssh_command_is_strict_and_never_prompts() -> None:
    t = SshTarget.parse("ssh://alice@gpu.example.org:2222", "/opt/rseg/bin/python")
    cmd = t.command(60.0, options=["-i", "key"])
    assert cmd[:len(SSH_OPTIONS) + 1] == ["ssh", *SSH_OPTIONS]
    assert "StrictHostKeyChecking=yes" in cmd and "BatchMode=yes" in cmd and "-T" in cmd
    assert cmd[-3:-1] == ["--", "alice@gpu.example.org"] and cmd[cmd.index("-p") + 1] == "2222"
    assert cmd[-1] == "cd / && exec /opt/rseg/bin/python -m RetrievalSegLib.worker --idle-timeout 60.0"
    assert SshTarget.parse("gpu").destination == "gpu" and SshTarget.parse("bob@gpu").port is None
    for bad in ("-oProxyCommand=evil", "ssh://-x@host", "a@b@c", "host:99999", "ho st", ""):
        with pytest.raises(ValueError):
            SshTarget.parse(bad)


def test_array_frames_round_trip_and_refuse_before_allocating() -> None:
    arr = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    for compress in (False, True):
        frame = wp.array_frame("j", "a.npy", wp.npy_bytes(arr), compress)
        reader = wp.FrameReader(wp.FROM_WORKER)
        for i in range(0, len(frame), 7):  # arrives in pieces
            reader.feed(frame[i:i + 7])
        reader.feed(wp.encode({"type": "exit", "reason": "eof"}))
        (msg, end) = reader.messages()
        assert msg["name"] == "a.npy" and np.array_equal(msg["array"], arr) and msg["array"].dtype == arr.dtype
        assert end["type"] == "exit"
    # A frame that announces more than the limit is refused from its header alone.
    with pytest.raises(wp.FrameTooLong, match="larger than the limit"):
        wp.array_frame_size({"bytes": 1001}, limit=1000)
    assert wp.array_frame_size({"bytes": 1000}, limit=1000) == 1000
    reader = wp.FrameReader(wp.FROM_WORKER, array_limit=1000)
    reader.feed(wp.encode({"type": "array", "id": "j", "name": "a.npy", "bytes": 10 ** 12, "encoding": "npy"}))
    with pytest.raises(wp.FrameTooLong):
        reader.messages()
    # A small zlib payload that inflates past the limit stops at the limit.
    bomb = zlib.compress(b"\0" * 10_000_000)
    with pytest.raises(wp.FrameTooLong, match="decompresses"):
        wp.array_from_frame({"name": "a.npy", "encoding": "npy+zlib"}, bomb, limit=100_000)
    # An object array, a header that lies about its size, a name with a folder: refused.
    obj = np.lib.format.magic(1, 0) + b"x"
    with pytest.raises(wp.ProtocolError):
        wp.array_from_frame({"name": "a.npy", "encoding": "npy"}, obj)
    with pytest.raises(wp.ProtocolError, match="do not hold"):
        wp.array_from_frame({"name": "a.npy", "encoding": "npy"}, wp.npy_bytes(arr)[:-2])
    with pytest.raises(wp.ProtocolError, match="plain .npy"):
        wp.array_frame("j", "../a.npy", wp.npy_bytes(arr))
