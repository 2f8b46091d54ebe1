"""Download, list and verify the model weights RetrievalSeg uses (SAM 2.1, MedSAM2, DINOv2).

Downloads go through `huggingface_hub.hf_hub_download`; this module holds no HTTP code. Files come
from the Hub repositories in `registry` (`facebook/sam2.1-hiera-<size>`, `wanglab/MedSAM2`,
`facebook/dinov2-<size>`)
and land in one of two places:

* the Hugging Face cache (`$HF_HOME/hub`, shared with transformers and other tools), by default;
* a plain weights folder, when one is given (`dest_dir=`, `--dir`, $RSEG_WEIGHTS_DIR, the Slicer
  *Weights folder*), laid out for air-gapped sites that copy files by hand::

    <dir>/sam2.1_hiera_tiny.pt
    <dir>/dinov2-small/config.json
    <dir>/dinov2-small/model.safetensors

What the library does: the endpoint ($HF_ENDPOINT, which $RSEG_WEIGHTS_MIRROR sets), offline mode
($HF_HUB_OFFLINE, which $RSEG_OFFLINE sets), locking of its cache, a process-unique temporary file
renamed into place, resuming within a download when the connection drops (HTTP Range), the length
check, and Xet transfers where the server offers them (a plain HTTP mirror does not need them).
What we add: consent and sizes before anything is fetched (`plan_downloads`), progress and cancel
(`progress=`, `cancel=`), a SHA-256 check against the Hub's ETag where it is one (LFS files), the
strict load of every file into its real architecture (`models.check_sam2_checkpoint`,
`models.check_dinov2_folder`, `torch.load(weights_only=True)`), and removal of a file that fails.
"""
from __future__ import annotations

import json
import os
import pickle
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, Union

from .. import __version__
from ..data.fileio import file_sha256
from .registry import (
    DINOV2_FILES,
    DINOV2_MODELS,
    ENV_MIRROR,
    ENV_OFFLINE,
    ENV_WEIGHTS_DIR,
    HUB_REVISION,
    SAM2_MODELS,
    cached_hub_file,
    dinov2_spec,
    hub_cache_dir,
    hub_endpoint,
    hub_url,
    is_offline,
    offline_reason,
    resolve_mirror,
    sam2_spec,
    weights_dir,
    weights_location,
)

DEFAULT_SAM2_SIZES: tuple[str, ...] = ("sam2.1-tiny",)
DEFAULT_DINOV2_SIZES: tuple[str, ...] = ("small",)

#: callback(done_bytes, total_bytes or None when the server does not say, item name)
ProgressCallback = Callable[[int, Union[int, None], str], None]
SizesArg = Union[str, Iterable[str], None]


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
    """The caller's cancel() returned True; the partial file is discarded."""


# ----------------------------------------------------------------------------- data
@dataclass(frozen=True)
class DownloadItem:
    """One file to fetch: which Hub file, where it goes, and how to check it."""

    name: str  # path inside a weights folder, e.g. "dinov2-small/model.safetensors"
    repo_id: str  # e.g. "facebook/dinov2-small"
    filename: str  # file inside the repository, e.g. "model.safetensors"
    url: str  # the resolve URL on the endpoint in use (shown to the user)
    endpoint: str
    local_dir: Path | None  # plain weights folder of this file (None: the Hugging Face cache)
    sha256: str | None  # published SHA-256 where the registry knows it
    approx_mb: float
    kind: str  # "sam2" or "dinov2"
    model: str  # name in the registry, e.g. "sam2.1-tiny", "medsam2", "small" (DINOv2)

    @property
    def destination(self) -> Path | None:
        """The file in the plain weights folder, or None when the item goes to the cache."""
        return self.local_dir / self.filename if self.local_dir is not None else None

    @property
    def where(self) -> str:
        """Where the file lands, in words (for plans and messages)."""
        if self.destination is not None:
            return str(self.destination)
        return f"{hub_cache_dir()} ({self.repo_id})"


@dataclass(frozen=True)
class WeightStatus:
    """Whether one model's weights are present (plain folder or Hugging Face cache)."""

    name: str  # file name (SAM 2) or folder name (DINOv2)
    kind: str
    model: str
    path: Path | None  # the file or folder when present (a cache snapshot path for the cache)
    present: bool
    size: int  # bytes on disk of the complete files (0 when absent)
    location: str  # "folder" or "cache"

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        d = asdict(self)
        d["path"] = str(self.path) if self.path is not None else None
        return d


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of strictly loading one model's weights."""

    name: str
    kind: str
    model: str
    path: Path | None
    status: str  # "ok", "failed" or "missing"
    message: str

    @property
    def ok(self) -> bool:
        """True when the weights loaded strictly."""
        return self.status == "ok"

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        d = asdict(self)
        d["path"] = str(self.path) if self.path is not None else None
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


def _root(dest_dir: str | Path | None) -> Path | None:
    return Path(dest_dir).expanduser() if dest_dir is not None else weights_dir()


def plan_downloads(
    sam2_sizes: SizesArg = DEFAULT_SAM2_SIZES,
    dinov2_sizes: SizesArg = DEFAULT_DINOV2_SIZES,
    mirror: str | None = None,
    dest_dir: str | Path | None = None,
) -> list[DownloadItem]:
    """The files to fetch for these sizes (None or () for none), in download order; no network.

    `dest_dir` (else $RSEG_WEIGHTS_DIR) selects a plain weights folder; without one the files go to
    the Hugging Face cache. `mirror` (else $RSEG_WEIGHTS_MIRROR, else $HF_ENDPOINT) is the Hub
    endpoint.
    """
    endpoint = hub_endpoint(mirror)
    root = _root(dest_dir)
    items: list[DownloadItem] = []
    for name in dict.fromkeys(sam2_spec(s).name for s in _sizes(sam2_sizes)):  # aliases -> names
        spec = sam2_spec(name)
        items.append(DownloadItem(
            name=spec.filename, repo_id=spec.repo_id, filename=spec.filename,
            url=hub_url(spec.repo_id, spec.filename, endpoint), endpoint=endpoint,
            local_dir=root, sha256=None, approx_mb=float(spec.approx_mb), kind="sam2", model=name,
        ))
    for size in _sizes(dinov2_sizes):
        dspec = dinov2_spec(size)
        for filename in DINOV2_FILES:  # config.json first: the weights check needs it
            is_weights = filename.endswith(".safetensors")
            items.append(DownloadItem(
                name=f"{dspec.folder_name}/{filename}", repo_id=dspec.repo_id, filename=filename,
                url=hub_url(dspec.repo_id, filename, endpoint), endpoint=endpoint,
                local_dir=root / dspec.folder_name if root is not None else None,
                sha256=dspec.safetensors_sha256 if is_weights else None,
                approx_mb=float(dspec.approx_mb) if is_weights else 0.001,
                kind="dinov2", model=size,
            ))
    return items


def local_path(item: DownloadItem) -> Path | None:
    """Where the item's file is now (plain folder or cache), or None when it is not there."""
    if item.destination is not None:
        try:
            ok = item.destination.is_file() and item.destination.stat().st_size > 0
        except OSError:
            ok = False
        return item.destination if ok else None
    return cached_hub_file(item.repo_id, item.filename)


def is_complete(item: DownloadItem) -> bool:
    """True when the item's file is present (a finished, checked download)."""
    return local_path(item) is not None


def sam2_checkpoint_path(size: str, dest_dir: str | Path | None = None) -> Path:
    """Where the SAM 2.1 checkpoint of `size` lives in a plain weights folder."""
    root = _root(dest_dir)
    if root is None:
        raise ValueError("no weights folder: pass dest_dir or set " + ENV_WEIGHTS_DIR)
    return root / sam2_spec(size).filename


def dinov2_folder_path(size: str, dest_dir: str | Path | None = None) -> Path:
    """Where the DINOv2 folder of `size` lives in a plain weights folder."""
    root = _root(dest_dir)
    if root is None:
        raise ValueError("no weights folder: pass dest_dir or set " + ENV_WEIGHTS_DIR)
    return root / dinov2_spec(size).folder_name


# ----------------------------------------------------------------------------- messages
def offline_message(items: Sequence[DownloadItem], reason: str | None = None) -> str:
    """What to tell a user whose weights are missing while offline mode is on."""
    reason = reason or offline_reason() or f"{ENV_OFFLINE}=1"
    lines = [f"offline mode is on ({reason}) and these weights are missing:"]
    for it in items:
        lines.append(f"  {it.name}  ({_mb(it.approx_mb)}) from {it.url}, into {it.where}")
    lines.append(
        f"To get them: copy the files into a folder laid out like `{ENV_WEIGHTS_DIR}` expects "
        f"(sam2.1_hiera_<size>.pt, MedSAM2_latest.pt, dinov2-<size>/config.json + model.safetensors) and set "
        f"{ENV_WEIGHTS_DIR} to it, or copy a Hugging Face cache that holds them (HF_HOME), or "
        f"unset {ENV_OFFLINE} (and HF_HUB_OFFLINE) and run `rseg weights download`, with "
        f"{ENV_MIRROR} set to your Hub mirror if you have one."
    )
    return "\n".join(lines)


def download_command(kind: str, model: str, force: bool = False) -> str:
    """The `rseg weights download` command that fetches exactly one model."""
    sam2, dinov2 = (model, "none") if kind == "sam2" else ("none", model)
    return f"rseg weights download --sam2 {sam2} --dinov2 {dinov2}" + (" --force" if force else "")


def _mb(mb: float) -> str:
    return "<1 MB" if mb < 1 else f"about {mb:.0f} MB"


# ----------------------------------------------------------------------------- progress
def _progress_class(
    progress: bool | ProgressCallback, cancel: Callable[[], bool] | None, name: str
) -> type:
    """A tqdm class for hf_hub_download's `tqdm_class`: draws (or not), reports, and cancels.

    huggingface_hub calls `update(n)` for every chunk it writes (HTTP) or reconstructs (Xet);
    raising DownloadCancelled there stops the transfer, and the library deletes its temporary file.
    """
    from tqdm import tqdm as _tqdm

    callback = progress if callable(progress) else None
    draw = bool(progress) and callback is None

    class _Bar(_tqdm):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.pop("name", None)
            kwargs["disable"] = not draw
            kwargs["file"] = sys.stderr
            kwargs["desc"] = name
            self._done = int(kwargs.get("initial") or 0)
            self._total = kwargs.get("total")
            super().__init__(*args, **kwargs)
            self._report()

        def _report(self) -> None:
            if cancel is not None and cancel():
                raise DownloadCancelled(
                    f"download of {name} cancelled after {self._done} bytes; the partial file was "
                    "discarded (huggingface_hub keeps no partial downloads between runs)"
                )
            if callback is not None:
                callback(self._done, self._total, name)

        def update(self, n: float | None = 1) -> bool | None:
            self._done += int(n or 0)
            self._report()
            return super().update(n)

        def update_transfer(self, n: int) -> None:
            """Xet's network-byte counter: progress is reported from `update` (bytes written)."""

        def set_transfer_postfix_str(self, *args: Any, **kwargs: Any) -> None:
            """Xet's transfer-rate text: not shown."""

    return _Bar


# ----------------------------------------------------------------------------- download
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


def _check_loadable(item: DownloadItem, path: Path) -> None:
    """Raise one of _LOAD_ERRORS unless the downloaded `path` of `item` loads strictly."""
    from . import loaders as models  # torch, sam2 and transformers load only when a check runs

    if item.kind == "sam2":
        models.check_sam2_checkpoint(path, item.model)
        return
    if item.filename == "config.json":
        _check_dinov2_config(path, item.model)
        return
    folder = path.parent  # the plain folder, or the cache snapshot holding both files
    if not (folder / "config.json").is_file():
        raise WeightsError(
            f"{item.name} cannot be checked: {folder} lacks config.json; download the whole "
            f"DINOv2 folder (`{download_command('dinov2', item.model)}`)"
        )
    models.check_dinov2_folder(folder, item.model)


def _announced_sha256(item: DownloadItem, path: Path) -> str | None:
    """The SHA-256 the Hub announced for the file (its ETag, for LFS files), where we can see it.

    In the cache a blob is named by its ETag; in a plain folder huggingface_hub records the ETag in
    `.cache/huggingface/download/<file>.metadata`.
    """
    if item.sha256:
        return item.sha256.lower()
    if item.local_dir is None:
        etag = Path(os.path.realpath(path)).name
    else:
        try:
            from huggingface_hub._local_folder import read_download_metadata

            meta = read_download_metadata(item.local_dir, item.filename)
        except (ImportError, OSError):  # pragma: no cover - a future huggingface_hub layout
            meta = None
        etag = meta.etag if meta is not None else ""
    etag = (etag or "").lower()
    return etag if len(etag) == 64 and all(c in "0123456789abcdef" for c in etag) else None


def _discard(item: DownloadItem, path: Path) -> None:
    """Remove a downloaded file that failed its check (and its cache blob), so it is fetched anew."""
    targets = [path]
    if item.local_dir is None:
        blob = Path(os.path.realpath(path))
        if blob != path:
            targets.append(blob)
    for target in targets:
        try:
            target.unlink()
        except FileNotFoundError:
            pass


def _hub_error(item: DownloadItem, e: BaseException) -> DownloadError:
    """One message for every way the Hub or the mirror can fail to deliver a file."""
    def text(err: BaseException) -> str:
        return " ".join(line.strip() for line in str(err).splitlines() if line.strip())[:400]

    cause_text = text(e)
    root = e
    while root.__cause__ is not None and root.__cause__ is not root:
        root = root.__cause__
    if root is not e:  # e.g. LocalEntryNotFoundError <- ConnectError: say what really failed
        cause_text += f"; cause: {type(root).__name__}: {text(root)}"
    hint = (
        f" Check the network or proxy, or set {ENV_MIRROR} to your Hub mirror; the file is "
        f"{item.repo_id}/{item.filename} on {item.endpoint}."
    )
    return DownloadError(
        f"{item.name}: could not fetch {item.url} ({type(e).__name__}: {cause_text}).{hint}",
        unavailable=True,
    )


def _fetch(
    item: DownloadItem, progress: bool | ProgressCallback, cancel: Callable[[], bool] | None,
    force: bool,
) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    import httpx2  # huggingface_hub's HTTP client: its transport errors surface unchanged

    if cancel is not None and cancel():
        raise DownloadCancelled(f"download of {item.name} cancelled before it started")
    kwargs: dict[str, Any] = {}
    if item.local_dir is not None:
        item.local_dir.mkdir(parents=True, exist_ok=True)
        kwargs["local_dir"] = item.local_dir
    try:
        path = hf_hub_download(
            item.repo_id, item.filename, revision=HUB_REVISION, endpoint=item.endpoint,
            force_download=force, tqdm_class=_progress_class(progress, cancel, item.name),
            library_name="RetrievalSeg", library_version=__version__, **kwargs,
        )
    except (HfHubHTTPError, LocalEntryNotFoundError, httpx2.HTTPError) as e:
        raise _hub_error(item, e) from e
    except OSError as e:  # the library's length check ("Consistency check failed"), disk errors
        raise DownloadError(
            f"{item.name}: the download from {item.url} failed: {e}. Run the download again."
        ) from e
    return Path(path)


def _check(item: DownloadItem, path: Path) -> None:
    expected = _announced_sha256(item, path)
    if expected:
        actual = file_sha256(path)
        if actual != expected:
            _discard(item, path)
            source = "the registry" if item.sha256 else "the server's ETag"
            raise IntegrityError(
                f"{item.name} from {item.url} is corrupt: SHA-256 {actual}, expected {expected} "
                f"(from {source}). The file was deleted; run the download again, and if it "
                "fails the same way, check the mirror's copy."
            )
    try:
        _check_loadable(item, path)
    except _LOAD_ERRORS as e:
        _discard(item, path)
        what = sam2_spec(item.model).display if item.kind == "sam2" else f"DINOv2 {item.model}"
        raise IntegrityError(
            f"{item.name} from {item.url} does not load as {what}: {str(e).rstrip('.')}. "
            "The file was deleted; run the download again, and if it fails the same way, check "
            "the mirror's copy."
        ) from e


def check_offline(items: Sequence[DownloadItem], offline: bool | None = None) -> None:
    """Raise OfflineError naming the files if offline mode is on and any item must be fetched."""
    reason = "offline=True" if offline else None
    offline = is_offline() if offline is None else offline
    if offline and items:
        raise OfflineError(offline_message(items, reason))


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
) -> list[Path]:
    """Fetch, check and place the weights (`items`, else those of the sizes); return their paths."""
    if items is None:
        items = plan_downloads(sam2_sizes, dinov2_sizes, mirror=mirror, dest_dir=dest_dir)
    elif dest_dir is not None or mirror is not None:
        raise ValueError("dest_dir and mirror apply when planning; pass them to plan_downloads()")
    todo = [it for it in items if force or not is_complete(it)]
    # A DINOv2 config.json goes before its weights: the weights are checked by loading with it.
    todo.sort(key=lambda it: 0 if it.filename == "config.json" else 1)
    check_offline(todo, offline)
    for it in todo:
        _check(it, _fetch(it, progress, cancel, force))
    out: list[Path] = []
    for it in items:
        path = local_path(it)
        if path is None:  # pragma: no cover - hf_hub_download returned, so the file is there
            raise DownloadError(f"{it.name}: downloaded but not found in {it.where}")
        out.append(path)
    return out


# ----------------------------------------------------------------------------- list / verify
def _model_files(
    kind: str, size: str, dest_dir: str | Path | None
) -> tuple[str, Path | None, list[Path | None], str]:
    """(display name, path of the model, each file's path or None, location) for one model."""
    root = _root(dest_dir)
    if kind == "sam2":
        spec = sam2_spec(size)
        if root is not None:
            path = root / spec.filename
            return spec.filename, path, [path if path.is_file() else None], "folder"
        cached = cached_hub_file(spec.repo_id, spec.filename)
        return spec.filename, cached, [cached], "cache"
    dspec = dinov2_spec(size)
    if root is not None:
        folder = root / dspec.folder_name
        files = [folder / f if (folder / f).is_file() else None for f in DINOV2_FILES]
        return dspec.folder_name, folder, files, "folder"
    files = [cached_hub_file(dspec.repo_id, f) for f in DINOV2_FILES]
    folder = next((f.parent for f in files if f is not None), None)
    return dspec.folder_name, folder, files, "cache"


def _size_of(path: Path | None) -> int:
    try:
        return path.stat().st_size if path is not None and path.is_file() else 0
    except OSError:
        return 0


def list_weights(dest_dir: str | Path | None = None) -> list[WeightStatus]:
    """Every model in the catalogue with whether its files are present (folder or cache)."""
    out = []
    for kind, sizes in (("sam2", SAM2_MODELS), ("dinov2", DINOV2_MODELS)):
        for model in sizes:
            name, path, files, location = _model_files(kind, model, dest_dir)
            present = all(_size_of(f) > 0 for f in files)
            size = sum(_size_of(f) for f in files)
            out.append(WeightStatus(name, kind, model, path, present, size, location))
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
    sam2_names = dict.fromkeys(sam2_spec(s).name for s in _sizes(sam2_sizes))
    wanted = [("sam2", s) for s in (sam2_names if explicit else list(SAM2_MODELS))]
    wanted += [("dinov2", s) for s in (_sizes(dinov2_sizes) if explicit else list(DINOV2_MODELS))]
    results: list[VerifyResult] = []
    for kind, model in wanted:
        name, path, files, _ = _model_files(kind, model, dest_dir)
        have = [f for f in files if _size_of(f) > 0]
        if not have:
            if explicit:
                results.append(VerifyResult(
                    name, kind, model, path, "missing",
                    f"not found in {weights_location(dest_dir)}; run `{download_command(kind, model)}`",
                ))
            continue
        if len(have) < len(files):
            lacking = ", ".join(f for f, p in zip(DINOV2_FILES, files) if p is None or p not in have)
            results.append(VerifyResult(
                name, kind, model, path, "failed",
                f"incomplete: {lacking} missing; run `{download_command(kind, model)}`",
            ))
            continue
        assert path is not None
        results.append(_verify_one(name, kind, model, path, check_sha))
    return results


def _verify_one(name: str, kind: str, model: str, path: Path, check_sha: bool) -> VerifyResult:
    from . import loaders as models

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
    "cached_hub_file",
    "check_offline",
    "dinov2_folder_path",
    "download_command",
    "download",
    "is_complete",
    "list_weights",
    "local_path",
    "offline_message",
    "plan_downloads",
    "resolve_mirror",
    "sam2_checkpoint_path",
    "verify",
]
