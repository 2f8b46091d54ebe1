"""Download, list and verify the model weights RetrievalSeg uses (SAM 2.1 and DINOv2).

Layout of the weights folder (`registry.weights_dir()`, or `dest_dir=`)::

    <dir>/sam2.1_hiera_tiny.pt
    <dir>/dinov2-small/config.json
    <dir>/dinov2-small/model.safetensors

A mirror ($RSEG_WEIGHTS_MIRROR or `mirror=`) is a base URL (http, https, file) or a local folder
laid out exactly like the weights folder. Without a mirror the official URLs are used.

Every download streams into `<file>.part` (resumed with an HTTP Range request when a partial file
exists), is checked against the announced length and, where known, its SHA-256 (the registry, or a
64-hex `X-Linked-Etag` / `ETag` header as Hugging Face sends for LFS files), is then loaded strictly
into the real architecture (`models.check_sam2_checkpoint` / `models.check_dinov2_folder`) and only
then moved into place with an atomic `os.replace`. Only the standard library touches the network;
nothing does when offline mode is on ($RSEG_OFFLINE=1 or `offline=True`).
"""
from __future__ import annotations

import http.client
import json
import os
import pickle
import re
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, Union

from .fileio import file_sha256, fsync_dir
from . import __version__
from .registry import (
    DINOV2_FILES,
    DINOV2_MODELS,
    ENV_MIRROR,
    ENV_OFFLINE,
    SAM2_MODELS,
    dinov2_spec,
    is_offline,
    sam2_spec,
    weights_dir,
)

DEFAULT_SAM2_SIZES: tuple[str, ...] = ("tiny",)
DEFAULT_DINOV2_SIZES: tuple[str, ...] = ("small",)
USER_AGENT = f"RetrievalSeg/{__version__} (+urllib)"
PART_SUFFIX = ".part"
CHUNK_SIZE = 1 << 20
#: Bytes kept free on the target disk beyond the file itself.
DISK_MARGIN = 64 << 20

#: callback(done_bytes, total_bytes or None when the server does not say, item name)
ProgressCallback = Callable[[int, Union[int, None], str], None]
SizesArg = Union[str, Iterable[str], None]

_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)
_CONTENT_RANGE_UNSAT = re.compile(r"^\s*bytes\s+\*/(\d+)\s*$", re.IGNORECASE)


# ----------------------------------------------------------------------------- errors
class WeightsError(RuntimeError):
    """Base class of every error this module raises on purpose."""


class OfflineError(WeightsError):
    """Weights are missing and offline mode forbids fetching them."""


class DownloadError(WeightsError):
    """The server could not be reached, refused the file, or sent too little."""

    def __init__(self, message: str, *, unavailable: bool = False) -> None:
        """`unavailable` marks errors where the source itself is unreachable or lacks the file."""
        super().__init__(message)
        self.unavailable = unavailable


class IntegrityError(WeightsError):
    """A downloaded file has the wrong checksum or does not load into its architecture."""


class DownloadCancelled(WeightsError):
    """The caller's cancel() returned True; the partial file is kept for a later resume."""


# ----------------------------------------------------------------------------- data
@dataclass(frozen=True)
class DownloadItem:
    """One file to fetch: where from, where to, and how to check it."""

    name: str  # path inside the weights folder, e.g. "dinov2-small/model.safetensors"
    url: str
    destination: Path
    sha256: str | None
    approx_mb: float
    kind: str  # "sam2" or "dinov2"
    model: str  # size key in the registry, e.g. "tiny"
    official_url: str

    @property
    def part_path(self) -> Path:
        """The partial file a download streams into."""
        return self.destination.with_name(self.destination.name + PART_SUFFIX)


@dataclass(frozen=True)
class WeightStatus:
    """Whether one model's weights are in the weights folder."""

    name: str  # file name (SAM 2) or folder name (DINOv2)
    kind: str
    model: str
    path: Path
    present: bool
    size: int  # bytes on disk of the complete files (0 when absent)
    partial: int  # bytes in leftover .part files (a download that can be resumed)

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        d = asdict(self)
        d["path"] = str(self.path)
        return d


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of strictly loading one model's weights."""

    name: str
    kind: str
    model: str
    path: Path
    status: str  # "ok", "failed" or "missing"
    message: str

    @property
    def ok(self) -> bool:
        """True when the weights loaded strictly."""
        return self.status == "ok"

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        d = asdict(self)
        d["path"] = str(self.path)
        d["ok"] = self.ok
        return d


# ----------------------------------------------------------------------------- planning
def _sizes(value: SizesArg) -> list[str]:
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    out: list[str] = []
    for s in items:
        s = s.strip()
        if s and s.lower() != "none" and s not in out:
            out.append(s)
    return out


def resolve_mirror(mirror: str | None = None) -> str | None:
    """Base URL of the mirror to use: `mirror`, else $RSEG_WEIGHTS_MIRROR, else None (official)."""
    raw = mirror if mirror is not None else os.environ.get(ENV_MIRROR, "")
    raw = raw.strip()
    if not raw:
        return None
    if "://" not in raw:  # a local folder laid out like the weights folder
        folder = Path(raw).expanduser()
        if not folder.is_dir():
            raise ValueError(
                f"weights mirror {raw!r} is neither a URL (http://, https://, file://) nor an "
                f"existing folder; fix {ENV_MIRROR} or the --mirror option"
            )
        return folder.resolve().as_uri()
    scheme = urllib.parse.urlsplit(raw).scheme.lower()
    if scheme not in ("http", "https", "file"):
        raise ValueError(f"weights mirror {raw!r} must be an http, https or file URL")
    return raw.rstrip("/")


def _join(base: str, name: str) -> str:
    return f"{base}/{urllib.parse.quote(name)}"


def plan_downloads(
    sam2_sizes: SizesArg = DEFAULT_SAM2_SIZES,
    dinov2_sizes: SizesArg = DEFAULT_DINOV2_SIZES,
    mirror: str | None = None,
    dest_dir: str | Path | None = None,
) -> list[DownloadItem]:
    """The files to fetch for these sizes (None or () for none), in download order."""
    base = resolve_mirror(mirror)
    root = Path(dest_dir).expanduser() if dest_dir is not None else weights_dir()
    items: list[DownloadItem] = []
    for size in _sizes(sam2_sizes):
        spec = sam2_spec(size)
        name = spec.filename
        items.append(
            DownloadItem(
                name=name,
                url=_join(base, name) if base else spec.url,
                destination=root / name,
                sha256=None,
                approx_mb=float(spec.approx_mb),
                kind="sam2",
                model=size,
                official_url=spec.url,
            )
        )
    for size in _sizes(dinov2_sizes):
        dspec = dinov2_spec(size)
        for filename in DINOV2_FILES:  # config.json first: the weights check needs it
            name = f"{dspec.folder_name}/{filename}"
            is_weights = filename.endswith(".safetensors")
            items.append(
                DownloadItem(
                    name=name,
                    url=_join(base, name) if base else dspec.url(filename),
                    destination=root / dspec.folder_name / filename,
                    sha256=dspec.safetensors_sha256 if is_weights else None,
                    approx_mb=float(dspec.approx_mb) if is_weights else 0.001,
                    kind="dinov2",
                    model=size,
                    official_url=dspec.url(filename),
                )
            )
    return items


def is_complete(item: DownloadItem) -> bool:
    """True when the item's final file exists (a finished, checked download)."""
    try:
        return item.destination.is_file() and item.destination.stat().st_size > 0
    except OSError:
        return False


def sam2_checkpoint_path(size: str, dest_dir: str | Path | None = None) -> Path:
    """Where the SAM 2.1 checkpoint of `size` lives in the weights folder."""
    root = Path(dest_dir).expanduser() if dest_dir is not None else weights_dir()
    return root / sam2_spec(size).filename


def dinov2_folder_path(size: str, dest_dir: str | Path | None = None) -> Path:
    """Where the DINOv2 folder of `size` lives in the weights folder."""
    root = Path(dest_dir).expanduser() if dest_dir is not None else weights_dir()
    return root / dinov2_spec(size).folder_name


# ----------------------------------------------------------------------------- messages
def offline_message(items: Sequence[DownloadItem], reason: str | None = None) -> str:
    """What to tell a user whose weights are missing while offline mode is on."""
    root = _common_root(items)
    reason = reason or f"{ENV_OFFLINE}={os.environ.get(ENV_OFFLINE, '1')}"
    lines = [f"offline mode is on ({reason}) and these weights are missing:"]
    for it in items:
        lines.append(f"  {it.destination}  ({_mb(it.approx_mb)}) from {it.url}")
    lines.append(
        "To get them: copy the files into "
        f"{root} with the same layout, or set {ENV_MIRROR} to a local folder laid out like it "
        f"(or to an intranet URL, and unset {ENV_OFFLINE}), or unset {ENV_OFFLINE} and run "
        "`rseg weights download`."
    )
    return "\n".join(lines)


def _common_root(items: Sequence[DownloadItem]) -> Path:
    for it in items:
        parts = Path(it.name).parts
        root = it.destination
        for _ in parts:
            root = root.parent
        return root
    return weights_dir()


def download_command(kind: str, model: str, force: bool = False) -> str:
    """The `rseg weights download` command that fetches exactly one model."""
    sam2, dinov2 = (model, "none") if kind == "sam2" else ("none", model)
    return f"rseg weights download --sam2 {sam2} --dinov2 {dinov2}" + (" --force" if force else "")


def _mb(mb: float) -> str:
    return "<1 MB" if mb < 1 else f"about {mb:.0f} MB"


def _host(url: str) -> str:
    return urllib.parse.urlsplit(url).netloc or url


# ----------------------------------------------------------------------------- download
class _Retry(Exception):
    """Internal: a transient failure (truncated body, dropped connection); resume may help."""

    def __init__(self, error: WeightsError) -> None:
        super().__init__(str(error))
        self.error = error


class _Restart(Exception):
    """Internal: the partial file cannot be resumed; start again from zero."""


class _RedirectRecorder(urllib.request.HTTPRedirectHandler):
    """Follows redirects like urllib does and remembers a SHA-256 announced on the way."""

    def __init__(self) -> None:
        super().__init__()
        self.sha256: str | None = None

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        """Record an `X-Linked-Etag` (Hugging Face LFS) before following the redirect."""
        digest = _sha_from_headers(headers)
        if digest and self.sha256 is None:
            self.sha256 = digest
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _sha_from_headers(headers: Any) -> str | None:
    if headers is None:
        return None
    for key in ("X-Linked-Etag", "ETag"):
        value = headers.get(key)
        if not value:
            continue
        value = value.strip()
        if value.startswith("W/"):  # weak validators say nothing about the bytes
            continue
        value = value.strip('"')
        if _HEX64.match(value):
            return value.lower()
    return None


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


class _Progress:
    """tqdm bar on stderr, a user callback, or nothing."""

    def __init__(self, progress: bool | ProgressCallback, name: str) -> None:
        self.callback = progress if callable(progress) else None
        self.enabled = bool(progress) and self.callback is None
        self.name = name
        self.bar: Any = None

    def start(self, done: int, total: int | None) -> None:
        if self.callback is not None:
            self.callback(done, total, self.name)
        elif self.enabled:
            try:
                from tqdm import tqdm
            except ImportError:  # pragma: no cover - tqdm is a declared dependency
                self.enabled = False
                return
            self.bar = tqdm(
                total=total, initial=done, unit="B", unit_scale=True, unit_divisor=1024,
                desc=self.name, file=sys.stderr, leave=True, dynamic_ncols=True,
            )

    def update(self, done: int, total: int | None, step: int) -> None:
        if self.callback is not None:
            self.callback(done, total, self.name)
        elif self.bar is not None:
            self.bar.update(step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _open(url: str, offset: int, timeout: float) -> tuple[Any, _RedirectRecorder]:
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    recorder = _RedirectRecorder()
    opener = urllib.request.build_opener(recorder)
    return opener.open(urllib.request.Request(url, headers=headers), timeout=timeout), recorder


def _fetch_to_part(
    item: DownloadItem,
    progress: bool | ProgressCallback,
    cancel: Callable[[], bool] | None,
    timeout: float,
    chunk_size: int,
) -> str | None:
    """Stream the item into its .part file; return a SHA-256 the server announced, if any."""
    part = item.part_path
    offset = part.stat().st_size if part.is_file() else 0
    if cancel is not None and cancel():
        raise DownloadCancelled(f"download of {item.name} cancelled before it started")
    try:
        resp, recorder = _open(item.url, offset, timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:
            m = _CONTENT_RANGE_UNSAT.match(e.headers.get("Content-Range", "") or "")
            if m and int(m.group(1)) == offset:  # the .part already holds the whole file
                return _sha_from_headers(e.headers)
            raise _Restart() from e
        hint = ""
        if e.code in (401, 403, 404):
            hint = (
                f" Check the URL (a mirror must be laid out like the weights folder: "
                f"<mirror>/{item.name}); the official location is {item.official_url}."
            )
        err = DownloadError(
            f"{item.name}: the server answered HTTP {e.code} {e.reason} for {item.url}.{hint}",
            unavailable=True,
        )
        if e.code >= 500 or e.code == 429:
            raise _Retry(err) from e
        raise err from e
    except urllib.error.URLError as e:
        if item.url.lower().startswith("file:"):
            raise DownloadError(
                f"{item.name}: not in the mirror folder ({item.url}: {e.reason}). A mirror must "
                f"be laid out like the weights folder: <mirror>/{item.name}",
                unavailable=True,
            ) from e
        raise _Retry(DownloadError(
            f"{item.name}: could not reach {_host(item.url)} ({e.reason}). Check the network or "
            f"proxy, or set {ENV_MIRROR} to a reachable mirror or local folder.",
            unavailable=True,
        )) from e
    except (OSError, http.client.HTTPException) as e:  # timeouts, resets during the handshake
        raise _Retry(DownloadError(
            f"{item.name}: connection to {_host(item.url)} failed ({type(e).__name__}: {e})",
            unavailable=True,
        )) from e

    bar = _Progress(progress, item.name)
    with resp:
        status = resp.status if getattr(resp, "status", None) else (resp.getcode() or 200)
        headers = resp.headers
        announced = recorder.sha256 or _sha_from_headers(headers)
        length_header = headers.get("Content-Length")
        body_len = int(length_header) if length_header and length_header.isdigit() else None
        if status == 206:
            m = _CONTENT_RANGE.match(headers.get("Content-Range", "") or "")
            if not offset or not m or int(m.group(1)) != offset:
                raise _Restart()  # a range we did not ask for: do not splice it in
            total = int(m.group(3)) if m.group(3) != "*" else None
        else:  # 200: the server ignored the Range header (or none was sent); start from zero
            offset = 0
            total = body_len
        _check_disk(item, total, offset)
        done = offset
        bar.start(done, total)
        try:
            with open(part, "ab" if offset else "wb") as f:
                truncated = False
                while True:
                    if cancel is not None and cancel():
                        f.flush()
                        os.fsync(f.fileno())
                        raise DownloadCancelled(
                            f"download of {item.name} cancelled after {done} bytes; the partial "
                            f"file {part} is kept and the next download resumes from it"
                        )
                    try:
                        chunk = resp.read(chunk_size)
                    except http.client.IncompleteRead as e:
                        chunk, truncated = e.partial, True
                    except (OSError, http.client.HTTPException):  # reset or timeout mid-body
                        chunk, truncated = b"", True
                    if chunk:
                        f.write(chunk)
                        done += len(chunk)
                        bar.update(done, total, len(chunk))
                    if truncated or not chunk:
                        break
                f.flush()
                os.fsync(f.fileno())
        finally:
            bar.close()
    if total is not None and done > total:
        _unlink(part)
        raise IntegrityError(
            f"{item.name}: {item.url} sent {done} bytes but announced {total}; the partial file "
            "was deleted"
        )
    if (total is not None and done < total) or (total is None and truncated):
        expected = f"{total}" if total is not None else "an unknown number of"
        raise _Retry(DownloadError(
            f"{item.name}: the connection to {_host(item.url)} ended early: received {done} of "
            f"{expected} bytes. The partial file {part} is kept; run the download again to resume."
        ))
    return announced


def _check_disk(item: DownloadItem, total: int | None, offset: int) -> None:
    if total is None:
        return
    need = total - offset
    try:
        free = shutil.disk_usage(item.destination.parent).free
    except OSError:
        return
    if need + DISK_MARGIN > free:
        raise DownloadError(
            f"{item.name}: not enough disk space in {item.destination.parent}: need "
            f"{need / 2**20:.0f} MB (+{DISK_MARGIN >> 20} MB margin), {free / 2**20:.0f} MB free. "
            f"Free some space or choose another folder (--dir or RSEG_WEIGHTS_DIR)."
        )


# Errors the strict loaders raise for a bad file (models.CheckpointError is a ValueError).
_LOAD_ERRORS = (ValueError, RuntimeError, pickle.UnpicklingError, EOFError, KeyError)


def _check_dinov2_config(path: Path, size: str) -> None:
    spec = dinov2_spec(size)
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"config.json is not valid JSON ({e})") from e
    if not isinstance(cfg, dict) or cfg.get("model_type") != "dinov2":
        got = cfg.get("model_type") if isinstance(cfg, dict) else type(cfg).__name__
        raise ValueError(f"config.json describes model_type {got!r}, not 'dinov2'")
    if cfg.get("hidden_size") != spec.hidden_size:
        raise ValueError(
            f"config.json has hidden_size {cfg.get('hidden_size')}, DINOv2 {size} has "
            f"{spec.hidden_size}"
        )


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _check_loadable(item: DownloadItem, candidate: Path) -> None:
    """Raise one of _LOAD_ERRORS unless `candidate` (the .part of `item`) loads strictly."""
    from . import models  # torch, sam2 and transformers load only when a check runs

    if item.kind == "sam2":
        models.check_sam2_checkpoint(candidate, item.model)
        return
    folder = item.destination.parent
    filename = item.destination.name
    if filename == "config.json":
        _check_dinov2_config(candidate, item.model)
    others = [f for f in DINOV2_FILES if f != filename]
    if not all((folder / f).is_file() for f in others):
        if filename == "config.json":
            return  # the weights are checked with this config when they arrive
        raise WeightsError(
            f"{item.name} cannot be checked: {folder} lacks "
            f"{', '.join(f for f in others if not (folder / f).is_file())}; download the whole "
            f"DINOv2 folder (`{download_command('dinov2', item.model)}`)"
        )
    with tempfile.TemporaryDirectory(prefix=".verify-", dir=folder) as tmp:
        staging = Path(tmp)
        _link_or_copy(candidate, staging / filename)
        for f in others:
            _link_or_copy(folder / f, staging / f)
        models.check_dinov2_folder(staging, item.model)


class _DownloadLock:
    """An exclusive, non-blocking lock on `<file>.lock` (released if the process dies)."""

    def __init__(self, item: DownloadItem) -> None:
        self.item = item
        self.path = item.destination.with_name(item.destination.name + ".lock")
        self.fd: int | None = None

    def __enter__(self) -> "_DownloadLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if os.name == "nt":
                import msvcrt

                msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            else:
                import fcntl

                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise DownloadError(
                f"{self.item.name}: another download of this file is in progress (lock "
                f"{self.path}); wait for it to finish, then run the download again"
            ) from None
        self.fd = fd
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink()  # while still held, so nobody else is using it
        except OSError:
            pass  # Windows cannot delete an open file; an unlocked leftover is harmless
        if os.name == "nt":
            import msvcrt

            try:
                msvcrt.locking(self.fd, msvcrt.LK_UNLCK, 1)
            except OSError:
                pass
        os.close(self.fd)
        self.fd = None


def _download_one(
    item: DownloadItem,
    progress: bool | ProgressCallback,
    cancel: Callable[[], bool] | None,
    retries: int,
    retry_delay: float,
    timeout: float,
    chunk_size: int,
    force: bool,
) -> Path:
    item.destination.parent.mkdir(parents=True, exist_ok=True)
    with _DownloadLock(item):
        if not force and is_complete(item):  # another process finished it meanwhile
            return item.destination
        return _download_locked(item, progress, cancel, retries, retry_delay, timeout, chunk_size)


def _download_locked(
    item: DownloadItem,
    progress: bool | ProgressCallback,
    cancel: Callable[[], bool] | None,
    retries: int,
    retry_delay: float,
    timeout: float,
    chunk_size: int,
) -> Path:
    part = item.part_path
    failures = restarts = 0
    while True:
        try:
            announced = _fetch_to_part(item, progress, cancel, timeout, chunk_size)
            break
        except _Restart:
            _unlink(part)
            restarts += 1
            if restarts > 2:
                raise DownloadError(
                    f"{item.name}: {item.url} keeps answering with a range that does not continue "
                    f"the partial file; download it by hand into {item.destination}"
                ) from None
        except _Retry as r:
            failures += 1
            if failures > retries:
                raise r.error from r.__cause__
            time.sleep(retry_delay * 2 ** (failures - 1))

    expected = (item.sha256 or announced or "").lower() or None
    if expected:
        actual = file_sha256(part)
        if actual != expected:
            _unlink(part)
            source = "the registry" if item.sha256 else "the server's ETag"
            raise IntegrityError(
                f"{item.name} from {item.url} is corrupt: SHA-256 {actual}, expected {expected} "
                f"(from {source}). The file was deleted; run the download again, and if it "
                "fails the same way, check the mirror's copy."
            )
    try:
        _check_loadable(item, part)
    except _LOAD_ERRORS as e:
        _unlink(part)
        what = f"SAM 2.1 {item.model}" if item.kind == "sam2" else f"DINOv2 {item.model}"
        raise IntegrityError(
            f"{item.name} from {item.url} does not load as {what}: {str(e).rstrip('.')}. "
            "The file was deleted; "
            "run the download again, and if it fails the same way, check the mirror's copy."
        ) from e
    os.replace(part, item.destination)
    fsync_dir(item.destination.parent)
    return item.destination


def check_offline(items: Sequence[DownloadItem], offline: bool | None = None) -> None:
    """Raise OfflineError naming the files if offline mode is on and any item needs the network."""
    reason = "offline=True" if offline else None
    offline = is_offline() if offline is None else offline
    if offline:
        remote = [it for it in items if not it.url.lower().startswith("file:")]
        if remote:
            raise OfflineError(offline_message(remote, reason))


def download(
    items: Sequence[DownloadItem] | None = None,
    *,
    sam2_sizes: SizesArg = DEFAULT_SAM2_SIZES,
    dinov2_sizes: SizesArg = DEFAULT_DINOV2_SIZES,
    dest_dir: str | Path | None = None,
    mirror: str | None = None,
    progress: bool | ProgressCallback = True,
    cancel: Callable[[], bool] | None = None,
    offline: bool | None = None,
    force: bool = False,
    retries: int = 2,
    retry_delay: float = 1.0,
    timeout: float = 30.0,
    chunk_size: int = CHUNK_SIZE,
) -> list[Path]:
    """Fetch, check and place the weights (`items`, else those of the sizes); return their paths."""
    if items is None:
        items = plan_downloads(sam2_sizes, dinov2_sizes, mirror=mirror, dest_dir=dest_dir)
    elif dest_dir is not None or mirror is not None:
        raise ValueError("dest_dir and mirror apply when planning; pass them to plan_downloads()")
    todo = [it for it in items if force or not is_complete(it)]
    # A DINOv2 config.json goes before its weights: the weights are checked by loading with it.
    todo.sort(key=lambda it: 0 if it.destination.name == "config.json" else 1)
    check_offline(todo, offline)
    for it in todo:
        _download_one(it, progress, cancel, retries, retry_delay, timeout, chunk_size, force)
    return [it.destination for it in items]


# ----------------------------------------------------------------------------- list / verify
def _all_entries(
    dest_dir: str | Path | None, sam2_sizes: Iterable[str], dinov2_sizes: Iterable[str]
) -> list[tuple[str, str, str, Path, list[Path]]]:
    root = Path(dest_dir).expanduser() if dest_dir is not None else weights_dir()
    out = []
    for size in sam2_sizes:
        spec = sam2_spec(size)
        path = root / spec.filename
        out.append((spec.filename, "sam2", size, path, [path]))
    for size in dinov2_sizes:
        dspec = dinov2_spec(size)
        folder = root / dspec.folder_name
        out.append((dspec.folder_name, "dinov2", size, folder, [folder / f for f in DINOV2_FILES]))
    return out


def _size_of(path: Path) -> int:
    try:
        return path.stat().st_size if path.is_file() else 0
    except OSError:
        return 0


def list_weights(dest_dir: str | Path | None = None) -> list[WeightStatus]:
    """Every model in the catalogue with whether its files are in the weights folder."""
    out = []
    for name, kind, model, path, files in _all_entries(dest_dir, SAM2_MODELS, DINOV2_MODELS):
        present = all(_size_of(f) > 0 for f in files)
        size = sum(_size_of(f) for f in files)
        partial = sum(_size_of(f.with_name(f.name + PART_SUFFIX)) for f in files)
        out.append(WeightStatus(name, kind, model, path, present, size, partial))
    return out


def verify(
    dest_dir: str | Path | None = None,
    sam2_sizes: SizesArg = None,
    dinov2_sizes: SizesArg = None,
    *,
    check_sha: bool = True,
) -> list[VerifyResult]:
    """Strictly load weights: the named sizes (absent ones reported), else every present model."""
    explicit = sam2_sizes is not None or dinov2_sizes is not None
    s_sizes = _sizes(sam2_sizes) if explicit else list(SAM2_MODELS)
    d_sizes = _sizes(dinov2_sizes) if explicit else list(DINOV2_MODELS)
    results: list[VerifyResult] = []
    for name, kind, model, path, files in _all_entries(dest_dir, s_sizes, d_sizes):
        have = [f for f in files if _size_of(f) > 0]
        if not have:
            if explicit:
                results.append(VerifyResult(
                    name, kind, model, path, "missing",
                    f"not found; run `{download_command(kind, model)}`",
                ))
            continue
        if len(have) < len(files):
            lacking = ", ".join(f.name for f in files if f not in have)
            results.append(VerifyResult(
                name, kind, model, path, "failed",
                f"incomplete: {lacking} missing; run `{download_command(kind, model)}`",
            ))
            continue
        results.append(_verify_one(name, kind, model, path, check_sha))
    return results


def _verify_one(name: str, kind: str, model: str, path: Path, check_sha: bool) -> VerifyResult:
    from . import models

    try:
        if kind == "sam2":
            models.check_sam2_checkpoint(path, model)
        else:
            models.check_dinov2_folder(path, model)
    except _LOAD_ERRORS as e:
        return VerifyResult(
            name, kind, model, path, "failed",
            f"{str(e).rstrip('.')} (replace it: `{download_command(kind, model, True)}`)",
        )
    message = "loads strictly"
    known = DINOV2_MODELS[model].safetensors_sha256 if kind == "dinov2" else None
    if check_sha and known:
        actual = file_sha256(path / "model.safetensors")
        if actual == known.lower():
            message += "; SHA-256 matches the published file"
        else:
            message += (
                f"; SHA-256 {actual} differs from the published {known} (not the official "
                "weights: a fine-tuned copy, or corrupt in a way that still loads)"
            )
    return VerifyResult(name, kind, model, path, "ok", message)


__all__ = [
    "DEFAULT_DINOV2_SIZES",
    "DEFAULT_SAM2_SIZES",
    "DownloadCancelled",
    "DownloadError",
    "DownloadItem",
    "IntegrityError",
    "OfflineError",
    "ProgressCallback",
    "VerifyResult",
    "WeightStatus",
    "WeightsError",
    "check_offline",
    "dinov2_folder_path",
    "download_command",
    "download",
    "is_complete",
    "list_weights",
    "offline_message",
    "plan_downloads",
    "resolve_mirror",
    "sam2_checkpoint_path",
    "verify",
]
