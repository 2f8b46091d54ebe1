"""Support bank format: schema constants, errors, LabelInfo/BankEntry/state and their
(de)serialisation, subject matching (docs/BANK_FORMAT.md)."""
from __future__ import annotations

import hashlib
import io
import re
import zipfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence, Union

import numpy as np

# A plain folder-name slug, as the memory cache names its folders (bank ids of schema 1 are read through it).
from ..engine.memory_cache import _sanitise

SCHEMA_VERSION = 2  # 2: the index lives in bank.db (SQLite); 1: bank.json + embeddings.npy
V1_SCHEMA = 1
BANK_FILE = "bank.json"  # schema 2: a small descriptor (version, id, index file), never rewritten
DB_FILE = "bank.db"
V1_BACKUP_PREFIX = "backup-v1-"
ENTRIES_DIR = "entries"
EMBEDDINGS_FILE = "embeddings.npy"
INDEX_FILE = "index.faiss"
LOCK_FILE = ".lock"
ENV_LOCK_TIMEOUT = "RSEG_BANK_LOCK_TIMEOUT"
DEFAULT_LOCK_TIMEOUT = 60.0
ORIGINS = ("initial", "correction")
CASE_POLICIES = ("exclude", "prefer", "ignore")
#: Characters that end a subject id inside a longer case id (`patient005` -> `patient005_frame01`).
SUBJECT_SEPARATORS = "_-. "
RETIRED_BY_USER = "user"

def same_subject(case_id: str, subject: str) -> bool:
    """Whether `case_id` and `subject` name the same patient/subject.

    Equal, or one is the other followed by a separator (`_`, `-`, `.`, space) and more:
    `patient005` and `patient005_frame01` match, `patient01` and `patient010` do not.
    """
    a, b = str(case_id), str(subject)
    if a == b:
        return True
    short, long_ = (a, b) if len(a) < len(b) else (b, a)
    return bool(short) and long_.startswith(short) and long_[len(short)] in SUBJECT_SEPARATORS


_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
#: A bank id names cache folders (`<cache>/<bank id>/`, `memories/<bank id>-r<revision>/`), so it must
#: be one plain folder name: never empty, '..', absolute or holding a separator.
_BANK_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def valid_bank_id(bank_id: object) -> bool:
    """Whether `bank_id` can name a folder of its own (letters, digits, '.', '_', '-'; at most 64)."""
    return isinstance(bank_id, str) and _BANK_ID_RE.fullmatch(bank_id) is not None


# ----------------------------------------------------------------------------- errors
class BankError(Exception):
    """Base class of support bank errors."""


class BankNotFoundError(BankError, FileNotFoundError):
    """The folder is missing or is not a support bank."""


class BankCorruptError(BankError):
    """A bank file is missing, unreadable or differs from what bank.json recorded."""

    def __init__(self, message: str, path: Path | None = None, missing: bool = False) -> None:
        super().__init__(message)
        self.path = path
        self.missing = missing


class BankSchemaError(BankError):
    """The bank was written by a newer RetrievalSeg (higher schema_version)."""


class BankModelMismatchError(BankError):
    """The bank's embeddings come from another DINOv2 model than the one in use."""


class BankReadOnlyError(BankError, PermissionError):
    """The bank cannot be changed by this user (read-only folder or file system)."""


class BankLockTimeout(BankError, TimeoutError):
    """Another process held the bank's write lock for longer than the timeout."""


class BlankSliceWarning(UserWarning):
    """A slice added as a support has one value everywhere: it shows nothing to the models."""


class UnknownEntryError(BankError, LookupError):
    """No entry with that id exists in the bank."""


# ----------------------------------------------------------------------------- data
class Embedder(Protocol):
    """What the bank needs from a slice embedder (RetrievalSegLib.engine.retrieval.SliceEmbedder).

    A bank that holds several retrieval features also needs `embed_features(images, features,
    progress=None) -> {feature: rows}` (several features from one pass; `edit.embed_features`)."""

    @property
    def identity(self) -> str: ...

    @property
    def dim(self) -> int: ...

    def embed(self, images_u8: Sequence[np.ndarray]) -> np.ndarray: ...


EmbedderSource = Union[Embedder, Callable[[], Embedder]]


@dataclass(frozen=True)
class LabelInfo:
    """One label of the bank: the value in label maps, a name and an RGB colour in 0..1."""

    value: int
    name: str
    color: tuple[float, float, float] = (1.0, 0.0, 0.0)

    def __post_init__(self) -> None:
        if isinstance(self.value, bool) or not isinstance(self.value, (int, np.integer)):
            raise ValueError(f"label value must be an integer, got {self.value!r}")
        if not 1 <= int(self.value) <= 2**31 - 1:
            raise ValueError(f"label value must be >= 1 (0 is background), got {self.value}")
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"label {self.value} needs a non-empty name, got {self.name!r}")
        color = tuple(float(c) for c in self.color)
        if len(color) != 3 or not all(0.0 <= c <= 1.0 for c in color):
            raise ValueError(
                f"label {self.value} ({self.name}) colour must be 3 numbers in 0..1, got {self.color!r}"
            )
        object.__setattr__(self, "value", int(self.value))
        object.__setattr__(self, "name", self.name.strip())
        object.__setattr__(self, "color", color)

    def to_json(self) -> dict[str, Any]:
        """The bank.json form of this label."""
        return {"value": self.value, "name": self.name, "color": list(self.color)}


@dataclass(frozen=True)
class BankEntry:
    """Metadata of one support slice, as listed in bank.json."""

    id: str
    case_id: str
    axis: int  # IJK slice axis: 0 = i, 1 = j, 2 = k
    index: int
    spacing: tuple[float, float]  # mm along (rows, columns) of the slice
    added: str  # ISO 8601 UTC
    origin: str  # "initial" | "correction"
    retired: bool
    retired_by: str | None  # id of the entry that replaced it, "user", or None
    sha256: str  # of entries/<id>.npz
    shape: tuple[int, int]
    labels_present: tuple[int, ...]
    window: tuple[float, float] | None = None  # intensity bounds that made `image`
    damaged: str | None = None  # set by verify --repair when its file is missing or corrupt

    @property
    def key(self) -> tuple[str, int, int]:
        """(case_id, axis, index): at most one active entry per key."""
        return (self.case_id, self.axis, self.index)

    @property
    def active(self) -> bool:
        """Not retired."""
        return not self.retired

    @property
    def usable(self) -> bool:
        """Active and not marked damaged: the entries search may return."""
        return not self.retired and self.damaged is None

    @property
    def status(self) -> str:
        """'active', 'retired' or 'damaged' (damaged wins)."""
        if self.damaged is not None:
            return "damaged"
        return "retired" if self.retired else "active"

    @property
    def file_name(self) -> str:
        """Path of the entry file relative to the bank folder."""
        return f"{ENTRIES_DIR}/{self.id}.npz"

    def to_json(self) -> dict[str, Any]:
        """The bank.json form of this entry."""
        d: dict[str, Any] = {
            "id": self.id,
            "case_id": self.case_id,
            "axis": self.axis,
            "index": self.index,
            "spacing": list(self.spacing),
            "added": self.added,
            "origin": self.origin,
            "retired": self.retired,
            "retired_by": self.retired_by,
            "sha256": self.sha256,
            "shape": list(self.shape),
            "labels_present": list(self.labels_present),
            "window": list(self.window) if self.window is not None else None,
        }
        if self.damaged is not None:
            d["damaged"] = self.damaged
        return d

    @classmethod
    def from_json(cls, d: Any, where: str) -> "BankEntry":
        """Parse one bank.json entry; BankCorruptError naming `where` when it is malformed."""
        try:
            if not isinstance(d, dict):
                raise ValueError("not an object")
            eid = str(d["id"])
            if not _ID_RE.fullmatch(eid):
                raise ValueError(f"id {eid!r} is not a valid entry id")
            axis, index = int(d["axis"]), int(d["index"])
            if axis not in (0, 1, 2) or index < 0:
                raise ValueError(f"axis {axis} / index {index} out of range")
            origin = str(d["origin"])
            if origin not in ORIGINS:
                raise ValueError(f"origin {origin!r} is not one of {ORIGINS}")
            sha = str(d["sha256"])
            if not _SHA_RE.fullmatch(sha):
                raise ValueError(f"sha256 {sha!r} is not a hex SHA-256")
            spacing = tuple(float(s) for s in d["spacing"])
            shape = tuple(int(s) for s in d["shape"])
            if len(spacing) != 2 or len(shape) != 2:
                raise ValueError("spacing and shape need 2 values")
            window = d.get("window")
            return cls(
                id=eid,
                case_id=str(d["case_id"]),
                axis=axis,
                index=index,
                spacing=spacing,  # type: ignore[arg-type]
                added=str(d["added"]),
                origin=origin,
                retired=bool(d["retired"]),
                retired_by=None if d.get("retired_by") is None else str(d["retired_by"]),
                sha256=sha,
                shape=shape,  # type: ignore[arg-type]
                labels_present=tuple(int(v) for v in d["labels_present"]),
                window=None if window is None else (float(window[0]), float(window[1])),
                damaged=None if d.get("damaged") is None else str(d["damaged"]),
            )
        except (KeyError, TypeError, ValueError, IndexError) as e:
            detail = f"missing key {e}" if isinstance(e, KeyError) else str(e)
            raise BankCorruptError(f"{where} is malformed: {detail}") from e


@dataclass
class EntryData:
    """The arrays of one entry: what the models see, the original intensities, one mask per label."""

    image: np.ndarray  # uint8 [H, W]
    intensities: np.ndarray  # [H, W], original dtype
    masks: dict[int, np.ndarray]  # label value -> bool [H, W]


@dataclass
class VerifyReport:
    """What `SupportBank.verify` found (and, with repair, did)."""

    path: Path
    entries_checked: int = 0
    missing: list[str] = field(default_factory=list)  # entry ids whose file is absent
    corrupt: dict[str, str] = field(default_factory=dict)  # entry id -> why (sha, unreadable...)
    embeddings_problem: str | None = None
    model_problem: str | None = None
    index_problem: str | None = None
    problems: list[str] = field(default_factory=list)  # what makes the bank not ok
    notes: list[str] = field(default_factory=list)  # harmless findings
    temp_files: list[str] = field(default_factory=list)
    orphan_files: list[str] = field(default_factory=list)
    memory_caches: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)  # links inside the bank (never followed)
    memory_problems: list[str] = field(default_factory=list)  # cached memories that fail their check
    actions: list[str] = field(default_factory=list)  # what repair did
    found_before_repair: list[str] = field(default_factory=list)
    repairable: int = 0  # problems `verify --repair` fixes (a damaged entry's or a link's it cannot)

    @property
    def ok(self) -> bool:
        """No problem left (notes such as leftover temp files do not count)."""
        return not self.problems

    @property
    def damaged(self) -> list[str]:
        """Ids of entries whose file is missing or corrupt."""
        return sorted(set(self.missing) | set(self.corrupt))

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable form."""
        return {
            "path": str(self.path),
            "ok": self.ok,
            "entries_checked": self.entries_checked,
            "missing": self.missing,
            "corrupt": self.corrupt,
            "embeddings_problem": self.embeddings_problem,
            "model_problem": self.model_problem,
            "index_problem": self.index_problem,
            "problems": self.problems,
            "notes": self.notes,
            "temp_files": self.temp_files,
            "orphan_files": self.orphan_files,
            "memory_caches": self.memory_caches,
            "links": self.links,
            "memory_problems": self.memory_problems,
            "actions": self.actions,
            "found_before_repair": self.found_before_repair,
            "repairable": self.repairable,
        }

    def summary(self) -> str:
        """Human-readable multi-line summary."""
        head = "OK" if self.ok else f"{len(self.problems)} problem(s)"
        lines = [f"support bank {self.path}: {self.entries_checked} entries checked, {head}"]
        if self.found_before_repair:
            lines.append("found:")
            lines += [f"  - {p}" for p in self.found_before_repair]
        if self.actions:
            lines.append("repaired:")
            lines += [f"  - {a}" for a in self.actions]
        if self.problems:
            lines.append("problems:" if not self.actions else "remaining problems:")
            lines += [f"  - {p}" for p in self.problems]
        if self.notes:
            lines.append("notes:")
            lines += [f"  - {n}" for n in self.notes]
        return "\n".join(lines)


@dataclass
class _State:
    """Parsed bank.json."""

    labels: tuple[LabelInfo, ...]
    dinov2: str
    sam2: list[str]
    entries: list[BankEntry]
    embedding_dim: int | None
    embeddings_sha256: str | None
    revision: int
    created: str
    bank_id: str | None = None
    schema: int = SCHEMA_VERSION
    # What a commit writes (schema 2): the entries as read (changed ones are new objects, so the
    # diff is by identity), embedding rows of new entries, or all rows (re-embed / rebuild).
    base: list[BankEntry] | None = None
    new_rows: dict[str, np.ndarray] = field(default_factory=dict)
    all_rows: np.ndarray | None = None
    action: str = ""
    # Further retrieval features the bank holds beside the primary one (`dinov2`'s), in the order
    # they were added; their rows live in bank.db's `feature_embeddings` (db.py). A commit writes
    # `new_feature_rows` (feature -> entry id -> row, for new entries) and `all_feature_rows`
    # (feature -> every row: an added or rebuilt feature); rows of a feature no longer listed go.
    features: tuple[str, ...] = ()
    new_feature_rows: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    all_feature_rows: dict[str, np.ndarray] = field(default_factory=dict)
    features_sha256: dict[str, str] = field(default_factory=dict)  # schema-1 form (export archives)

    def to_json(self) -> dict[str, Any]:
        """The schema-1 bank.json form (kept in the backup of an upgraded bank, and for tests)."""
        return {
            "schema_version": V1_SCHEMA,
            "bank_id": self.bank_id,
            "created": self.created,
            "revision": self.revision,
            "labels": [lab.to_json() for lab in self.labels],
            "dinov2": self.dinov2,
            "sam2": list(self.sam2),
            "embedding_dim": self.embedding_dim,
            "embeddings_sha256": self.embeddings_sha256,
            **({"features": [{"feature": f, "file": feature_file(f), "sha256": self.features_sha256.get(f)}
                             for f in self.features]} if self.features else {}),
            "entries": [e.to_json() for e in self.entries],
        }


@dataclass
class _Prepared:
    """One slice ready to be written: arrays, metadata and its embedding."""

    case_id: str
    axis: int
    index: int
    spacing: tuple[float, float]
    image: np.ndarray
    intensities: np.ndarray
    masks: dict[int, np.ndarray]
    window: tuple[float, float] | None
    embedding: np.ndarray | None = None  # the bank's primary feature's row
    features: dict[str, np.ndarray] = field(default_factory=dict)  # retrieval feature -> row




# ----------------------------------------------------------------------------- serialisation helpers
def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _rows_sha256(rows: np.ndarray) -> str:
    """Content hash of embedding rows (float32 little-endian, C order)."""
    return _sha256(np.ascontiguousarray(rows, dtype="<f4").tobytes())


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _npz_bytes(p: _Prepared, labels: Sequence[LabelInfo]) -> bytes:
    arrays: dict[str, np.ndarray] = {"image": p.image, "intensities": p.intensities}
    for lab in labels:
        arrays[f"mask_{lab.value}"] = p.masks.get(lab.value, np.zeros(p.image.shape, dtype=bool))
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def _nonfinite_ids(state: "_State", rows: np.ndarray) -> list[str]:
    """Ids of undamaged entries whose embedding row holds NaN or Inf."""
    if rows.size == 0:
        return []
    finite = np.isfinite(rows).all(axis=1)
    return [e.id for e, ok in zip(state.entries, finite) if not ok and e.damaged is None]


def _retrieval_feature(identity: str) -> str:
    """The retrieval feature an embedder identity names after '#' (none: cls, the default)."""
    _, sep, feature = str(identity).rpartition("#")
    return feature if sep else "cls"


#: A retrieval feature's name as the bank stores it (engine.retrieval.RETRIEVAL_FEATURES are all of this form).
_FEATURE_RE = re.compile(r"^[a-z][a-z+]{0,15}$")


def valid_feature(feature: object) -> bool:
    """Whether `feature` can be a retrieval feature's name (it names an archive member: never a path)."""
    return isinstance(feature, str) and _FEATURE_RE.fullmatch(feature) is not None


def feature_file(feature: str) -> str:
    """The export archive's member holding a further feature's rows (`embeddings-cls-mean.npy` for cls+mean)."""
    return f"embeddings-{feature.replace('+', '-')}.npy"


def _base_identity(identity: str) -> str:
    """An embedder identity without its retrieval feature: the DINOv2 model and input size (one pass)."""
    base, sep, _ = str(identity).rpartition("#")
    return base if sep else str(identity)


def _feature_identity(primary: str, feature: str) -> str:
    """The identity of `feature`'s embeddings from the same DINOv2 pass as `primary`'s (cls adds nothing)."""
    base = _base_identity(primary)
    return base if feature == "cls" else f"{base}#{feature}"


def _feature_dim(state: "_State", feature: str) -> int | None:
    """Row length of `feature` in this bank: DINOv2's width, twice for cls+mean (None before the first row)."""
    if state.embedding_dim is None:
        return None
    return feature_dim(state.embedding_dim, _retrieval_feature(state.dinov2), feature)


def feature_dim(dim: int, of: str, feature: str) -> int:
    """Row length of `feature` from the same DINOv2 pass as `of`'s rows of length `dim` (DINOv2's
    width, twice for cls+mean)."""
    return int(dim) // (2 if of == "cls+mean" else 1) * (2 if feature == "cls+mean" else 1)


def _add_feature_hint(path: Path, identity: str) -> str:
    """The command that adds `identity`'s feature to the bank at `path` (keeping what it holds)."""
    m = re.match(r"dinov2-([a-z_]+)", identity)
    size = f" --dinov2 {m.group(1)}" if m else ""
    random = " --random-weights" if "random" in identity else ""
    return f"`rseg bank reembed {path} --retrieval-feature {_retrieval_feature(identity)}{size}{random}`"


def _mismatch_message(path: Path, state: "_State", identity: str) -> str:
    """Why the bank at `path` cannot answer `identity`, with the command that makes it able to."""
    made_with = state.dinov2
    held = (_retrieval_feature(made_with),) + tuple(state.features)
    want = _retrieval_feature(identity)
    features = (f" (retrieval feature{'s' if len(held) > 1 else ''} {', '.join(held)} in the bank, {want} "
                "asked for: embeddings of two features are never mixed)") if want not in held else ""
    if _base_identity(identity) == _base_identity(made_with) and want not in held:
        fix = (f"add {want}'s embeddings with {_add_feature_hint(path, identity)} (keeps the others), or "
               f"replace the bank's with {_reembed_hint(path, identity)}")
    else:
        fix = f"re-embed it with {_reembed_hint(path, identity)}"
    return f"support bank at {path} was made with {made_with}, engine uses {identity}{features}: {fix}"


def _reembed_hint(path: Path, identity: str) -> str:
    m = re.match(r"dinov2-([a-z_]+)", identity)
    size = f" --dinov2 {m.group(1)}" if m else ""
    random = " --random-weights" if "random" in identity else ""
    feature = _retrieval_feature(identity)
    feat = f" --retrieval-feature {feature}" if feature != "cls" else ""
    return f"`rseg bank verify --reembed {path}{size}{feat}{random}`"



def _state_from_json(raw: Any, f: Path) -> _State:
    if not isinstance(raw, dict) or "schema_version" not in raw:
        raise BankCorruptError(f"{f} is not a support bank description (no schema_version)", f)
    version = raw["schema_version"]
    if not isinstance(version, int) or version < 1:
        raise BankCorruptError(f"{f} has an invalid schema_version {version!r}", f)
    if version > SCHEMA_VERSION:
        raise BankSchemaError(
            f"support bank at {f.parent} has schema version {version}, but this RetrievalSeg reads "
            f"versions up to {SCHEMA_VERSION}: update RetrievalSeg to use it"
        )
    if version == SCHEMA_VERSION:
        raise BankSchemaError(f"{f} describes a schema-{version} bank: its index is {DB_FILE}")
    try:
        labels = tuple(
            LabelInfo(int(d["value"]), str(d["name"]), tuple(d["color"]))  # type: ignore[arg-type]
            for d in raw["labels"]
        )
        dinov2 = str(raw["dinov2"])
        sam2 = [str(s) for s in raw.get("sam2", [])]
        entries_raw = raw["entries"]
        if not isinstance(entries_raw, list):
            raise ValueError("entries is not a list")
        dim = raw.get("embedding_dim")
        sha = raw.get("embeddings_sha256")
        extra = raw.get("features", [])  # an export archive's further features (never in a schema-1 bank)
        if not isinstance(extra, list) or not all(
                isinstance(d, dict) and valid_feature(d.get("feature")) and d.get("file") == feature_file(d["feature"])
                and isinstance(d.get("sha256"), str) and _SHA_RE.fullmatch(d["sha256"]) for d in extra):
            raise ValueError("features must list {feature, file, sha256} objects (as `rseg bank export` writes)")
        features = tuple(d["feature"] for d in extra)
        if len(set(features)) != len(features) or _retrieval_feature(str(raw["dinov2"])) in features:
            raise ValueError(f"features {list(features)} repeat a feature or the primary one")
        state = _State(
            labels=labels,
            dinov2=dinov2,
            sam2=sam2,
            entries=[BankEntry.from_json(d, f"{f} entry #{n}") for n, d in enumerate(entries_raw)],
            embedding_dim=None if dim is None else int(dim),
            embeddings_sha256=None if sha is None else str(sha),
            revision=int(raw.get("revision", 0)),
            created=str(raw.get("created", "")),
            bank_id=None if raw.get("bank_id") is None else _sanitise(str(raw["bank_id"]), 64),
            schema=V1_SCHEMA,
            features=features,
            features_sha256={d["feature"]: d["sha256"] for d in extra},
        )
    except BankCorruptError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        detail = f"missing key {e}" if isinstance(e, KeyError) else str(e)
        raise BankCorruptError(f"{f} is malformed: {detail}", f) from e
    ids = [e.id for e in state.entries]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise BankCorruptError(f"{f} lists entries {dup} more than once", f)
    return state


def _parse_entry_file(data: bytes, file: Path, entry: BankEntry, labels: Sequence[LabelInfo]) -> EntryData:
    """Arrays of an entry NPZ, validated against its metadata; never unpickles anything."""
    name = "?"
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            arrays: dict[str, np.ndarray] = {}
            for name in z.files:
                arrays[name] = z[name]
    except ValueError as e:
        if "pickle" in str(e).lower() or "object arrays" in str(e).lower():
            raise BankCorruptError(
                f"{file} holds a pickled Python object (array {name!r}); RetrievalSeg never loads "
                "pickles from a support bank because they can run code. This file was not written "
                "by RetrievalSeg: restore it from a backup, or retire the entry with "
                f"`rseg bank remove {file.parent.parent} {entry.id}`",
                file,
            ) from e
        raise BankCorruptError(f"{file} cannot be read as an entry file: {e}", file) from e
    except (zipfile.BadZipFile, OSError, EOFError, KeyError) as e:
        raise BankCorruptError(f"{file} cannot be read as an entry file: {type(e).__name__}: {e}", file) from e
    shape = tuple(entry.shape)
    for req in ("image", "intensities"):
        if req not in arrays:
            raise BankCorruptError(f"{file} has no {req!r} array", file)
    image, intensities = arrays["image"], arrays["intensities"]
    if image.dtype != np.uint8 or image.shape != shape:
        raise BankCorruptError(
            f"{file}: 'image' is {image.dtype} {image.shape}, bank.json says uint8 {shape}", file
        )
    if intensities.shape != shape or intensities.dtype.kind not in "biuf":
        raise BankCorruptError(
            f"{file}: 'intensities' is {intensities.dtype} {intensities.shape}, expected numbers {shape}", file
        )
    masks: dict[int, np.ndarray] = {}
    for lab in labels:
        key = f"mask_{lab.value}"
        m = arrays.get(key)
        if m is None:
            raise BankCorruptError(f"{file} has no {key!r} array for label {lab.value} ({lab.name})", file)
        if m.dtype != np.bool_ or m.shape != shape:
            raise BankCorruptError(f"{file}: {key!r} is {m.dtype} {m.shape}, expected bool {shape}", file)
        masks[lab.value] = m
    return EntryData(image=image, intensities=intensities, masks=masks)
