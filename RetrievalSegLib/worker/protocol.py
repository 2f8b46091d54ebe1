"""What the Slicer process and the model worker say to each other: JSON lines and .npy files.

No pickle anywhere: messages are UTF-8 JSON objects, one per line; arrays travel as `.npy` files
in the job's own folder, written and read with `allow_pickle=False` (an object array is refused).
Both sides import this module; it imports neither torch nor Slicer.

Parent -> worker (the worker's stdin)::

    {"type": "job", "id": ID, "kind": KIND, "folder": DIR, "params": {...}}
    {"type": "cancel", "id": ID}
    {"type": "shutdown"}

Worker -> parent (a private copy of the worker's stdout; its own fd 1 goes to the log, so a
library that prints cannot corrupt the channel)::

    {"type": "ready", "pid": N, "protocol": 1, "log": PATH}
    {"type": "started", "id": ID}
    {"type": "status", "id": ID, "message": TEXT, "elapsed_s": S}
        (+ "estimate": {...} once per segment job, after its first batch: `segment.TimeEstimate.to_json()`)
    {"type": "progress", "id": ID, "done": N, "total": N, "message": TEXT, "elapsed_s": S, "remaining_s": S|null}
    {"type": "diagnostics", "id": ID, "slices": [SLICE, ...]}
    {"type": "result", "id": ID, "result": {...}, "elapsed_s": S}
    {"type": "error", "id": ID, "message": TEXT, "error_type": NAME, "traceback": TEXT, "elapsed_s": S}
    {"type": "cancelled", "id": ID, "message": TEXT, "elapsed_s": S}
    {"type": "protocol_error", "message": TEXT}      (a line the worker could not understand)
    {"type": "exit", "reason": "idle" | "parent" | "shutdown" | "eof" | "orphaned"}

Every line from outside is untrusted: it is read with a bound (`read_frame`: a line longer than
`MAX_LINE_BYTES` is reported as soon as the bound is passed and then dropped, never held whole),
and every way it can fail to decode (not UTF-8, not JSON, nested too deeply for the parser, not
an object, an unknown type) is a `ProtocolError` that the reader reports and survives.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

PROTOCOL_VERSION = 1
#: Longest line either side accepts (a result's diagnostics for a 2,000-slice volume fit easily).
MAX_LINE_BYTES = 64 * 1024 * 1024
JOB_KINDS = ("load", "segment", "create_bank", "add_slices", "add_volume", "verify", "download", "suggest")
#: Message types each side may send.
TO_WORKER = ("job", "cancel", "shutdown")
FROM_WORKER = (
    "ready", "started", "status", "progress", "diagnostics", "result", "error", "cancelled",
    "protocol_error", "exit",
)
TERMINAL = ("result", "error", "cancelled")


class ProtocolError(ValueError):
    """A message that is not valid JSON, not an object, or of an unknown type."""


def encode(message: dict[str, Any]) -> bytes:
    """One message as a JSON line (UTF-8, newline-terminated)."""
    line = json.dumps(message, separators=(",", ":"), allow_nan=True)
    return line.encode("utf-8") + b"\n"


def decode(line: bytes | str, allowed: tuple[str, ...]) -> dict[str, Any]:
    """Parse one JSON line into a message whose "type" is one of `allowed`; ProtocolError if not."""
    if isinstance(line, bytes):
        if len(line) > MAX_LINE_BYTES:
            raise ProtocolError(f"message of {len(line)} bytes is longer than {MAX_LINE_BYTES}")
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ProtocolError(f"message is not UTF-8: {e}") from None
    try:
        message = json.loads(line)
    except json.JSONDecodeError as e:
        raise ProtocolError(f"message is not JSON ({e.msg}): {_excerpt(line)}") from None
    except RecursionError:  # e.g. "[" * 200000: json's parser recurses once per level
        raise ProtocolError(f"message is nested too deeply to parse: {_excerpt(line)}") from None
    except (ValueError, MemoryError) as e:  # e.g. an integer with too many digits
        raise ProtocolError(f"message cannot be parsed ({type(e).__name__}: {e}): {_excerpt(line)}") from None
    if not isinstance(message, dict):
        raise ProtocolError(f"message is not a JSON object: {_excerpt(line)}")
    kind = message.get("type")
    if kind not in allowed:
        raise ProtocolError(f"unknown message type {kind!r} (expected one of {', '.join(allowed)})")
    return message


class FrameTooLong(ProtocolError):
    """A line longer than the bound; the rest of it is skipped by the next `read_frame`."""


def read_frame(stream: BinaryIO, limit: int = MAX_LINE_BYTES, skipping: list[bool] | None = None) -> bytes | None:
    """The next line of at most `limit` bytes from a blocking binary stream; None at EOF.

    Never holds more than `limit` + 1 bytes: a longer line raises `FrameTooLong` as soon as the
    bound is passed (before its end has even been sent), and the following calls drop the rest of
    it up to its newline. `skipping` is the caller's one-element state ([False] to start).
    """
    state = skipping if skipping is not None else [False]
    while state[0]:  # the tail of a line already reported too long
        chunk = stream.readline(1 << 16)
        if not chunk:
            return None
        if chunk.endswith(b"\n"):
            state[0] = False
    line = stream.readline(limit + 1)
    if not line:
        return None
    if len(line) > limit:
        state[0] = not line.endswith(b"\n")
        raise FrameTooLong(f"message longer than {limit} bytes; it was dropped")
    return line


def _excerpt(text: str, limit: int = 120) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[:limit] + "..."


# ============================================================================ arrays
def save_array(folder: str | Path, name: str, array: np.ndarray) -> str:
    """Write `array` as `<folder>/<name>.npy` (never pickled); return the file name."""
    arr = np.asarray(array)
    if arr.dtype.hasobject:
        raise ValueError(f"array {name!r} holds Python objects; only plain numeric arrays travel")
    file_name = f"{name}.npy"
    np.save(Path(folder) / file_name, np.ascontiguousarray(arr), allow_pickle=False)
    return file_name


def load_array(folder: str | Path, file_name: Any) -> np.ndarray:
    """Read an array the other side wrote into the job folder (a plain file name, no pickle)."""
    if not isinstance(file_name, str) or not file_name.endswith(".npy") or os.path.basename(file_name) != file_name:
        raise ProtocolError(f"array reference must be a .npy file name inside the job folder, got {file_name!r}")
    path = Path(folder) / file_name
    if path.is_symlink():
        raise ProtocolError(f"array file {path} is a link; refusing to read through it")
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as e:  # numpy's message for an object array without allow_pickle
        raise ProtocolError(f"array file {path} cannot be read without pickle: {e}") from None


# ============================================================================ events and settings
@dataclass
class JobEvent:
    """One thing a job reported, as the Slicer process sees it."""

    kind: str  # "status", "progress", "diagnostics", "finished", "cancelled", "failed"
    message: str = ""
    done: int = 0
    total: int = 0
    elapsed_s: float = 0.0
    remaining_s: float | None = None  # estimated, once some progress is made
    estimate: dict | None = None  # a segment job's first-batch TimeEstimate (JSON), on one status event
    result: Any = None
    error: BaseException | None = None
    traceback: str = ""

    @property
    def terminal(self) -> bool:
        """True for the job's last event."""
        return self.kind in ("finished", "cancelled", "failed")


@dataclass(frozen=True)
class EngineSettings:
    """Which models to load and where from; equal settings reuse the loaded engine."""

    sam2_size: str = "sam2.1-tiny"  # a SAM 2 backbone (registry.SAM2_MODELS) or an old size name
    dinov2_size: str = "small"
    device: str = "auto"
    image_size: int | None = None  # None: the backbone's native size (1024 SAM 2.1, 512 MedSAM2)
    weights_dir: str | None = None  # a plain weights folder; None: $RSEG_WEIGHTS_DIR or the HF cache
    random_weights: bool = False  # tests and demos only: meaningless output
    seed: int = 0
    retrieval_feature: str = "cls"  # engine.retrieval.RETRIEVAL_FEATURES: part of the embedder identity

    def to_json(self) -> dict[str, Any]:
        """Plain JSON form (sent with every job)."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> "EngineSettings":
        """Settings from their JSON form; unknown keys are an error (a newer client, an older worker)."""
        if not isinstance(data, dict):
            raise ProtocolError(f"engine settings must be an object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ProtocolError(f"unknown engine settings {unknown}")
        return cls(**data)

    def load(self) -> Any:
        """Load the RetrievalEngine these settings describe (in the worker process)."""
        from ..engine.pipeline import RetrievalEngine

        kwargs: dict[str, Any] = {}
        if self.weights_dir and not self.random_weights:
            from ..models.weights import dinov2_folder_path, sam2_checkpoint_path

            kwargs["sam2_checkpoint"] = sam2_checkpoint_path(self.sam2_size, self.weights_dir)
            kwargs["dinov2_path"] = dinov2_folder_path(self.dinov2_size, self.weights_dir)
        return RetrievalEngine.load(
            self.sam2_size,
            self.dinov2_size,
            device=self.device,
            image_size=None if self.image_size is None else int(self.image_size),
            random_weights=self.random_weights,
            seed=self.seed,
            retrieval_feature=self.retrieval_feature,
            **kwargs,
        )

    def missing_downloads(self) -> list[Any]:
        """The weight files these settings need that are not in the weights folder yet."""
        if self.random_weights:
            return []
        from ..models.weights import is_complete, plan_downloads

        items = plan_downloads((self.sam2_size,), (self.dinov2_size,), dest_dir=self.weights_dir)
        return [it for it in items if not is_complete(it)]
