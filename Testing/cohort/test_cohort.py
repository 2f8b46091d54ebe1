"""`rseg segment-cohort`: many volumes, several workers, shards, resume, Ray (random weights, tiny sizes).

Scenario (module fixture): a bank from two synthetic cases; a cohort of 6 synthetic volumes, one of
them longer (12 slices) so that a worker can be killed in the middle of it, plus one corrupt file.
Run 1 (one worker) is killed on the long volume once its progress record shows slices done; run 2
(the same command) must complete exactly that volume. Its outputs are the reference the other
runs (two workers, three shards, Ray) must reproduce byte for byte in their label maps.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from RetrievalSegLib.cli.main import main
from RetrievalSegLib.cohort.volume_job import (
    CohortVolume,
    ReadOnlyBank,
    ManifestError,
    cohort_memory_dir,
    parse_shard,
    read_manifest,
    record_path,
    select_shard,
)
from RetrievalSegLib.data.fileio import TMP_PREFIX
from RetrievalSegLib.data.synthetic import make_synthetic_study
from RetrievalSegLib.data.volume import Volume, read_volume, write_volume

MODELS = ["--random-weights", "--image-size", "256", "--dinov2-input-size", "56", "--device", "cpu"]
SEG = ["--k", "2", "--extent-stop", "0", "--batch-size", "2", "--batch", "2"]
GOOD = [f"vol{i}" for i in range(6)]
LONG = "vol1"  # the one a worker is killed on
LONG_SLICES = 8
BROKEN = "broken"


def _tree_digest(folder: Path) -> dict[str, str]:
    """Every file of the bank, byte for byte, except SQLite's transient -wal/-shm files: they come and
    go with connections (the last one to close removes them), while the revision lives in bank.db."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.endswith(("-wal", "-shm"))}


def _labelmaps(out: Path, cases=GOOD) -> dict[str, np.ndarray]:
    return {c: read_volume(out / f"{c}.nii.gz").array for c in cases}


def _cohort_cmd(manifest: Path, bank: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "RetrievalSegLib.cli", "segment-cohort", str(manifest), "--bank", str(bank),
            "--out", str(out), "--cache-dir", str(cache), *MODELS, *SEG, "--json", "--no-progress", *extra]


def _summary(stdout: str) -> dict:
    return json.loads(stdout[stdout.index("{"):])


def _status(summary: dict) -> dict[str, str]:
    return {r["case_id"]: r["status"] for r in summary["results"]}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A bank of two synthetic cases and a cohort of 6 volumes (+ a corrupt file), no run yet (cheap)."""
    root = tmp_path_factory.mktemp("cohort")
    train = make_synthetic_study(2, shape=(4, 32, 32), spacing=(1.3, 1.3, 6.0), seed=1)
    for c in train:
        write_volume(c.image, root / f"{c.case_id}_img.nii.gz")
        write_volume(c.labels, root / f"{c.case_id}_lab.nii.gz")
    bank = root / "bank"
    assert main(["bank", "create", str(bank), "--labels", "1:RV,2:Myo,3:LV", *MODELS]) == 0
    for c in train:
        assert main(["bank", "add", str(bank), str(root / f"{c.case_id}_img.nii.gz"),
                     str(root / f"{c.case_id}_lab.nii.gz"), "--case", c.case_id, *MODELS]) == 0
    vols = root / "volumes"
    vols.mkdir()
    short = make_synthetic_study(5, shape=(4, 32, 32), spacing=(1.3, 1.3, 6.0), seed=7)
    long = make_synthetic_study(1, shape=(LONG_SLICES, 32, 32), spacing=(1.3, 1.3, 6.0), seed=9)[0].image
    images = {c: Volume(s.image.array[1:3].copy(), s.image.spacing, s.image.origin, s.image.direction)
              for c, s in zip([c for c in GOOD if c != LONG], short)}  # 2 slices each: cheap
    images[LONG] = long
    for name, image in images.items():
        write_volume(image, vols / f"{name}.nii.gz")
    (vols / f"{BROKEN}.nii.gz").write_bytes(b"\x1f\x8b this is not a NIfTI file")
    manifest = root / "manifest.csv"
    rows = [("image", "case_id")] + [(f"volumes/{c}.nii.gz", c) for c in ["vol0", LONG, BROKEN, *GOOD[2:]]]
    with open(manifest, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    good_manifest = root / "good.csv"
    with open(good_manifest, "w", newline="") as f:
        csv.writer(f).writerows([(str(vols / f"{c}.nii.gz"), c) for c in reversed(GOOD)])
    return {"root": root, "bank": bank, "bank_before": _tree_digest(bank), "manifest": manifest,
            "good_manifest": good_manifest, "volumes": vols}


@pytest.fixture(scope="module")
def worker_code(small, tmp_path_factory):
    """The code every cohort worker runs (`_Models`: models loaded once), here in the test process."""
    from RetrievalSegLib.bank.support_bank import SupportBank
    from RetrievalSegLib.cli.main import build_parser
    from RetrievalSegLib.cli.cohort import cohort_settings
    from RetrievalSegLib.cohort.run import _Models

    tmp = tmp_path_factory.mktemp("worker-code")

    def settings_for(out: Path, cache: Path):
        args = build_parser().parse_args(["segment-cohort", str(small["good_manifest"]), "--bank", str(small["bank"]),
                                          "--out", str(out), "--cache-dir", str(cache), *MODELS, *SEG])
        out.mkdir(parents=True, exist_ok=True)
        return cohort_settings(args, SupportBank.open(small["bank"]), None)

    settings, model_args = settings_for(tmp / "ref", tmp / "cache")
    return _Models(model_args, settings), settings_for


@pytest.fixture(scope="module")
def cohort(small):
    """Run 1 killed on the long volume, run 2 completing it (the slow tests' reference outputs)."""
    root, bank, manifest = small["root"], small["bank"], small["manifest"]
    cache = root / "cache"
    out = root / "out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    # Run 1: one worker, killed in the middle of the long volume (synchronised on its record).
    proc = subprocess.Popen(_cohort_cmd(manifest, bank, out, cache, "--workers", "1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    rec_file = record_path(out, LONG)
    deadline = time.monotonic() + 600
    rec = None
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            rec = json.loads(rec_file.read_text())
        except (OSError, ValueError):
            rec = None
        if rec and rec["state"] == "running" and rec.get("slices_total") and 0 < rec["slices_done"] < rec["slices_total"]:
            break
        time.sleep(0.02)
    assert rec is not None and rec["state"] == "running", (rec, proc.poll())
    # its record says slices are still being computed: an output now would be a partial one
    assert not (out / f"{LONG}.nii.gz").exists(), "an output exists while its volume is still being segmented"
    os.kill(rec["pid"], signal.SIGKILL)
    stdout1, stderr1 = proc.communicate(timeout=600)
    first = {"rc": proc.returncode, "summary": _summary(stdout1), "stderr": stderr1, "killed_at": rec,
             "files": sorted(p.name for p in out.iterdir())}

    # Run 2: the same command completes only what is missing.
    run2 = subprocess.run(_cohort_cmd(manifest, bank, out, cache, "--workers", "1"), capture_output=True,
                          text=True, env=env, timeout=600)
    second = {"rc": run2.returncode, "summary": _summary(run2.stdout), "stderr": run2.stderr}
    return {**small, "cache": cache, "out": out, "first": first, "second": second}


@pytest.mark.slow
def test_cohort_killed_worker_leaves_no_partial_output_and_rerun_completes_it(cohort):
    first, second = cohort["first"], cohort["second"]
    assert first["rc"] == 1, first["stderr"][-2000:]
    status = _status(first["summary"])
    assert status[LONG] == "failed" and status[BROKEN] == "failed"
    assert {c: s for c, s in status.items() if c not in (LONG, BROKEN)} == {c: "segmented" for c in GOOD if c != LONG}
    long_result = next(r for r in first["summary"]["results"] if r["case_id"] == LONG)
    assert "killed by SIGKILL" in long_result["message"]
    # no partial output, no temp file, no sidecar for the killed volume
    assert not any(n.startswith(LONG) for n in first["files"]), first["files"]
    assert not any(n.startswith((TMP_PREFIX, ".")) or ".tmp" in n for n in first["files"]), first["files"]
    # the rerun segments only the killed volume, skips the finished ones, retries the corrupt one
    assert second["rc"] == 1, second["stderr"][-2000:]
    status2 = _status(second["summary"])
    assert status2[LONG] == "segmented" and status2[BROKEN] == "failed"
    assert {c for c, s in status2.items() if s == "skipped"} == set(GOOD) - {LONG}
    assert json.loads(record_path(cohort["out"], LONG).read_text())["state"] == "done"
    sidecar = json.loads((cohort["out"] / f"{LONG}.nii.gz.json").read_text())
    prov = sidecar["provenance"]
    assert prov["k"] == 2 and prov["random_weights"] is True and prov["precision"] == "fp32"
    assert prov["bank"]["revision"] == ReadOnlyBank(cohort["bank"]).revision
    assert len(sidecar["slices"]) == LONG_SLICES and all(s["status"] == "segmented" for s in sidecar["slices"])


@pytest.mark.slow
def test_cohort_corrupt_input_is_reported_and_the_rest_finish(cohort):
    for run in (cohort["first"], cohort["second"]):
        broken = next(r for r in run["summary"]["results"] if r["case_id"] == BROKEN)
        assert broken["status"] == "failed" and "broken.nii.gz" in broken["message"], broken
    rec = json.loads(record_path(cohort["out"], BROKEN).read_text())
    assert rec["state"] == "failed" and rec["message"]
    assert not list(cohort["out"].glob(f"{BROKEN}*"))
    assert all((cohort["out"] / f"{c}.nii.gz").is_file() for c in GOOD)


@pytest.mark.slow
def test_cohort_bank_is_never_changed_and_memories_go_to_the_cache(cohort):
    assert _tree_digest(cohort["bank"]) == cohort["bank_before"]
    bank = ReadOnlyBank(cohort["bank"])
    mem = list(cohort["cache"].rglob("*.safetensors"))
    assert len(mem) == len(bank.entries()) > 0, mem  # one per bank entry, shared by the runs
    expected = cohort_memory_dir(bank.bank_id, "x", cohort["cache"]).parent
    assert all(expected in m.parents for m in mem)


@pytest.mark.slow
def test_cohort_resume_redoes_an_output_made_with_another_bank_revision(cohort, tmp_path):
    """A sidecar from another bank revision (or a changed output) does not count as done."""
    from RetrievalSegLib.cohort.volume_job import expected_provenance, resume_reason

    out = cohort["out"]
    vol = CohortVolume(str(cohort["root"] / "volumes" / "vol0.nii.gz"), "vol0", "vol0.nii.gz")
    prov = json.loads((out / "vol0.nii.gz.json").read_text())["provenance"]
    want = {k: prov[k] for k in ("rseg_version", "sam2", "dinov2", "random_weights", "image_size", "precision",
                                 "k", "cohort_options")}
    want["bank"] = {"bank_id": prov["bank"]["bank_id"], "revision": prov["bank"]["revision"]}
    assert resume_reason(out, vol, want) is None
    assert "revision" in resume_reason(out, vol, {**want, "bank": {**want["bank"], "revision": want["bank"]["revision"] + 1}})
    assert "k" in resume_reason(out, vol, {**want, "k": 3})
    copy = tmp_path / "out"
    copy.mkdir()
    (copy / "vol0.nii.gz").write_bytes((out / "vol0.nii.gz").read_bytes() + b"\0")
    (copy / "vol0.nii.gz.json").write_bytes((out / "vol0.nii.gz.json").read_bytes())
    assert "SHA-256" in resume_reason(copy, vol, want)
    assert expected_provenance  # the function the workers use to build `want`


@pytest.mark.slow
def test_cohort_two_workers_give_the_same_outputs_as_one(cohort, tmp_path):
    out = tmp_path / "out2"
    run = subprocess.run(_cohort_cmd(cohort["good_manifest"], cohort["bank"], out, cohort["cache"], "--workers", "2",
                                      "--threads", "2"),  # as the one-worker runs: same float reduction order
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    summary = _summary(run.stdout)
    assert summary["workers"] == 2 and set(_status(summary).values()) == {"segmented"}
    pids = {json.loads(record_path(out, c).read_text())["pid"] for c in GOOD}
    assert len(pids) == 2, pids  # both workers took volumes
    ref, got = _labelmaps(cohort["out"]), _labelmaps(out)
    for c in GOOD:
        assert np.array_equal(ref[c], got[c]), c
    assert _tree_digest(cohort["bank"]) == cohort["bank_before"]


@pytest.mark.slow
@pytest.mark.parametrize("to", ["process-group", "parent-only", "sigterm"])
def test_cohort_ctrl_c_writes_the_summary_leaves_no_partial_output_and_the_rerun_resumes(small, tmp_path, to):
    """Ctrl-C in the middle of the long volume: as a terminal sends it (the whole process group) or to
    the command alone (the parent must stop its workers itself); or SIGTERM to the command, as a
    scheduler cancelling the job sends it. Exit 130, the summary still written,
    the volume in flight recorded as interrupted with nothing written for it; the rerun does the rest."""
    from RetrievalSegLib.cohort.run import INTERRUPTED_IN_FLIGHT, INTERRUPTED_NOT_STARTED

    out, cache = tmp_path / "out", tmp_path / "cache"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = _cohort_cmd(small["manifest"], small["bank"], out, cache, "--workers", "1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)  # its own process group, as in a terminal
    try:
        from RetrievalSegLib.cohort.run import wait_for_record

        rec = wait_for_record(record_path(out, LONG), lambda r: r["state"] == "running" and bool(r.get("slices_total"))
                              and 0 < r["slices_done"] < r["slices_total"], timeout=600)
        if to == "process-group":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            os.kill(proc.pid, signal.SIGTERM if to == "sigterm" else signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert "rseg: interrupted" in stderr and "run the same command again" in stderr
    summary = _summary(stdout)
    assert summary["interrupted_by_user"] is True
    assert json.loads((out / "cohort-summary.json").read_text()) == summary  # the summary file is written too
    results = {r["case_id"]: r for r in summary["results"]}
    assert set(results) == set(GOOD) | {BROKEN}  # every volume of the manifest has a line
    assert results[LONG]["status"] == "interrupted" and results[LONG]["message"] == INTERRUPTED_IN_FLIGHT
    after = {c: r for c, r in results.items() if c != LONG}
    assert {r["status"] for r in after.values()} <= {"segmented", "failed", "interrupted"}
    assert any(r["status"] == "segmented" for r in after.values()), after  # the long one is not the first
    assert any(r["message"] == INTERRUPTED_NOT_STARTED for r in after.values()), after  # nor the last
    assert summary["interrupted"] == sum(r["status"] == "interrupted" for r in results.values())
    assert json.loads(record_path(out, LONG).read_text())["state"] == "interrupted"
    files = sorted(p.name for p in out.iterdir())
    assert not any(n.startswith(LONG) for n in files), files  # no partial output, no sidecar
    assert not any(n.startswith((TMP_PREFIX, ".")) or ".tmp" in n for n in files), files
    for c, r in after.items():
        if r["status"] == "interrupted":
            assert not (out / f"{c}.nii.gz").exists() and not record_path(out, c).exists(), c
    # the worker is gone: soon nothing of this run runs in its process group (multiprocessing's
    # resource tracker leaves when it sees the command's end)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("processes of the interrupted run are still running")

    run2 = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert run2.returncode == 1, run2.stderr[-2000:]  # only the corrupt volume fails
    status2 = _status(_summary(run2.stdout))
    assert status2[LONG] == "segmented" and status2[BROKEN] == "failed"
    assert {c for c, s in status2.items() if s == "skipped"} == {c for c, r in after.items() if r["status"] == "segmented"}
    assert all((out / f"{c}.nii.gz").is_file() for c in GOOD)
    assert _tree_digest(small["bank"]) == small["bank_before"]


def test_cohort_shards_are_disjoint_complete_and_stable():
    vols = [CohortVolume(f"/data/{c}.nii.gz", c, f"{c}.nii.gz") for c in [f"case{i:03d}" for i in range(17)]]
    for n in (1, 2, 3, 5, 17, 20):
        shards = [select_shard(vols, i, n) for i in range(n)]
        names = [v.case_id for s in shards for v in s]
        assert sorted(names) == sorted(v.case_id for v in vols) and len(names) == len(set(names)), n
        assert max(map(len, shards)) - min(map(len, shards)) <= 1, n
        # the same shards whatever the manifest's row order
        shuffled = [vols[i] for i in np.random.default_rng(n).permutation(len(vols))]
        assert [select_shard(shuffled, i, n) for i in range(n)] == shards, n


@pytest.mark.slow
def test_cohort_shards_0_3_to_2_3_through_the_command(cohort, tmp_path):
    vols = read_manifest(cohort["good_manifest"])
    shards = [select_shard(vols, i, 3) for i in range(3)]
    # through the command: three tasks writing into one folder, as a SLURM array does
    out = tmp_path / "shards"
    seen = []
    for i in range(3):
        run = subprocess.run(_cohort_cmd(cohort["good_manifest"], cohort["bank"], out, cohort["cache"],
                                         "--shard", f"{i}/3"), capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-2000:]
        summary = _summary(run.stdout)
        assert summary["shard"] == f"{i}/3" and summary["volumes_in_manifest"] == 6
        assert set(_status(summary)) == {v.case_id for v in shards[i]}
        assert (out / f"cohort-summary-shard-{i}-of-3.json").is_file()
        seen += list(_status(summary))
    assert sorted(seen) == sorted(GOOD)
    ref, got = _labelmaps(cohort["out"]), _labelmaps(out)
    assert all(np.array_equal(ref[c], got[c]) for c in GOOD)


def test_cohort_manifest_rules(tmp_path):
    (tmp_path / "a.nii.gz").write_bytes(b"")
    (tmp_path / "b.nrrd").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("x")
    vols = read_manifest(tmp_path)
    assert [(Path(v.image).name, v.case_id, v.output_name) for v in vols] == [
        ("a.nii.gz", "a", "a.nii.gz"), ("b.nrrd", "b", "b.nii.gz")]
    m = tmp_path / "m.csv"
    m.write_text("# a comment\nimage,case_id,output\na.nii.gz,caseA,\nb.nrrd,,b_seg.seg.nrrd\n")
    vols = read_manifest(m)
    assert [(v.case_id, v.output_name) for v in vols] == [("caseA", "caseA.nii.gz"), ("b", "b_seg.seg.nrrd")]
    assert vols[0].image == str(tmp_path / "a.nii.gz")
    m.write_text("case_id,image\nx,a.nii.gz\n")  # header fixes the column order
    assert read_manifest(m)[0].case_id == "x"
    for text, words in [("a.nii.gz,x\nb.nrrd,x\n", "unique"), ("a.nii.gz,x,../evil.nii.gz\n", "plain file name"),
                        ("a.nii.gz,x,o.nii.gz\nb.nrrd,y,O.nii.gz\n", "also the output"), ("", "no volumes"),
                        ("a.nii.gz,sub/dir\n", "cannot be a file name"), ("a,b,c,d\n", "columns")]:
        m.write_text(text)
        with pytest.raises(ManifestError, match=words):
            read_manifest(m)
    assert parse_shard("2/3") == (2, 3)
    for bad in ("3/3", "-1/3", "1", "a/b", "0/0"):
        with pytest.raises(ValueError):
            parse_shard(bad)


def test_cohort_usage_errors(small, tmp_path, capsys):
    cohort = small
    good = ["segment-cohort", str(cohort["good_manifest"]), "--bank", str(cohort["bank"]), *MODELS]
    assert main([*good, "--out", str(cohort["bank"] / "out")]) == 2
    assert "inside the support bank" in capsys.readouterr().err
    assert main([*good, "--out", str(tmp_path / "o"), "--shard", "3/3"]) == 2
    assert main(["segment-cohort", str(tmp_path / "missing.csv"), "--bank", str(cohort["bank"]),
                 "--out", str(tmp_path / "o"), *MODELS]) == 2
    assert "no such manifest" in capsys.readouterr().err
    # no weights (offline, none on disk): exit 3 with the worker's explanation, every volume "not started"
    out = tmp_path / "noweights"
    assert main(["segment-cohort", str(cohort["good_manifest"]), "--bank", str(cohort["bank"]), "--out", str(out),
                 "--k", "1", "--image-size", "256", "--device", "cpu", "--no-progress"]) == 3
    assert "sam2" in capsys.readouterr().err.lower()
    assert not list(out.glob("*.nii.gz"))
    assert _tree_digest(cohort["bank"]) == cohort["bank_before"]


def test_cohort_ray_local_gives_the_same_outputs(small, worker_code, tmp_path, monkeypatch):
    """A real local Ray started by `--ray local` (loopback, no dashboard; 2 CPU actors): same label maps
    as the worker code run here; the corrupt volume is reported and the others finish; the bank is
    byte-identical afterwards."""
    import importlib.util

    from RetrievalSegLib.cohort.volume_job import segment_one

    # Ray is locked in requirements.lock: a missing install fails, never skips. Not imported here:
    # `--ray local` must set Ray's loopback switch before Ray is first imported.
    assert importlib.util.find_spec("ray") is not None

    cases = ["vol0", "vol2"]
    manifest = tmp_path / "ray.csv"
    manifest.write_text("".join(f"{small['volumes'] / c}.nii.gz,{c}\n" for c in [*cases, BROKEN]))
    out, ref_out, cache = tmp_path / "ray", tmp_path / "ref", tmp_path / "cache"
    argv = ["segment-cohort", str(manifest), "--bank", str(small["bank"]), "--cache-dir", str(cache), *MODELS,
            *SEG, "--no-progress"]
    models, settings_for = worker_code
    settings, _ = settings_for(ref_out, cache)
    for v in read_manifest(manifest)[:2]:
        assert segment_one(v, models.engine, models.bank, settings)["status"] == "segmented"

    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # loopback only; no token written to the home folder
    t0 = time.perf_counter()
    assert "ray" not in sys.modules, "Ray was imported before this test (it would not stay on loopback)"
    # --ray local must turn Ray's loopback switch off whatever the environment says (teardown removes it)
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "1")
    try:
        rc = main([*argv, "--out", str(out), "--ray", "local", "--workers", "2"])  # connect_ray starts it
        import ray

        assert ray.is_initialized()
        node = ray.nodes()[0]
        assert node["NodeManagerAddress"] == "127.0.0.1" == ray.util.get_node_ip_address(), node  # loopback only
    finally:
        if "ray" in sys.modules:
            sys.modules["ray"].shutdown()
    assert rc == 1  # the corrupt volume failed
    summary = json.loads((out / "cohort-summary.json").read_text())
    assert summary["workers"] == "ray:local"
    assert _status(summary) == {"vol0": "segmented", "vol2": "segmented", BROKEN: "failed"}
    broken = next(r for r in summary["results"] if r["case_id"] == BROKEN)
    assert "broken.nii.gz" in broken["message"]
    ref, got = _labelmaps(ref_out, cases), _labelmaps(out, cases)
    assert all(np.array_equal(ref[c], got[c]) for c in cases)
    assert len({json.loads(record_path(out, c).read_text())["pid"] for c in cases}) == 2  # two actors
    assert _tree_digest(small["bank"]) == small["bank_before"]
    assert list(cache.rglob("*.safetensors"))  # memories went to the cache folder, not into the bank
    print(f"ray cohort run: {time.perf_counter() - t0:.1f} s")


def test_cohort_output_that_cannot_be_written_leaves_nothing_and_the_rest_finish(small, worker_code, tmp_path,
                                                                                  monkeypatch):
    """A full disk while writing a label map (SimpleITK writes a short file and returns): no output,
    no temporary file, the volume recorded as failed; the next volume is written."""
    import SimpleITK as sitk

    from RetrievalSegLib.cohort.volume_job import segment_one

    models, settings_for = worker_code
    out = tmp_path / "out"
    settings, _ = settings_for(out, tmp_path / "cache")
    real_write = sitk.WriteImage

    def short_write(img, path, *a, **kw):  # what a full disk does to SimpleITK's writers
        real_write(img, path, *a, **kw)
        with open(path, "r+b") as f:
            f.truncate(max(1, os.path.getsize(path) // 2))

    vols = [v for v in read_manifest(small["good_manifest"]) if v.case_id in ("vol0", "vol2")]
    monkeypatch.setattr(sitk, "WriteImage", short_write)
    res = segment_one(vols[0], models.engine, models.bank, settings)
    monkeypatch.setattr(sitk, "WriteImage", real_write)
    assert res["status"] == "failed" and "cannot write" in res["message"], res
    assert sorted(p.name for p in out.iterdir()) == ["cohort-records"], list(out.iterdir())
    assert json.loads(record_path(out, vols[0].case_id).read_text())["state"] == "failed"
    assert segment_one(vols[1], models.engine, models.bank, settings)["status"] == "segmented"
    assert (out / f"{vols[1].case_id}.nii.gz").is_file() and (out / f"{vols[1].case_id}.nii.gz.json").is_file()
    assert _tree_digest(small["bank"]) == small["bank_before"]


def test_cohort_resume_rule(tmp_path):
    """Skipped only when output + sidecar exist, the output's SHA-256 matches and every setting matches."""
    from RetrievalSegLib.cohort.volume_job import resume_reason
    from RetrievalSegLib.data.fileio import file_sha256
    from RetrievalSegLib.segmentation.provenance import write_sidecar

    want = {"rseg_version": "0.1.0", "sam2": "sam2.1-tiny@256:random-seed0", "dinov2": "dinov2-small:x@56",
            "random_weights": True, "image_size": 256, "precision": "fp32", "k": 2,
            "bank": {"bank_id": "abc", "revision": 4}, "cohort_options": {"k": 2, "labels": [1, 3], "window": None}}
    vol = CohortVolume("/data/a.nii.gz", "a", "a.nii.gz")
    assert resume_reason(tmp_path, vol, want) == "no output yet"
    out = tmp_path / "a.nii.gz"
    out.write_bytes(b"label map bytes")
    assert "no usable sidecar" in resume_reason(tmp_path, vol, want)
    prov = {**want, "bank": {"path": "/banks/x", **want["bank"]}, "labels": {"1": "RV"}, "created": "now",
            "output_sha256": file_sha256(out)}
    write_sidecar(out, prov, [])
    assert resume_reason(tmp_path, vol, want) is None
    for key, value in [("bank", {"bank_id": "abc", "revision": 5}), ("bank", {"bank_id": "other", "revision": 4}),
                       ("k", 3), ("precision", "bf16"), ("sam2", "sam2.1-tiny@256:random-seed1"),
                       ("rseg_version", "0.2.0"), ("cohort_options", {**want["cohort_options"], "labels": [1]})]:
        reason = resume_reason(tmp_path, vol, {**want, key: value})
        assert reason is not None and key in reason, (key, reason)
    out.write_bytes(b"label map bytes, changed")
    assert "SHA-256" in resume_reason(tmp_path, vol, want)


def test_cohort_cache_is_the_folder_bank_cache_warm_fills_and_holds_its_cap(small, worker_code, tmp_path):
    """`rseg bank cache BANK --warm --cache-dir DIR` fills the folder a cohort with `--cache-dir DIR`
    reads (one warm-up, every worker), and `--cache-gb` caps the cache the worker segments with."""
    from RetrievalSegLib.bank.support_bank import SupportBank
    from RetrievalSegLib.cohort.volume_job import segment_one
    from RetrievalSegLib.engine.memory_cache import memory_cache_cap

    models, settings_for = worker_code
    engine = models.engine
    bank = SupportBank.open(small["bank"])
    warm_dir = tmp_path / "shared-cache"
    warmed = engine.memory_cache(bank, cache_dir=warm_dir).directory
    assert warmed == cohort_memory_dir(bank.bank_id, engine.sam2_identity, warm_dir)
    assert ReadOnlyBank(small["bank"], warm_dir).memory_cache_dir(engine.sam2_identity, create=False) == warmed

    settings, _ = settings_for(tmp_path / "out", tmp_path / "unused")
    settings.cache_gb = 0.25
    cache = engine.memory_cache(models.bank)
    before = cache.max_bytes
    try:
        vol = read_manifest(small["good_manifest"])[0]
        assert segment_one(vol, engine, models.bank, settings)["status"] == "segmented"
        assert cache.max_bytes == memory_cache_cap(0.25) != before
    finally:
        cache.max_bytes = before  # the fixture's engine is shared by the other tests
