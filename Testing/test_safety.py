"""Nothing outside a support bank is ever touched, and no good file is replaced by a bad one.

Each test reproduces one way a user's files were damaged (links inside a bank, a full disk, an
output that is the input, tampered caches, non-finite embeddings, read-only banks, archives) and
drives it through `rseg` as a user would. Checks that need another user (read-only, permissions)
run in a child process with dropped privileges when the tests run as root (as CI does), because
chmod does not stop root; a full disk is a child process with a small RLIMIT_FSIZE.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from RetrievalSegLib.bank.support_bank import SupportBank

from _bank_helpers import HASH_EMBEDDER_SRC, HashEmbedder, child_env, make_case
from _bank_helpers import bank_cli, filled_bank, tree

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- 1. links
def test_links_inside_a_bank_are_never_followed(tmp_path, capsys):
    rseg = bank_cli()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("the user's notes")
    (outside / "keep").mkdir()
    (outside / "keep" / "scan.dat").write_bytes(b"\x01" * 100)
    before = tree(outside)
    image, labels = make_case(1)
    from RetrievalSegLib.data.volume import write_volume

    write_volume(image, tmp_path / "img.nrrd")
    write_volume(labels, tmp_path / "lab.nrrd")

    # .lock is a link to a user's file: a writer must not open, truncate or overwrite it.
    bank = filled_bank(tmp_path, "b1")
    first = bank.entries()[0].id
    (bank.path / ".lock").unlink(missing_ok=True)
    (bank.path / ".lock").symlink_to(outside / "precious.txt")
    capsys.readouterr()
    assert rseg("remove", bank.path, first) == 1
    assert ".lock" in capsys.readouterr().err
    assert not SupportBank.open(bank.path).entry(first).retired

    # memories/ is a link to a folder of the user's: repair must not delete its subfolders.
    bank = filled_bank(tmp_path, "b2")
    shutil.rmtree(bank.path / "memories")
    (bank.path / "memories").symlink_to(outside, target_is_directory=True)
    capsys.readouterr()
    assert rseg("verify", bank.path, "--repair") == 1
    assert "memories is a link" in capsys.readouterr().out

    # entries/ is a link: add must not write entry files outside.
    bank = filled_bank(tmp_path, "b3")
    real_entries = tmp_path / "moved-entries"
    (bank.path / "entries").rename(real_entries)
    (bank.path / "entries").symlink_to(real_entries, target_is_directory=True)
    listed = sorted(p.name for p in real_entries.iterdir())
    capsys.readouterr()
    assert rseg("add", bank.path, tmp_path / "img.nrrd", tmp_path / "lab.nrrd", "--case", "p02") == 1
    assert "entries is a link" in capsys.readouterr().err
    assert sorted(p.name for p in real_entries.iterdir()) == listed
    assert len(SupportBank.open(bank.path)) == 3

    assert tree(outside) == before and (outside / "keep" / "scan.dat").exists()

    # An entry file is a link to an identical copy outside: it is not read through the link.
    bank = filled_bank(tmp_path, "b4")
    e = bank.entries()[0]
    f = bank.path / "entries" / f"{e.id}.npz"
    f.rename(outside / "copy.npz")
    f.symlink_to(outside / "copy.npz")
    before = tree(outside)
    capsys.readouterr()
    assert rseg("verify", bank.path) == 1
    assert f"entries/{e.id}.npz is a link" in capsys.readouterr().out
    assert rseg("export", bank.path, tmp_path / "b4.zip") == 1
    assert "is a link" in capsys.readouterr().err

    assert tree(outside) == before  # nothing outside any bank changed
    assert (outside / "precious.txt").read_text() == "the user's notes"


# ----------------------------------------------------------------------------- other users
OTHER_UID = 65534  # "nobody": the colleague who shares the bank, or a read-only account


def other_user_prefix() -> list[str]:
    """Command prefix running a child as another, unprivileged user when we are root (chmod does
    not stop root); empty when we already are unprivileged (chmod then does the job).

    The child keeps only CAP_DAC_READ_SEARCH (it may read and traverse, e.g. the interpreter under
    root's home), never the right to write where its uid may not.
    """
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv (util-linux): cannot drop privileges")
    return [setpriv, f"--reuid={OTHER_UID}", f"--regid={OTHER_UID}", "--clear-groups",
            "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]


@pytest.fixture
def shared_dir():
    """A temp folder the other user can traverse (pytest's own tmp root is private to us)."""
    d = Path(tempfile.mkdtemp(prefix="rseg-shared-"))
    d.chmod(0o755)
    yield d
    for dirpath, dirnames, _ in os.walk(d):  # give write access back before removing
        for n in dirnames:
            os.chmod(Path(dirpath) / n, 0o755)
    d.chmod(0o755)
    shutil.rmtree(d, ignore_errors=True)


def other_env(home: Path) -> dict[str, str]:
    env = child_env()
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home / "xdg"), RSEG_CACHE_DIR=str(home / "rseg-cache"),
               HF_HOME=str(home / "hf"), MPLCONFIGDIR=str(home / "mpl"), TORCHINDUCTOR_CACHE_DIR=str(home / "ti"))
    return env


def writable_home(shared: Path) -> Path:
    home = shared / "home"
    home.mkdir(exist_ok=True)
    home.chmod(0o777)  # the other user writes its own cache here, never into the bank
    return home


BANK_CHILD = HASH_EMBEDDER_SRC + '''
import argparse, sys
from RetrievalSegLib.cli.bank import add_bank_parser
parser = argparse.ArgumentParser(prog="rseg")
add_bank_parser(parser.add_subparsers(dest="command"), lambda args: HashEmbedder())
args = parser.parse_args(["bank", *sys.argv[1:]])
sys.exit(args.func(args))
'''


def bank_child(shared: Path, *argv, other_user: bool = False, umask: int | None = None):
    """`rseg bank ...` (hash embedder) in a child process, optionally as the other user / with a umask."""
    script = shared / "bank_child.py"
    if not script.exists():
        script.write_text(BANK_CHILD)
        script.chmod(0o644)
    prefix = other_user_prefix() if other_user else []
    return subprocess.run([*prefix, sys.executable, str(script), *map(str, argv)],
                          env=other_env(writable_home(shared)), capture_output=True, text=True, timeout=120,
                          cwd=shared, preexec_fn=None if umask is None else (lambda: os.umask(umask)))


# ----------------------------------------------------------------------------- 7. permissions
def test_a_bank_shared_by_a_team_keeps_the_umask_modes(shared_dir):
    from RetrievalSegLib.data.volume import write_volume

    image, labels = make_case(2)
    write_volume(image, shared_dir / "img.nrrd")
    write_volume(labels, shared_dir / "lab.nrrd")
    for f in ("img.nrrd", "lab.nrrd"):
        (shared_dir / f).chmod(0o644)
    bank = shared_dir / "team-bank"
    for argv in (("create", bank, "--labels", "1:RV,2:Myo"),
                 ("add", bank, shared_dir / "img.nrrd", shared_dir / "lab.nrrd", "--case", "p01")):
        done = bank_child(shared_dir, *argv, umask=0o002)
        assert done.returncode == 0, done.stderr
    modes = {p.relative_to(bank).as_posix(): p.stat().st_mode & 0o777 for p in bank.rglob("*")}
    files = {k: m for k, m in modes.items() if not (bank / k).is_dir()}
    assert {"bank.json", "bank.db", ".lock"} <= set(files) and len(files) >= 6
    assert set(files.values()) == {0o664}, files  # 0666 & ~002, not 0600
    assert {m for k, m in modes.items() if (bank / k).is_dir()} == {0o775}


# ----------------------------------------------------------------------------- segment outputs
FAST = ["--random-weights", "--image-size", "256", "--dinov2-input-size", "56", "--device", "cpu"]


@pytest.fixture(scope="module")
def seg_study(tmp_path_factory):
    """A small synthetic study and a random-weights bank made from its first case, by `rseg`."""
    from RetrievalSegLib.cli.main import main
    from RetrievalSegLib.data.synthetic import make_synthetic_study
    from RetrievalSegLib.data.volume import write_volume

    root = tmp_path_factory.mktemp("segstudy")
    cases = make_synthetic_study(2, shape=(4, 32, 32), spacing=(1.3, 1.3, 6.0))
    for c in cases:
        write_volume(c.image, root / f"{c.case_id}_img.nii.gz")
        write_volume(c.labels, root / f"{c.case_id}_lab.nii.gz")
    bank = root / "bank"
    assert main(["bank", "create", str(bank), "--labels", "1:RV,2:Myo,3:LV", *FAST]) == 0
    c = cases[0]
    assert main(["bank", "add", str(bank), str(root / f"{c.case_id}_img.nii.gz"),
                 str(root / f"{c.case_id}_lab.nii.gz"), "--case", c.case_id, *FAST]) == 0
    return root, bank, root / f"{cases[1].case_id}_img.nii.gz"


FULL_DISK_CHILD = '''
import json, resource, sys
from RetrievalSegLib.cli.main import main
from RetrievalSegLib.data.segnrrd import read_seg_nrrd, write_seg_nrrd
from RetrievalSegLib.data.volume import read_volume, write_volume

image, bank, out, fast = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
def segment(*argv):
    return main(["segment", image, "--bank", bank, *argv, "--k", "1", "--no-progress", *fast])
# The good outputs of an earlier run (this also fills the bank's memory cache).
assert segment("--out", out + "/seg.nii.gz", "--seg-nrrd", out + "/seg.seg.nrrd") == 0
labelmap = read_volume(out + "/seg.nii.gz")
labels, segments = read_seg_nrrd(out + "/seg.seg.nrrd")
write_volume(labelmap, out + "/seg.nrrd")
print("GOOD", flush=True)
# Now the disk is "full": no file may grow past 64 bytes (SIGXFSZ is ignored by Python).
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (64, hard))
print("RC", segment("--out", out + "/seg.nii.gz"), flush=True)
for write in (lambda: write_volume(labelmap, out + "/seg.nrrd"),
              lambda: write_seg_nrrd(labels, segments, out + "/seg.seg.nrrd")):
    try:
        write()
        print("WROTE", flush=True)
    except OSError as e:
        print("ERROR", e, flush=True)
'''


def test_a_full_disk_never_replaces_a_good_output(seg_study, tmp_path):
    root, bank, image = seg_study
    out = tmp_path / "out"
    out.mkdir()
    script = tmp_path / "full_disk.py"
    script.write_text(FULL_DISK_CHILD)
    done = subprocess.run([sys.executable, str(script), str(image), str(bank), str(out), json.dumps(FAST)],
                          env=child_env(), capture_output=True, text=True, timeout=300)
    assert "GOOD" in done.stdout, done.stderr
    # rseg segment: a failure naming the output and the cause, not "wrote seg.nii.gz" and exit 0.
    assert "RC 1" in done.stdout, done.stdout + done.stderr
    assert f"cannot write '{out / 'seg.nii.gz'}'" in done.stderr and "file size limit" in done.stderr
    # The NRRD and .seg.nrrd writers too (the same SimpleITK path).
    errors = [line for line in done.stdout.splitlines() if line.startswith(("ERROR", "WROTE"))]
    assert len(errors) == 2 and all(e.startswith("ERROR cannot write") for e in errors), errors
    assert "seg.nrrd'" in errors[0] and "seg.seg.nrrd'" in errors[1]
    # The previous outputs are intact (full label maps) and no temp file is left.
    from RetrievalSegLib.data.segnrrd import read_seg_nrrd
    from RetrievalSegLib.data.volume import read_volume

    a, b = read_volume(out / "seg.nii.gz"), read_volume(out / "seg.nrrd")
    c, _ = read_seg_nrrd(out / "seg.seg.nrrd")
    assert a.array.shape == (4, 32, 32)
    np.testing.assert_array_equal(a.array, b.array)
    np.testing.assert_array_equal(a.array, c.array)
    # The good run's sidecar (provenance) is intact too; the failed run wrote none.
    from RetrievalSegLib.segmentation.provenance import read_sidecar

    assert read_sidecar(out / "seg.nii.gz")["provenance"]["k"] == 1
    assert sorted(p.name for p in out.iterdir()) == ["seg.nii.gz", "seg.nii.gz.json", "seg.nrrd", "seg.seg.nrrd",
                                                 "seg.seg.nrrd.json"]


def test_an_output_that_is_the_input_is_refused_before_models_load(seg_study, tmp_path, capsys, monkeypatch):
    from RetrievalSegLib.cli import main as cli

    root, bank, image = seg_study
    original = image.read_bytes()

    def no_models(args):
        raise AssertionError("models were loaded before the output paths were checked")

    monkeypatch.setattr(cli, "make_engine", no_models)
    alias = tmp_path / "alias.nii.gz"
    alias.symlink_to(image)
    hard = tmp_path / "hard.nii.gz"
    os.link(image, hard)
    dotdot = image.parent / "sub" / ".." / image.name
    (image.parent / "sub").mkdir(exist_ok=True)
    for out in (image, alias, hard, dotdot):
        capsys.readouterr()
        assert cli.main(["segment", str(image), "--bank", str(bank), "--out", str(out), *FAST]) == 2
        err = capsys.readouterr().err
        assert f"--out {out} is the input image {image}" in err and "never writes over its input" in err
    assert cli.main(["segment", str(image), "--bank", str(bank), "--out", str(tmp_path / "ok.nii.gz"),
                     "--seg-nrrd", str(image), *FAST]) == 2
    assert "--seg-nrrd" in capsys.readouterr().err
    assert cli.main(["segment", str(image), "--bank", str(bank), "--out", str(bank / "x.nii.gz"), *FAST]) == 2
    assert "inside the support bank" in capsys.readouterr().err
    assert image.read_bytes() == original


# ----------------------------------------------------------------------------- 4. memory caches
def tamper_memory_files(folder: Path) -> list[Path]:
    """Rewrite every cached memory's tensors under `folder` with other values, keeping its metadata."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    files = sorted(folder.glob("*/*.safetensors"))
    g = torch.Generator().manual_seed(7)
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            meta = st.metadata()
            tensors = {k: st.get_tensor(k) for k in st.keys()}
        forged = {k: (torch.randn(t.shape, generator=g) * 10).to(t.dtype) for k, t in tensors.items()}
        save_file(forged, str(f), metadata=meta)
    return files


def test_tampered_memory_caches_are_reported_and_recomputed(seg_study, tmp_path, capsys, monkeypatch):
    from RetrievalSegLib.cli.main import main
    from RetrievalSegLib.data.volume import read_volume

    _, shared_bank, image = seg_study
    bank = tmp_path / "bank"
    shutil.copytree(shared_bank, bank, symlinks=True)
    shutil.rmtree(bank / "memories")
    monkeypatch.setenv("RSEG_CACHE_DIR", str(tmp_path / "user-cache"))  # start cold: this run computes every memory

    def segment(out: Path) -> np.ndarray:
        assert main(["segment", str(image), "--bank", str(bank), "--out", str(out), "--k", "1",
                     "--no-progress", *FAST]) == 0
        return read_volume(out).array

    honest = segment(tmp_path / "a.nii.gz")
    cache = tmp_path / "user-cache" / "memories" / SupportBank.open(bank).bank_id
    files = tamper_memory_files(cache)
    assert files
    # segment does not trust them: it recomputes (and rewrites) every tampered memory.
    np.testing.assert_array_equal(segment(tmp_path / "b.nii.gz"), honest)
    # An older version kept its caches inside the bank (memories/): verify checks those files.
    shutil.copytree(cache, bank / "memories")  # the rewritten, honest memories
    assert main(["bank", "verify", str(bank)]) == 0
    in_bank = tamper_memory_files(bank / "memories")
    capsys.readouterr()
    assert main(["bank", "verify", str(bank)]) == 1
    report = capsys.readouterr().out
    for f in in_bank:
        assert f"memory cache file {f.relative_to(bank).as_posix()}" in report
    assert "do not match their recorded SHA-256" in report


# ----------------------------------------------------------------------------- 5. embeddings
def test_non_finite_embeddings_are_flagged_never_searched_and_repaired(tmp_path, capsys):
    import hashlib

    rseg = bank_cli()
    emb = HashEmbedder()
    bank = filled_bank(tmp_path)
    bank.add_volume(*make_case(3, annotated=(1, 4)), "p02", emb)
    entries = bank.entries(include_retired=True)
    # What an unchecked re-embed with a model that overflowed would leave: NaN / Inf rows with a
    # matching checksum in bank.json.
    rows = np.array(bank.embeddings())
    rows[1, 3] = np.nan
    rows[3, :] = np.inf
    import contextlib
    import sqlite3

    with contextlib.closing(sqlite3.connect(bank.path / "bank.db")) as con, con:
        for n in (1, 3):
            blob = rows[n].astype("<f4").tobytes()
            con.execute("UPDATE embeddings SET row = ?, sha256 = ? WHERE seq = ?",
                        (blob, hashlib.sha256(blob).hexdigest(), n))
    bad = {entries[1].id, entries[3].id}

    capsys.readouterr()
    assert rseg("verify", bank.path) == 1
    out = capsys.readouterr().out
    assert "non-finite values" in out and all(i in out for i in bad)
    # search never returns them, and says why when k asks for more than the finite entries.
    reopened = SupportBank.open(bank.path)
    for e in entries:
        q = emb.embed([reopened.load_entry(e.id).image])
        hits = reopened.search(q, k=3, case_policy="ignore")[0]
        assert len(hits) == 3 and not bad & {i for i, _ in hits}
        assert all(np.isfinite(s) for _, s in hits)
    with pytest.raises(ValueError, match="only 3 usable entries.*2 with non-finite embeddings"):
        reopened.search(q, k=4, case_policy="ignore")

    assert rseg("verify", bank.path, "--repair", "--reembed") == 0
    assert np.isfinite(SupportBank.open(bank.path).embeddings()).all()
    assert len(SupportBank.open(bank.path).search(q, k=5, case_policy="ignore")[0]) == 5
    assert rseg("verify", bank.path) == 0


# ----------------------------------------------------------------------------- 6. read-only banks
def make_read_only(folder: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(folder):
        for n in filenames:
            os.chmod(Path(dirpath) / n, 0o444)
    for dirpath, dirnames, _ in os.walk(folder, topdown=False):
        for n in dirnames:
            os.chmod(Path(dirpath) / n, 0o555)
    folder.chmod(0o555)


def test_a_read_only_bank_segments_and_exports(seg_study, shared_dir):
    _, source_bank, source_image = seg_study
    bank, image, out = shared_dir / "bank", shared_dir / "image.nii.gz", shared_dir / "out"
    shutil.copytree(source_bank, bank, symlinks=True)
    shutil.rmtree(bank / "memories")  # cold: every memory must be computed somewhere
    (bank / ".lock").unlink(missing_ok=True)
    shutil.copy(source_image, image)
    image.chmod(0o644)
    out.mkdir()
    out.chmod(0o777)
    source = SupportBank.open(bank)
    meta = {"bank_id": source.bank_id, "revision": source.revision,
            "entries": [{"id": e.id} for e in source.entries()]}
    source_entries = source.entries(include_retired=True)
    source.close()
    make_read_only(bank)
    before = tree(bank)
    home = writable_home(shared_dir)

    def rseg(*argv):
        return subprocess.run([*other_user_prefix(), sys.executable, "-m", "RetrievalSegLib.cli", *map(str, argv)],
                              env=other_env(home), capture_output=True, text=True, timeout=300, cwd=shared_dir)

    done = rseg("segment", image, "--bank", bank, "--out", out / "seg.nii.gz", "--k", "1", "--no-progress", *FAST)
    assert done.returncode == 0, done.stderr
    assert (out / "seg.nii.gz").is_file()
    cached = sorted((home / "rseg-cache" / "memories").glob("*/*/*.safetensors"))
    assert cached and {p.parent.parent.name for p in cached} == {meta["bank_id"]}

    done = rseg("bank", "export", bank, out / "copy.zip")
    assert done.returncode == 0, done.stderr
    copy = SupportBank.import_archive(out / "copy.zip", shared_dir / "copy")
    assert copy.entries(include_retired=True) == source_entries

    # Where a write is truly needed, the message says so and what to do.
    entry = meta["entries"][0]["id"]
    done = rseg("bank", "remove", bank, entry)
    assert done.returncode == 1
    assert "is read-only for you" in done.stderr and "rseg bank export" in done.stderr
    assert tree(bank) == before  # nothing in the bank was written, not even a lock file


# ----------------------------------------------------------------------------- 7. import, paths, blank slices
def rewrite_zip(source: Path, dest: Path, change) -> None:
    """Copy an archive's members into a new zip, `change(members)` editing the dict on the way."""
    import zipfile

    with zipfile.ZipFile(source) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    change(members)
    with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for n, data in members.items():
            zf.writestr(n, data)


def test_a_refused_import_names_no_deleted_temp_folder(tmp_path, capsys):
    rseg = bank_cli()
    bank = filled_bank(tmp_path)
    good = bank.export(tmp_path / "good.zip")

    def wrong_embeddings(members):  # rows that do not match the checksum in bank.json
        import io

        rows = np.load(io.BytesIO(members["embeddings.npy"]))
        rows[0] *= -1

        buf = io.BytesIO()
        np.save(buf, rows)
        members["embeddings.npy"] = buf.getvalue()

    def altered_entry(members):
        name = next(n for n in members if n.endswith(".npz"))
        members[name] = members[name][:-10]

    for change in (wrong_embeddings, altered_entry):
        bad = tmp_path / f"{change.__name__}.zip"
        rewrite_zip(good, bad, change)
        capsys.readouterr()
        assert rseg("import", bad, tmp_path / "dest") == 1
        err = capsys.readouterr().err
        assert f"archive {bad} holds a damaged support bank" in err and "nothing was imported" in err
        assert ".tmp-" not in err and "Export the bank again" in err, err
        assert not (tmp_path / "dest").exists() and not list(tmp_path.glob(".tmp-*"))


def test_import_writes_only_what_the_bank_lists_and_refuses_bombs(tmp_path, capsys, monkeypatch):
    from RetrievalSegLib.bank import transfer as bank_transfer

    rseg = bank_cli()
    bank = filled_bank(tmp_path)
    good = bank.export(tmp_path / "good.zip")
    zeros = bytes(64 * 2**20)  # 64 MiB that deflate to about 64 KiB

    def clutter(members):
        for n in range(50):
            members[f"entries/unlisted-{n}.npz"] = b"x" * 1000
        members["index.faiss"] = zeros
        members["memories/x/evil.safetensors"] = b"y" * 1000

    cluttered = tmp_path / "cluttered.zip"
    rewrite_zip(good, cluttered, clutter)
    assert cluttered.stat().st_size < 2 * 2**20
    assert rseg("import", cluttered, tmp_path / "copy") == 0
    copy = tmp_path / "copy"
    assert sorted(p.name for p in (copy / "entries").iterdir()) == sorted(
        f"{e.id}.npz" for e in bank.entries(include_retired=True))
    assert not (copy / "index.faiss").exists() and not any((copy / "memories").iterdir())
    assert SupportBank.open(copy).verify().ok

    def bomb(members):
        members[next(n for n in members if n.endswith(".npz"))] = zeros

    bombed = tmp_path / "bomb.zip"
    rewrite_zip(good, bombed, bomb)
    capsys.readouterr()
    assert rseg("import", bombed, tmp_path / "dest") == 1
    err = capsys.readouterr().err
    assert f"declares {len(zeros)} bytes, more than the" in err and "nothing was written" in err
    assert not (tmp_path / "dest").exists() and not list(tmp_path.glob(".tmp-*"))

    monkeypatch.setattr(bank_transfer, "MAX_ARCHIVE_MEMBERS", 20)
    assert rseg("import", cluttered, tmp_path / "dest") == 1
    assert "more than the 20 a support bank export can hold" in capsys.readouterr().err


def test_a_bank_path_that_is_a_file_is_called_a_file(tmp_path, capsys):
    rseg = bank_cli()
    bank = filled_bank(tmp_path)
    archive = bank.export(tmp_path / "bank.zip")
    capsys.readouterr()
    assert rseg("list", archive) == 1
    err = capsys.readouterr().err
    assert f"no support bank at {archive}: it is a file, not a folder" in err
    assert "rseg bank import" in err and "does not exist" not in err


def test_blank_slices_added_as_supports_are_warned_about(tmp_path, capsys):
    import SimpleITK as sitk

    rseg = bank_cli()
    image, labels = make_case(4)
    values = image.array.astype(np.float32)
    values[3] = np.nan  # an annotated slice lost to NaNs: SimpleITK reads them back as 0
    img = sitk.GetImageFromArray(values)
    img.SetSpacing(image.spacing)
    img.SetOrigin(image.origin)
    img.SetDirection(image.direction)
    sitk.WriteImage(img, str(tmp_path / "img.nii.gz"))
    from RetrievalSegLib.data.volume import write_volume

    write_volume(labels, tmp_path / "lab.nii.gz")
    bank = tmp_path / "bank"
    assert rseg("create", bank, "--labels", "1:RV,2:Myo") == 0
    capsys.readouterr()
    assert rseg("add", bank, tmp_path / "img.nii.gz", tmp_path / "lab.nii.gz", "--case", "p01") == 0
    err = capsys.readouterr().err
    blank = next(e for e in SupportBank.open(bank).entries() if e.index == 3)
    assert "rseg bank: warning: case 'p01': 1 slice(s) added as supports are blank" in err
    assert f"k=3 ({blank.id}: every voxel is 0.0)" in err and "NaN voxels" in err
