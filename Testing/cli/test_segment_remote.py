"""`rseg segment` / `rseg suggest` with `--worker ssh://...`: the same output as a local run, through a real sshd."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from _small_world import bank_through_worker
from _sshd import remote_python, start_or_skip
from RetrievalSegLib.cli.main import main
from RetrievalSegLib.data.synthetic import LABELS, make_synthetic_study
from RetrievalSegLib.data.volume import read_volume, write_volume
from RetrievalSegLib.segmentation.provenance import read_sidecar
from RetrievalSegLib.worker import protocol as wp
from RetrievalSegLib.worker.client import WorkerClient

FAST = ["--random-weights", "--image-size", "256", "--device", "cpu"]
SETTINGS = wp.EngineSettings(device="cpu", image_size=256, random_weights=True)
REMOTE_PYTHON = remote_python()


def test_segment_worker_usage_errors(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    image = tmp_path / "img.nii.gz"
    write_volume(make_synthetic_study(1, shape=(4, 16, 16))[0].image, image)
    base = ["segment", str(image), "--out", str(tmp_path / "o.nii.gz"), *FAST]
    for extra, text in ((["--bank", "/srv/b", "--worker", "ssh://-oProxyCommand=x"], "not a worker host"),
                        (["--bank", "relative/bank", "--worker", "gpu"], "absolute or as ~/"),
                        (["--bank", "/srv/b", "--worker", "gpu", "--compile"], "--compile cannot be used with --worker")):
        assert main(base + extra) == 2
        assert text in capsys.readouterr().err
    assert main(["suggest", str(image), "--bank", "bank", "--worker", "gpu", *FAST]) == 2
    assert "absolute or as ~/" in capsys.readouterr().err


@pytest.mark.slow  # ~95 s on 2 shared cores: two model loads and a remote worker start
def test_segment_on_a_worker_over_ssh_equals_the_local_run(tmp_path, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    sshd = start_or_skip(tmp_path / "sshd")
    try:
        monkeypatch.setenv("RSEG_SSH_OPTIONS", " ".join(sshd.ssh_options()))
        cases = make_synthetic_study(2, shape=(5, 40, 36), spacing=(1.3, 1.3, 6.0), seed=11)
        bank = tmp_path / "server" / "bank"
        client = WorkerClient(target=sshd.target, ssh_options=sshd.ssh_options(), log_dir=tmp_path)
        client.target = type(client.target).parse(sshd.target, REMOTE_PYTHON)
        bank_through_worker(client, bank, cases[0], SETTINGS, timeout=300)
        client.stop()
        image = tmp_path / "test.nii.gz"
        write_volume(cases[1].image, image)
        local, remote = tmp_path / "local.nii.gz", tmp_path / "remote.nii.gz"
        assert main(["segment", str(image), "--bank", str(bank), "--out", str(local), "--k", "1", "--json", *FAST]) == 0
        capsys.readouterr()
        rc = main(["segment", str(image), "--bank", str(bank), "--out", str(remote), "--k", "1", "--json", *FAST,
                   "--worker", sshd.target, "--worker-python", REMOTE_PYTHON])
        out = capsys.readouterr()
        assert rc == 0, out.err
        summary = json.loads(out.out)
        assert summary["worker"] == sshd.target and summary["outputs"] == [str(remote)]
        a, b = read_volume(local), read_volume(remote)
        assert b.same_geometry(a, tol=0) and a.array.dtype == b.array.dtype
        assert np.array_equal(a.array, b.array)  # bit for bit
        doc = read_sidecar(remote)
        assert doc["provenance"]["worker"] == sshd.target and doc["provenance"]["bank"]["path"] == str(bank)
        assert read_sidecar(local)["slices"] == doc["slices"]
        # rseg suggest --worker: the same picks as a local run.
        suggest = ["suggest", str(image), "--bank", str(bank), "--n", "2", "--json", "--seg", str(local), *FAST]
        assert main(suggest) == 0
        here = json.loads(capsys.readouterr().out)
        assert main(suggest + ["--worker", sshd.target, "--worker-python", REMOTE_PYTHON]) == 0
        there = json.loads(capsys.readouterr().out)
        assert there.pop("worker") == sshd.target and there == here

        # --statistics, --keep-largest (made here from the returned label map) and --save-probabilities
        # (returned with it): the same files and numbers as a local run.
        worker = ["--worker", sshd.target, "--worker-python", REMOTE_PYTHON]
        post = ["--k", "1", "--json", "--statistics", "--keep-largest", "all", "--save-probabilities", *FAST]
        local2, remote2 = tmp_path / "post-local" / "s.nii.gz", tmp_path / "post-remote" / "s.nii.gz"
        local2.parent.mkdir()
        remote2.parent.mkdir()
        assert main(["segment", str(image), "--bank", str(bank), "--out", str(local2), *post]) == 0
        here = json.loads(capsys.readouterr().out)
        assert main(["segment", str(image), "--bank", str(bank), "--out", str(remote2), *post, *worker]) == 0
        there = json.loads(capsys.readouterr().out)
        assert there["statistics"] == here["statistics"] and there["keep_largest"] == here["keep_largest"]
        assert np.array_equal(read_volume(local2).array, read_volume(remote2).array)
        names = sorted(p.name for p in local2.parent.glob("s.prob-*.nii.gz"))
        assert len(names) == len(LABELS) and names == sorted(p.name for p in remote2.parent.glob("s.prob-*.nii.gz"))
        assert [Path(p).name for p in there["probabilities"]] == [Path(p).name for p in here["probabilities"]]
        for name in names:
            a, b = read_volume(local2.parent / name), read_volume(remote2.parent / name)
            assert b.same_geometry(a, tol=0) and a.array.dtype == b.array.dtype == np.float32
            assert np.array_equal(a.array, b.array)  # bit for bit
        assert read_sidecar(remote2)["provenance"]["statistics"] == here["statistics"]
        # The bank's usage errors, from the worker's description of it, before the models load.
        assert main(["segment", str(image), "--bank", str(bank), "--out", str(tmp_path / "x.nii.gz"), *FAST,
                     "--keep-largest", "9", *worker]) == 2
        assert "--keep-largest 9: not among the labels segmented" in capsys.readouterr().err
        assert not (tmp_path / "x.nii.gz").exists()
    finally:
        sshd.stop()
