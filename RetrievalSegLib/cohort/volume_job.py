"""A cohort: many volumes segmented with one support bank, resumable, sharded, on any number of workers.

This module is what one volume of a cohort is, independent of where it runs (a local worker
process, a Ray actor, a SLURM array task): the manifest (`read_manifest`), the shard a task owns
(`select_shard`), the read-only view of the bank every worker segments from (`ReadOnlyBank`), the
memory-cache folder (`cohort_memory_dir`, the one place that decides it), the resume rule
(`resume_reason`) and `segment_one`, which segments one volume and writes its label map and its
provenance sidecar atomically, plus a small per-volume record (running / done / failed) in
`OUT/cohort-records/`. The executors live in `cohort/run.py`, the command in `cli/cohort.py`.

Resume: a volume is skipped when its output and its sidecar exist, the sidecar names this output's
SHA-256, and its provenance matches this run: rseg version, SAM 2 and DINOv2 identities, random
weights, image size, precision (as resolved on the worker's device), k, the bank's id and revision,
and the segmentation options (`COHORT_OPTIONS`). Anything else is segmented again; a failed
volume leaves no output, so the next run retries it.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from ..data.fileio import atomic_write_bytes, file_sha256

#: Volume file endings a folder manifest picks up (a DICOM series is a sub-folder with .dcm files).
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
#: Output formats: the file ending of every label map the cohort writes.
OUTPUT_FORMATS = (".nii.gz", ".nii", ".nrrd", ".mha", ".seg.nrrd")
RECORDS_DIR = "cohort-records"
#: Options that change a volume's result: an output made with other values is segmented again.
COHORT_OPTIONS = ("k", "labels", "axis", "slices", "extent_stop", "presence_threshold", "window",
                  "case_policy", "fill_hole_area", "dinov2_input_size", "support_order",
                  "propagate", "retrieval_feature", "support_filter")


class ManifestError(ValueError):
    """The manifest (CSV or folder) cannot be used; the message names the line and what to fix."""


@dataclass(frozen=True)
class CohortVolume:
    """One volume of the cohort: its image, its case id and its output file name (in OUT)."""

    image: str
    case_id: str
    output_name: str

    def to_json(self) -> dict:
        return {"image": self.image, "case_id": self.case_id, "output_name": self.output_name}


# ----------------------------------------------------------------------------- manifest
def _strip_suffix(name: str, suffixes: Sequence[str]) -> str | None:
    low = name.lower()
    for s in sorted(suffixes, key=len, reverse=True):
        if low.endswith(s):
            return name[: -len(s)]
    return None


def _output_name(name: str, fmt: str, where: str) -> str:
    if not name or name in (".", "..") or "/" in name or "\\" in name or name != name.strip() or "\0" in name:
        raise ManifestError(f"{where}: output name {name!r} must be a plain file name (no folder, no '..')")
    if name.startswith(".") or name.lower().endswith(".json"):
        raise ManifestError(f"{where}: output name {name!r} must not be hidden or end in .json (sidecars do)")
    return name if _strip_suffix(name, OUTPUT_FORMATS) is not None else name + fmt


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return (st.st_dev, st.st_ino)


def check_outputs(volumes: Sequence[CohortVolume], out_dir: str | os.PathLike[str]) -> None:
    """ManifestError when an output of any volume (or its sidecar) would replace an input of any volume.

    Give every volume of the manifest, not one shard's: other shards run at the same time. Two paths
    are the same file when they are (after links and '..') the same name in the same folder, compared
    by folder identity (device, inode) and without letter case (one file on macOS and Windows), or
    when the output exists and is the input (a hard link); no output may go inside an input folder
    (a DICOM series).
    """
    out = Path(out_dir)
    out_id = _identity(out)
    if out_id is None:
        return  # not made yet: no input lies in it
    names: dict[tuple, CohortVolume] = {}
    files: dict[tuple[int, int], CohortVolume] = {}
    folders: dict[tuple[int, int], CohortVolume] = {}
    for v in volumes:
        image = Path(v.image)
        for spelling in (Path(os.path.abspath(image)), Path(os.path.realpath(image))):
            parent = _identity(spelling.parent)
            if parent is not None:
                names[(*parent, spelling.name.casefold())] = v
        ident = _identity(image)
        if ident is not None:
            (folders if image.is_dir() else files)[ident] = v
    real_out = Path(os.path.realpath(out))
    for folder in (real_out, *real_out.parents):
        inside = folders.get(_identity(folder) or (-1, -1))
        if inside is not None:
            raise ManifestError(f"--out {out} is inside the input folder of case {inside.case_id!r} ({inside.image}); "
                                "outputs would be written among its files. Choose another --out")
    for v in volumes:
        for name in (v.output_name, v.output_name + ".json"):  # the label map and its sidecar
            target = out / name
            hit = names.get((*out_id, name.casefold()))
            same_case = hit is not None and any(
                Path(p).name == name for p in (os.path.abspath(hit.image), os.path.realpath(hit.image)))
            if hit is None:
                hit = files.get(_identity(target) or (-1, -1))
                same_case = True
            if hit is not None:
                how = "" if same_case else (" (the same name apart from letter case: one file on macOS and "
                                            "Windows)")
                raise ManifestError(
                    f"output {target} of case {v.case_id!r} would replace the input of case {hit.case_id!r} "
                    f"({hit.image}){how}; nothing was run. Choose another --out or output name")


def read_manifest(path: str | os.PathLike[str], output_format: str = ".nii.gz") -> list[CohortVolume]:
    """The volumes of a cohort, from a CSV or a folder (see `rseg segment-cohort --help`).

    CSV: one volume per row, `image,case_id[,output]`; a header row naming these columns (`image`,
    `case_id` or `case`, `output`) may come first and then fixes their order; blank rows and rows
    starting with '#' are ignored; relative image paths are relative to the CSV's folder. An empty
    case id is the image's file name without its ending; the output defaults to `<case id><format>`.
    Folder: every volume file in it (VOLUME_SUFFIXES) and every sub-folder holding .dcm files
    (a DICOM series), case id = name without ending. Case ids and output names must be unique.
    """
    if output_format not in OUTPUT_FORMATS:
        raise ManifestError(f"output format must be one of {', '.join(OUTPUT_FORMATS)}, got {output_format!r}")
    p = Path(path)
    rows: list[tuple[str, str, str, str]] = []  # image, case id, output, where
    if p.is_dir():
        for child in sorted(p.iterdir()):
            stem = _strip_suffix(child.name, VOLUME_SUFFIXES)
            if child.is_file() and stem is not None and not child.name.startswith("."):
                rows.append((str(child), stem, "", str(child)))
            elif child.is_dir() and any(f.suffix.lower() == ".dcm" for f in child.iterdir()):
                rows.append((str(child), child.name, "", str(child)))
        if not rows:
            raise ManifestError(f"{p}: no volumes in this folder (looked for {', '.join(VOLUME_SUFFIXES)} "
                                "files and DICOM series folders)")
    elif p.is_file():
        try:
            text = p.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as e:
            raise ManifestError(f"{p}: cannot read the manifest ({e})") from None
        columns = {"image": 0, "case_id": 1, "output": 2}
        first = True
        reader = csv.reader(text.splitlines())
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as e:  # e.g. a cell over csv.field_size_limit(): no path is that long
                raise ManifestError(f"{p}:{reader.line_num}: not a manifest row ({e}); a row is "
                                    "image,case_id[,output] with one file path, id and name per cell") from None
            lineno = reader.line_num
            cells = [c.strip() for c in row]
            if any("\0" in c for c in cells):
                raise ManifestError(f"{p}:{lineno}: a cell holds a NUL character; paths, case ids and output names "
                                    "cannot")
            if not any(cells) or cells[0].startswith("#"):
                continue
            if first:
                first = False
                names = [c.lower().replace(" ", "_") for c in cells]
                if "image" in names:
                    aliases = {"case": "case_id", "id": "case_id", "output_name": "output"}
                    names = [aliases.get(n, n) for n in names]
                    unknown = [n for n in names if n not in columns]
                    if unknown:
                        raise ManifestError(f"{p}:{lineno}: unknown column(s) {unknown}; the columns are "
                                            "image, case_id, output")
                    columns = {n: names.index(n) for n in names}
                    continue
            where = f"{p}:{lineno}"
            if len(cells) > 3:
                raise ManifestError(f"{where}: {len(cells)} columns; a row is image,case_id[,output]")

            def cell(name: str) -> str:
                i = columns.get(name)
                return cells[i] if i is not None and i < len(cells) else ""

            image = cell("image")
            if not image:
                raise ManifestError(f"{where}: no image path")
            image_path = Path(image) if Path(image).is_absolute() else p.parent / image
            case_id = cell("case_id") or _strip_suffix(image_path.name, VOLUME_SUFFIXES) or image_path.name
            rows.append((str(image_path), case_id, cell("output"), where))
        if not rows:
            raise ManifestError(f"{p}: the manifest lists no volumes")
    else:
        raise ManifestError(f"{p}: no such manifest (give a CSV file or a folder of volumes)")

    volumes: list[CohortVolume] = []
    seen_case: dict[str, str] = {}
    seen_out: dict[str, str] = {}
    for image, case_id, output, where in rows:
        if case_id in seen_case:
            raise ManifestError(f"{where}: case id {case_id!r} is already used at {seen_case[case_id]}; "
                                "case ids must be unique")
        seen_case[case_id] = where
        if not output and ("/" in case_id or "\\" in case_id or case_id.startswith(".")):
            raise ManifestError(f"{where}: case id {case_id!r} cannot be a file name; give an output column")
        name = _output_name(output or case_id, output_format, where)
        key = name.lower()  # case-insensitive file systems (macOS, Windows) would merge these
        if key in seen_out:
            raise ManifestError(f"{where}: output {name!r} is also the output of {seen_out[key]}")
        seen_out[key] = where
        volumes.append(CohortVolume(image, case_id, name))
    return volumes


# ----------------------------------------------------------------------------- shards
def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' -> (I, N) with 0 <= I < N; ValueError otherwise."""
    try:
        a, b = text.split("/")
        i, n = int(a), int(b)
    except ValueError:
        raise ValueError(f"--shard takes I/N (e.g. 0/4, this task's index and the number of tasks), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"--shard I/N needs 0 <= I < N, got {text!r}")
    return i, n


def select_shard(volumes: Sequence[CohortVolume], index: int, count: int) -> list[CohortVolume]:
    """Shard `index` of `count`: every count-th volume in case-id order, starting at `index`.

    Deterministic and independent of the manifest's row order (sorted by case id), disjoint, and
    together complete; shard sizes differ by at most one.
    """
    ordered = sorted(volumes, key=lambda v: v.case_id)
    return ordered[index::count]


# ----------------------------------------------------------------------------- the bank, read-only
def cohort_memory_dir(bank_id: str, sam2_identity: str, cache_dir: str | os.PathLike[str] | None) -> Path:
    """Where a cohort keeps the SAM 2 memories of a bank: the one function that decides it.

    Never inside the bank (workers must not change it). With `cache_dir`: `<cache_dir>/<bank id>/<model>/`,
    the folder `rseg bank cache BANK --warm --cache-dir DIR` fills (and `engine.memory_cache(...,
    cache_dir=DIR)` uses), so a cache warmed once is read by every worker, e.g. on a shared file
    system. Without it: the per-user folder `rseg segment` uses too (`memory.user_memory_dir`:
    `<RSEG_CACHE_DIR or ~/.cache/retrievalseg>/memories/<bank id>/<model>/`). Memory files are keyed
    by entry id and content hash, so a folder serves every revision and never a changed entry.
    The size cap (`--cache-gb`, else $RSEG_MEMORY_CACHE_GB, else 4 GB) is applied in `segment_one`.
    """
    from ..bank.format import valid_bank_id
    from ..engine.memory_cache import memory_cache_name
    from ..engine.memory_cache import user_memory_dir

    if not valid_bank_id(bank_id):  # it names a folder: never a path (the reader checks it too)
        raise ValueError(f"bank id {bank_id!r} is not a plain folder name")
    if cache_dir is not None:
        return Path(cache_dir) / str(bank_id) / memory_cache_name(sam2_identity)
    return user_memory_dir(bank_id, sam2_identity, create=False)


class ReadOnlyBank:
    """The part of a `SupportBank` that segmentation reads; nothing it offers writes to the bank.

    Memories go to `cohort_memory_dir`, never into the bank. `expect` (bank id, revision) refuses a
    bank that changed since the cohort run started (its results would mix two revisions).
    """

    def __init__(self, path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None,
                 expect: tuple[str, int] | None = None) -> None:
        from ..bank.support_bank import SupportBank
        from ..bank.cache import check_cache_dir

        if cache_dir is not None:
            check_cache_dir(path, cache_dir)  # workers never write into the bank
        self._bank = SupportBank.open(path)
        self.cache_dir = cache_dir
        if expect is not None and (self._bank.bank_id, int(self._bank.revision)) != (expect[0], int(expect[1])):
            raise RuntimeError(
                f"support bank {path} changed during the cohort run (revision {self._bank.revision}, the run "
                f"started at revision {expect[1]}); rerun the cohort when the bank is no longer being edited")

    path = property(lambda self: self._bank.path)
    bank_id = property(lambda self: self._bank.bank_id)
    revision = property(lambda self: int(self._bank.revision))
    labels = property(lambda self: self._bank.labels)

    def check_models(self, embedder_identity: str) -> None:
        self._bank.check_models(embedder_identity)

    def search(self, *a: Any, **kw: Any) -> Any:
        return self._bank.search(*a, **kw)

    def entries(self, include_retired: bool = False) -> list:
        return self._bank.entries(include_retired=include_retired)

    def load_entry(self, entry_id: str) -> Any:
        return self._bank.load_entry(entry_id)

    def memory_cache_dir(self, sam2_identity: str, create: bool = True) -> Path:
        d = cohort_memory_dir(self.bank_id, sam2_identity, self.cache_dir)
        if create:
            d.mkdir(parents=True, exist_ok=True)
        return d


# ----------------------------------------------------------------------------- records
def _safe(name: str) -> str:
    from ..engine.memory_cache import sanitize

    return sanitize(name) + "-" + hashlib.sha256(name.encode("utf-8")).hexdigest()[:8]


def record_path(out_dir: Path, case_id: str) -> Path:
    return Path(out_dir) / RECORDS_DIR / f"{_safe(case_id)}.json"


def write_record(out_dir: Path, vol: CohortVolume, state: str, **fields: Any) -> None:
    """The volume's record in OUT/cohort-records/ (atomic): running, done, skipped or failed."""
    doc = {"case_id": vol.case_id, "image": vol.image, "output": vol.output_name, "state": state,
           "host": socket.gethostname(), "pid": os.getpid(),
           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **fields}
    path = record_path(out_dir, vol.case_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps(doc, indent=1, allow_nan=False).encode("utf-8"), root=Path(out_dir),
                       what="a cohort output folder")


def read_record(out_dir: Path, case_id: str) -> dict | None:
    try:
        return json.loads(record_path(out_dir, case_id).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------- one volume
@dataclass
class CohortSettings:
    """Everything a worker needs besides the models: the bank, OUT and the segmentation options."""

    bank: str
    out_dir: str
    bank_id: str
    bank_revision: int
    options: dict  # COHORT_OPTIONS plus precision, batch_size, encoder batch
    cache_dir: str | None = None
    cache_gb: float | None = None  # memory cache cap; None: $RSEG_MEMORY_CACHE_GB or 4 GB

    def to_json(self) -> dict:
        return dict(self.__dict__)


def expected_provenance(engine, settings: CohortSettings, precision: str) -> dict:
    """What a sidecar must say for its output to count as done by this run."""
    from .. import __version__

    return {
        "rseg_version": __version__, "sam2": engine.sam2_identity, "dinov2": engine.dinov2_identity,
        "random_weights": bool(engine.random_weights), "image_size": int(engine.sam.image_size),
        "precision": precision, "k": int(settings.options["k"]),
        "bank": {"bank_id": settings.bank_id, "revision": int(settings.bank_revision)},
        "cohort_options": {k: settings.options.get(k) for k in COHORT_OPTIONS},
    }


def _normalise(x: Any) -> Any:
    return json.loads(json.dumps(x))  # tuples -> lists, as they come back from a sidecar


def resume_reason(out_dir: Path, vol: CohortVolume, expected: dict) -> str | None:
    """None when the volume's output is done by this run's settings, else why it must be (re)done."""
    from ..segmentation.provenance import read_sidecar

    out = Path(out_dir) / vol.output_name
    if not out.is_file():
        return "no output yet"
    # A sidecar is a file anyone can edit: whatever does not parse as this run's provenance means
    # "not done" (the volume is segmented again and the sidecar rewritten), never a failure that
    # would come back on every run.
    try:
        prov = read_sidecar(out)["provenance"]
        if not isinstance(prov, dict):
            raise ValueError(f"its provenance is a {type(prov).__name__}, not an object")
    except Exception as e:  # noqa: BLE001 - KeyError, TypeError, RecursionError, OSError, ... alike
        return f"no usable sidecar ({type(e).__name__}: {str(e)[:200]})"
    for key, want in _normalise(expected).items():
        got = prov.get(key)
        if key == "bank" and isinstance(got, dict):
            got = {"bank_id": got.get("bank_id"), "revision": got.get("revision")}
        if got != want:
            return f"made with other settings ({key}: {repr(got)[:200]}, now {want!r})"
    if prov.get("output_sha256") != file_sha256(out):
        return "the output does not match the SHA-256 its sidecar records"
    return None


def _write_label_map(seg, path: Path) -> Path:
    from ..data.segnrrd import SegmentInfo, write_seg_nrrd
    from ..data.volume import write_volume

    if path.name.endswith(".seg.nrrd"):
        return write_seg_nrrd(seg.labelmap, [SegmentInfo(lab.value, lab.name, lab.color) for lab in seg.labels], path)
    return write_volume(seg.labelmap, path)


def segment_one(vol: CohortVolume, engine, bank: ReadOnlyBank, settings: CohortSettings,
                progress: Callable[[int, int], None] | None = None) -> dict:
    """Segment one volume (or skip it when resume says it is done); never raises for a bad volume.

    Returns {"case_id", "status": "segmented" | "skipped" | "failed", "seconds", "message", ...}.
    The label map and then its sidecar are written atomically; the stale sidecar of an older
    output is removed first, so an output and a sidecar that both exist always belong together.
    """
    from ..engine.sam2_memory import resolve_precision
    from ..segmentation.provenance import segmentation_provenance, sidecar_path, slice_records, write_sidecar
    from ..segmentation.segment import segment_volume
    from ..data.volume import read_volume

    out_dir = Path(settings.out_dir)
    opts = settings.options
    t0 = time.perf_counter()
    base = {"case_id": vol.case_id, "image": vol.image, "output": str(out_dir / vol.output_name)}
    try:
        precision = resolve_precision(opts.get("precision", "auto"), engine.sam.device)
        expected = expected_provenance(engine, settings, precision)
        reason = resume_reason(out_dir, vol, expected)
        if reason is None:
            return {**base, "status": "skipped", "seconds": 0.0, "message": "done earlier with the same settings"}
        write_record(out_dir, vol, "running", slices_done=0, slices_total=None, redo_reason=reason)
        if settings.cache_gb is not None:  # this run's own cap on its cache folder (RAM and disk)
            from ..engine.memory_cache import memory_cache_cap

            engine.memory_cache(bank, precision=precision, max_bytes=memory_cache_cap(settings.cache_gb))

        def on_progress(done: int, total: int) -> None:
            write_record(out_dir, vol, "running", slices_done=int(done), slices_total=int(total), redo_reason=reason)
            if progress is not None:
                progress(done, total)

        image = read_volume(vol.image)
        window = opts.get("window")
        seg = segment_volume(
            image, bank, engine, labels=opts.get("labels"), k=int(opts["k"]), axis=opts.get("axis", "auto"),
            slice_range=tuple(opts["slices"]) if opts.get("slices") else None, case_id=vol.case_id,
            case_policy=opts.get("case_policy", "ignore"), window=tuple(window) if window else None,
            encoder_batch=opts.get("encoder_batch"), progress=on_progress, precision=precision,
            batch_size=opts.get("batch_size"), extent_stop=int(opts.get("extent_stop", 0)),
            presence_threshold=float(opts.get("presence_threshold", 0.0)),
            support_order=opts.get("support_order") or "nearest", propagate=int(opts.get("propagate") or 0),
            support_filter=opts.get("support_filter") or "all",
        )
        out = out_dir / vol.output_name
        stale = sidecar_path(out)
        if stale.is_file() and not stale.is_symlink():
            stale.unlink()
        written = _write_label_map(seg, out)
        prov = segmentation_provenance(seg, engine, bank, k=int(opts["k"]), extra={
            "image": vol.image, "case_id": vol.case_id, "output_sha256": file_sha256(written),
            "cohort_options": expected["cohort_options"],
            "extent": {"stop": int(seg.extent_stop), "start_slices": [int(i) for i in seg.start_slices],
                       "beyond_extent": sorted(int(i) for i in seg.beyond_extent)},
        })
        write_sidecar(written, prov, slice_records(seg, tuple(opts["slices"]) if opts.get("slices") else None))
        seconds = round(time.perf_counter() - t0, 3)
        from ..segmentation.postprocess import label_statistics

        result = {**base, "status": "segmented", "seconds": seconds, "message": "",
                  "slices_segmented": len(seg.slices), "slices_beyond_extent": len(seg.beyond_extent),
                  # voxels and ml per label, as `rseg segment --statistics` (cohort-summary.json)
                  "statistics": label_statistics(seg.labelmap, seg.labels)}
        write_record(out_dir, vol, "done", seconds=seconds, slices_segmented=len(seg.slices))
        return result
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:  # noqa: BLE001 - one bad volume never stops the others
        return {**failed_result(vol, out_dir, f"{type(e).__name__}: {e}"),
                "seconds": round(time.perf_counter() - t0, 3)}


def unfinished_result(vol: CohortVolume, out_dir: Path, status: str, message: str, record: bool = True) -> dict:
    """The result of a volume that produced no output (writes are atomic), written to its record
    too unless `record` is False: "failed" (its worker died under it), "interrupted"."""
    if record:
        try:
            write_record(Path(out_dir), vol, status, message=message)
        except OSError:
            pass
    return {"case_id": vol.case_id, "image": vol.image, "output": str(Path(out_dir) / vol.output_name),
            "status": status, "seconds": 0.0, "message": message}


def failed_result(vol: CohortVolume, out_dir: Path, message: str) -> dict:
    """Record a volume that failed: its job raised, or its worker died under it (no output was
    written: writes are atomic)."""
    return unfinished_result(vol, out_dir, "failed", message)
