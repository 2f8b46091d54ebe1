"""`rseg segment-cohort --worker ssh://...`: every volume's job on a worker on another host.

The options' plumbing is checked fast (usage errors before anything connects; the bank is asked of
the worker, never opened here). Through a real sshd on 127.0.0.1 (slow: a local cohort worker and
a remote one load the models): the outputs equal a local run's bit for bit, with sidecars that name
the worker; the same command again skips every volume (resume), and so does a remote run over a
local run's outputs (the same identity).
"""
from __future__ import annotations

import csv
import json
import shlex
from pathlib import Path

import numpy as np
import pytest

from _small_world import bank_through_worker
from _sshd import _free_port, remote_python, start_or_skip
from RetrievalSegLib.cli.main import main
from RetrievalSegLib.cohort.volume_job import read_record
from RetrievalSegLib.data.synthetic import make_synthetic_study
from RetrievalSegLib.data.volume import read_volume, write_volume
from RetrievalSegLib.segmentation.provenance import read_sidecar
from RetrievalSegLib.worker import protocol as wp

FAST = ["--random-weights", "--image-size", "256", "--device", "cpu", "--no-progress"]
SETTINGS = wp.EngineSettings(device="cpu", image_size=256, random_weights=True)
REMOTE_PYTHON = remote_python()


def _manifest(tmp_path: Path, n: int = 2) -> tuple[Path, list]:
    cases = make_synthetic_study(n + 1, shape=(4, 40, 36), spacing=(1.3, 1.3, 6.0), seed=5)
    rows = []
    for case in cases[1:]:
        image = tmp_path / "images" / f"{case.case_id}.nii.gz"
        image.parent.mkdir(exist_ok=True)
        write_volume(case.image, image)
        rows.append([str(image), case.case_id])
    manifest = tmp_path / "cohort.csv"
    with open(manifest, "w", newline="") as f:
        csv.writer(f).writerows([["image", "case_id"], *rows])
    return manifest, cases


def test_cohort_worker_usage_errors_before_anything_connects(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    base = ["segment-cohort", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "out"), *FAST]
    for extra, text in (
            (["--bank", "/srv/b", "--worker", "ssh://-oProxyCommand=x"], "not a worker host"),
            (["--bank", "relative/bank", "--worker", "gpu"], "absolute or as ~/"),
            (["--bank", "/srv/b", "--worker", "gpu", "--report"], "--report cannot be used with --worker"),
            (["--bank", "/srv/b", "--worker", "gpu", "--batch", "4"], "--batch cannot be used with --worker"),
            (["--bank", "/srv/b", "--worker", "gpu", "--ray", "local", "--cache-dir", "c"],
             "--ray, --cache-dir cannot be used with --worker"),
            (["--bank", "/srv/b", "--worker", "gpu", "--workers", "2"], "--workers cannot be used with --worker")):
        assert main(base + extra) == 2
        assert text in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cohort_worker_asks_the_worker_for_the_bank(tmp_path, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A bank at the same path here is not opened: the worker's host is asked (here: nobody listens)."""
    manifest, cases = _manifest(tmp_path, n=1)
    bank = tmp_path / "bank"  # exists here (a bank made on this computer): must not be used
    from _bank_helpers import LABELS as BANK_LABELS, HashEmbedder
    from RetrievalSegLib.bank.support_bank import SupportBank

    SupportBank.create(bank, BANK_LABELS, HashEmbedder().identity)
    known = tmp_path / "known_hosts"
    known.write_text("")
    monkeypatch.setenv("RSEG_SSH_OPTIONS", shlex.join(["-F", "/dev/null", "-o", f"UserKnownHostsFile={known}",
                                                       "-o", "ConnectTimeout=5"]))
    port = _free_port()  # closed: the connection is refused at once
    rc = main(["segment-cohort", str(manifest), "--bank", str(bank), "--out", str(tmp_path / "out"), *FAST,
               "--worker", f"ssh://nobody@127.0.0.1:{port}"])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert f"ssh://nobody@127.0.0.1:{port}" in err and "Could not connect to the worker" in err
    assert not (tmp_path / "out").exists()  # nothing was written


@pytest.fixture()
def server_bank(tmp_path, worker_client):  # type: ignore[no-untyped-def]
    cases = make_synthetic_study(1, shape=(4, 40, 36), spacing=(1.3, 1.3, 6.0), seed=5)
    path = tmp_path / "server" / "bank"
    bank_through_worker(worker_client, path, cases[0], SETTINGS)
    return path


@pytest.mark.slow  # ~60-90 s on 2 shared cores: a local cohort worker and a remote worker load the models
def test_cohort_on_a_worker_over_ssh_equals_the_local_run_and_resumes(tmp_path, capsys, monkeypatch,
                                                                      server_bank) -> None:  # type: ignore[no-untyped-def]
    sshd = start_or_skip(tmp_path / "sshd")
    try:
        monkeypatch.setenv("RSEG_SSH_OPTIONS", shlex.join(sshd.ssh_options()))
        manifest, cases = _manifest(tmp_path)
        common = ["segment-cohort", str(manifest), "--bank", str(server_bank), "--k", "1", "--json", *FAST]
        remote = ["--worker", sshd.target, "--worker-python", REMOTE_PYTHON]
        out_l, out_r = tmp_path / "local", tmp_path / "remote"
        rc = main([*common, "--out", str(out_r), *remote])
        out = capsys.readouterr()
        assert rc == 0, out.err
        summary = json.loads(out.out)
        assert summary["worker"] == sshd.target and summary["segmented"] == 2
        assert main([*common, "--out", str(out_l)]) == 0
        capsys.readouterr()
        for case in cases[1:]:
            name = f"{case.case_id}.nii.gz"
            a, b = read_volume(out_l / name), read_volume(out_r / name)
            assert b.same_geometry(a, tol=0) and a.array.dtype == b.array.dtype
            assert a.array.any() and np.array_equal(a.array, b.array)  # bit for bit
            doc = read_sidecar(out_r / name)
            assert doc["provenance"]["worker"] == sshd.target
            assert doc["provenance"]["bank"]["path"] == str(server_bank)
            assert doc["slices"] == read_sidecar(out_l / name)["slices"]
            record = read_record(out_r, case.case_id)
            assert record["state"] == "done"
        for folder in (out_r, out_l):  # resume: the same identity, wherever the models ran
            assert main([*common, "--out", str(folder), *remote]) == 0
            again = json.loads(capsys.readouterr().out)
            assert again["skipped"] == 2 and again["segmented"] == 0, again

        # The bank changes on the server after the run began (the worker segments from a newer
        # revision than the run's identity names): every volume fails, nothing is written.
        import RetrievalSegLib.cli.remote as cli_remote

        described = cli_remote.cohort_remote_bank

        def older(client, args):  # type: ignore[no-untyped-def]
            bank = described(client, args)
            bank.revision -= 1
            return bank

        monkeypatch.setattr(cli_remote, "cohort_remote_bank", older)
        out_x = tmp_path / "changed"
        assert main([*common, "--out", str(out_x), *remote]) == 1
        changed = json.loads(capsys.readouterr().out)
        assert changed["failed"] == 2 and all("changed during the cohort run" in r["message"] for r in changed["results"])
        assert not list(out_x.glob("*.nii.gz"))
    finally:
        sshd.stop()
