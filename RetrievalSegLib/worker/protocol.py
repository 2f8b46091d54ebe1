"""What the Slicer process and the model worker say to each other: JSON lines and .npy frames.

No pickle anywhere: messages are UTF-8 JSON objects, one per line; arrays travel in the stream
itself as length-prefixed `.npy` frames (an "array" line that gives the payload's size, then
exactly that many bytes), read with `allow_pickle=False` (an object array is refused), their
sizes checked against `MAX_ARRAY_BYTES` before anything is allocated, optionally compressed
(zlib). The same stream works through a local pipe and through `ssh` (`worker.remote`): the
worker never reads or writes the client's files. On the client, a job's arrays are staged as
`.npy` files in its own temporary folder (`save_array` / `load_array`); the client sends every
`.npy` file of that folder before the job, and writes the result's arrays into it.
Both sides import this module; it imports neither torch nor Slicer.

Parent -> worker (the worker's stdin)::

    {"type": "array", "id": ID, "name": NAME.npy, "bytes": N, "encoding": "npy" | "npy+zlib"} + N bytes
    {"type": "job", "id": ID, "kind": KIND, "arrays": [NAME.npy, ...], "compress": BOOL, "params": {...}}
    {"type": "cancel", "id": ID}
    {"type": "shutdown"}

Worker -> parent (a private copy of the worker's stdout; its own fd 1 goes to the log, so a
library that prints cannot corrupt the channel)::

    {"type": "ready", "pid": N, "protocol": 2, "version": RETRIEVALSEG_VERSION, "log": PATH}
    {"type": "array", "id": ID, "name": NAME.npy, "bytes": N, "encoding": ...} + N bytes  (before "result")
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

import io
import json
import os
import re
import zlib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

PROTOCOL_VERSION = 2
#: Largest array (its .npy bytes, after decompression) either side accepts; checked before allocating.
MAX_ARRAY_BYTES = int(os.environ.get("RSEG_MAX_ARRAY_BYTES") or 8 << 30)
ARRAY_ENCODINGS = ("npy", "npy+zlib")
_ARRAY_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,100}\.npy")
#: Longest line either side accepts (a result's diagnostics for a 2,000-slice volume fit easily).
MAX_LINE_BYTES = 64 * 1024 * 1024
JOB_KINDS = ("load", "segment", "create_bank", "add_slices", "add_volume", "verify", "download", "suggest",
             "bank_info")
#: Message types each side may send.
TO_WORKER = ("array", "job", "cancel", "shutdown")
FROM_WORKER = (
    "array", "ready", "started", "status", "progress", "diagnostics", "result", "error", "cancelled",
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


# ============================================================================ array frames
def array_frame(job_id: str, name: str, npy: bytes, compress: bool = False) -> bytes:
    """One array as a frame: its header line, then the payload (`.npy` bytes, zlib'd if `compress`)."""
    check_array_name(name)
    payload = zlib.compress(npy, 1) if compress else npy
    header = {"type": "array", "id": job_id, "name": name, "bytes": len(payload),
              "encoding": "npy+zlib" if compress else "npy"}
    return encode(header) + payload


def npy_bytes(array: np.ndarray) -> bytes:
    """An array's `.npy` serialisation (never pickled)."""
    arr = np.asarray(array)
    if arr.dtype.hasobject:
        raise ValueError("array holds Python objects; only plain numeric arrays travel")
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def check_array_name(name: Any) -> str:
    """A plain `.npy` file name (no folder, no link tricks); ProtocolError if not."""
    if not isinstance(name, str) or not _ARRAY_NAME.fullmatch(name):
        raise ProtocolError(f"array name must be a plain .npy file name, got {name!r}")
    return name


def array_frame_size(header: dict[str, Any], limit: int | None = None) -> int:
    """The payload size an "array" header announces, checked against the limit before any allocation."""
    limit = MAX_ARRAY_BYTES if limit is None else limit
    size = header.get("bytes")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ProtocolError(f"array frame size must be a non-negative integer, got {size!r}")
    if size > limit:
        raise FrameTooLong(f"array frame of {size} bytes is larger than the limit of {limit} bytes "
                           "(RSEG_MAX_ARRAY_BYTES)")
    return size


def array_from_frame(header: dict[str, Any], payload: bytes, limit: int | None = None) -> tuple[str, bytes, np.ndarray]:
    """(name, .npy bytes, array) of one received frame; ProtocolError for anything but a plain array."""
    limit = MAX_ARRAY_BYTES if limit is None else limit
    name = check_array_name(header.get("name"))
    encoding = header.get("encoding")
    if encoding not in ARRAY_ENCODINGS:
        raise ProtocolError(f"array {name}: unknown encoding {encoding!r} (expected one of {ARRAY_ENCODINGS})")
    data = payload
    if encoding == "npy+zlib":
        d = zlib.decompressobj()
        try:
            data = d.decompress(payload, limit + 1)  # never more than the limit, whatever it claims
        except zlib.error as e:
            raise ProtocolError(f"array {name}: not valid zlib data ({e})") from None
        if len(data) > limit:
            raise FrameTooLong(f"array {name} decompresses to more than the limit of {limit} bytes")
        if not d.eof or d.unused_data:
            raise ProtocolError(f"array {name}: the compressed payload is truncated or has trailing bytes")
    buf = io.BytesIO(data)
    try:
        major, _ = np.lib.format.read_magic(buf)
        if major == 1:
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(buf)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(buf)
    except (ValueError, OSError) as e:
        raise ProtocolError(f"array {name}: not an .npy payload ({e})") from None
    if dtype.hasobject:
        raise ProtocolError(f"array {name} holds Python objects and cannot be read without pickle; "
                            "only plain numeric arrays travel")
    count = 1
    for n in shape:
        count *= int(n)
    if buf.tell() + count * dtype.itemsize != len(data):
        raise ProtocolError(f"array {name}: {len(data)} bytes do not hold a {dtype} array of shape {shape}")
    buf.seek(0)
    try:
        array = np.load(buf, allow_pickle=False)
    except ValueError as e:
        raise ProtocolError(f"array {name} cannot be read without pickle: {e}") from None
    return name, data, array


def read_exact(stream: BinaryIO, size: int) -> bytes | None:
    """Exactly `size` bytes from a blocking stream; None at EOF before they all came."""
    parts: list[bytes] = []
    left = size
    while left > 0:
        chunk = stream.read(min(left, 1 << 20))
        if not chunk:
            return None
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def skip_exact(stream: BinaryIO, size: int) -> bool:
    """Read and drop `size` bytes (a refused frame's payload) without holding them; False at EOF."""
    left = size
    while left > 0:
        chunk = stream.read(min(left, 1 << 20))
        if not chunk:
            return False
        left -= len(chunk)
    return True


class FrameReader:
    """Incremental reader of what arrives on a non-blocking pipe: JSON lines and array frames.

    `feed` bytes as they come; `messages()` returns the complete messages so far (an "array"
    message carries its checked payload as "npy" bytes and "array"), and raises ProtocolError at
    the first thing that cannot be read. `bounded()` says whether reading more is within the
    limits (a line without its newline past `MAX_LINE_BYTES` is decided without reading more).
    """

    def __init__(self, allowed: tuple[str, ...], array_limit: int | None = None) -> None:
        self.allowed = allowed
        self.array_limit = MAX_ARRAY_BYTES if array_limit is None else array_limit
        self.buffer = bytearray()
        self._header: dict[str, Any] | None = None
        self._size = 0

    def feed(self, data: bytes) -> None:
        self.buffer += data

    def bounded(self) -> bool:
        if self._header is not None:
            return len(self.buffer) < self._size + MAX_LINE_BYTES
        return len(self.buffer) <= MAX_LINE_BYTES + (1 << 16) or b"\n" in self.buffer

    def messages(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while True:
            if self._header is not None:
                if len(self.buffer) < self._size:
                    return out
                payload = bytes(self.buffer[:self._size])
                del self.buffer[:self._size]
                header, self._header = self._header, None
                name, npy, array = array_from_frame(header, payload, self.array_limit)
                out.append({**header, "name": name, "npy": npy, "array": array})
                continue
            end = self.buffer.find(b"\n")
            if end < 0:
                if len(self.buffer) > MAX_LINE_BYTES:
                    raise FrameTooLong(f"message longer than {MAX_LINE_BYTES} bytes")
                return out
            line = bytes(self.buffer[:end])
            del self.buffer[:end + 1]
            if not line.strip():
                continue
            message = decode(line, self.allowed)
            if message["type"] == "array":
                self._size = array_frame_size(message, self.array_limit)
                self._header = message
                continue
            out.append(message)


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
