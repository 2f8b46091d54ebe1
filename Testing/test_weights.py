"""Weights downloader: real HTTP on 127.0.0.1 (Range, truncation, ETag), strict-load integrity.

The HTTP mechanics tests replace the strict load with a recorder (their payloads are random
bytes); every integrity test loads real files into the real architectures with random weights.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
from pathlib import Path

import pytest

from _http_server import FileServer
from RetrievalSegLib import cli_weights, registry, weights
from RetrievalSegLib.weights import (
    DownloadCancelled,
    DownloadError,
    DownloadItem,
    IntegrityError,
    OfflineError,
)

SAM2_TINY = registry.SAM2_MODELS["tiny"].filename  # sam2.1_hiera_tiny.pt
PAYLOAD = os.urandom(300_000) + b"end"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY",
                registry.ENV_MIRROR, registry.ENV_WEIGHTS_DIR):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(weights.time, "sleep", lambda s: None)  # retries without waiting


@pytest.fixture
def server() -> FileServer:
    with FileServer() as srv:
        yield srv


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    return tmp_path / "weights"


@pytest.fixture
def fake_load(monkeypatch: pytest.MonkeyPatch) -> list[tuple[DownloadItem, Path, bool]]:
    """Replace the strict load by a recorder: (item, candidate, final file existed at check)."""
    calls: list[tuple[DownloadItem, Path, bool]] = []

    def record(item: DownloadItem, candidate: Path) -> None:
        assert candidate.is_file()
        calls.append((item, candidate, item.destination.exists()))

    monkeypatch.setattr(weights, "_check_loadable", record)
    return calls


def sam2_item(
    server: FileServer, dest: Path, data: bytes = PAYLOAD, **headers: str
) -> DownloadItem:
    server.add(f"/{SAM2_TINY}", data, {k.replace("_", "-"): v for k, v in headers.items()})
    (item,) = weights.plan_downloads("tiny", None, mirror=server.base_url, dest_dir=dest)
    return item


# ----------------------------------------------------------------------------- planning
def test_plan_official_urls_layout_and_order(dest: Path) -> None:
    items = weights.plan_downloads("tiny,large", ["small"], mirror="", dest_dir=dest)
    assert [i.name for i in items] == [
        SAM2_TINY, "sam2.1_hiera_large.pt", "dinov2-small/config.json",
        "dinov2-small/model.safetensors",
    ]
    assert items[0].url == registry.SAM2_MODELS["tiny"].url
    assert items[0].destination == dest / SAM2_TINY and items[0].kind == "sam2"
    hf = "https://huggingface.co/facebook/dinov2-small/resolve/main/"
    assert items[3].url == hf + "model.safetensors"
    assert items[3].destination == dest / "dinov2-small" / "model.safetensors"
    assert items[3].sha256 == registry.DINOV2_MODELS["small"].safetensors_sha256
    assert items[2].sha256 is None and items[1].approx_mb == 898
    with pytest.raises(ValueError, match="choose one of"):
        weights.plan_downloads("huge", None)


def test_plan_mirror_argument_env_and_local_folder(
    dest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert weights.plan_downloads(None, None, dest_dir=dest) == []
    items = weights.plan_downloads("tiny", "small", mirror="http://m.example/w/", dest_dir=dest)
    assert [i.url for i in items] == [
        f"http://m.example/w/{SAM2_TINY}", "http://m.example/w/dinov2-small/config.json",
        "http://m.example/w/dinov2-small/model.safetensors",
    ]
    assert items[0].official_url == registry.SAM2_MODELS["tiny"].url
    monkeypatch.setenv(registry.ENV_MIRROR, str(tmp_path))
    (item,) = weights.plan_downloads("tiny", None, dest_dir=dest)
    assert item.url == tmp_path.resolve().as_uri() + f"/{SAM2_TINY}"
    monkeypatch.setenv(registry.ENV_MIRROR, str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="neither a URL"):
        weights.plan_downloads("tiny", None)
    with pytest.raises(ValueError, match="http, https or file"):
        weights.plan_downloads("tiny", None, mirror="ftp://x/")
    monkeypatch.setenv(registry.ENV_WEIGHTS_DIR, str(tmp_path / "wd"))
    (item,) = weights.plan_downloads("tiny", None, mirror="")
    assert item.destination == tmp_path / "wd" / SAM2_TINY


# ----------------------------------------------------------------------------- HTTP mechanics
def test_full_download_sha_from_etag_atomic(
    server: FileServer, dest: Path, fake_load, monkeypatch
) -> None:
    item = sam2_item(server, dest, ETag=f'"{sha(PAYLOAD)}"')
    seen: list[tuple[int, int | None, str]] = []
    replaced: list[tuple[str, str]] = []
    real_replace = os.replace
    monkeypatch.setattr(weights.os, "replace",
                        lambda a, b: (replaced.append((str(a), str(b))), real_replace(a, b))[1])
    paths = weights.download([item], progress=lambda d, t, n: seen.append((d, t, n)),
                             offline=False, chunk_size=65536)
    assert paths == [dest / SAM2_TINY]
    assert (dest / SAM2_TINY).read_bytes() == PAYLOAD
    assert not item.part_path.exists() and sorted(os.listdir(dest)) == [SAM2_TINY]
    assert replaced == [(str(item.part_path), str(item.destination))]
    # checked by loading while still a .part, before anything was at the final path
    assert fake_load == [(item, item.part_path, False)]
    n = len(PAYLOAD)
    assert seen[0] == (0, n, SAM2_TINY) and seen[-1] == (n, n, SAM2_TINY)
    (req,) = server.requests
    assert "Range" not in req["headers"] and req["status"] == 200
    # present files are not fetched again (even offline), unless forced
    assert weights.download([item], progress=False, offline=True) == [item.destination]
    assert len(server.requests) == 1
    weights.download([item], progress=False, offline=False, force=True)
    assert len(server.requests) == 2


def test_resume_partial_with_range(server: FileServer, dest: Path, fake_load) -> None:
    item = sam2_item(server, dest)
    dest.mkdir()
    item.part_path.write_bytes(PAYLOAD[:100_000])
    weights.download([item], progress=False, offline=False)
    assert item.destination.read_bytes() == PAYLOAD and not item.part_path.exists()
    (req,) = server.requests
    assert req["headers"]["Range"] == "bytes=100000-"
    assert req["status"] == 206 and req["sent"] == len(PAYLOAD) - 100_000


def test_server_ignoring_range_restarts_from_zero(
    server: FileServer, dest: Path, fake_load
) -> None:
    item = sam2_item(server, dest)
    server.ignore_range = True
    dest.mkdir()
    item.part_path.write_bytes(b"x" * 100_000)  # wrong bytes: must not survive the restart
    weights.download([item], progress=False, offline=False)
    assert item.destination.read_bytes() == PAYLOAD
    (req,) = server.requests
    assert req["headers"]["Range"] == "bytes=100000-" and req["status"] == 200
    assert req["sent"] == len(PAYLOAD)


def test_part_already_complete_gets_416_and_is_placed(
    server: FileServer, dest: Path, fake_load
) -> None:
    item = sam2_item(server, dest)
    dest.mkdir()
    item.part_path.write_bytes(PAYLOAD)
    weights.download([item], progress=False, offline=False)
    assert item.destination.read_bytes() == PAYLOAD
    assert [r["status"] for r in server.requests] == [416]


def test_truncated_response_clear_error_then_resume(
    server: FileServer, dest: Path, fake_load
) -> None:
    item = sam2_item(server, dest)
    server.truncate[f"/{SAM2_TINY}"] = (120_000, None)  # always cut, Content-Length says all
    with pytest.raises(DownloadError, match=r"ended early: received 120000 of 300003 bytes") as ei:
        weights.download([item], progress=False, offline=False, retries=1)
    assert "run the download again to resume" in str(ei.value)
    assert not ei.value.unavailable
    assert not item.destination.exists() and fake_load == []
    assert item.part_path.stat().st_size == 120_000  # kept for resume
    assert len(server.requests) == 2  # one retry, which resumed (and was cut again)
    assert server.requests[1]["headers"]["Range"] == "bytes=120000-"
    del server.truncate[f"/{SAM2_TINY}"]
    weights.download([item], progress=False, offline=False)
    assert item.destination.read_bytes() == PAYLOAD
    assert server.requests[-1]["headers"]["Range"] == "bytes=120000-"


def test_transient_truncation_is_retried(server: FileServer, dest: Path, fake_load) -> None:
    item = sam2_item(server, dest)
    server.truncate[f"/{SAM2_TINY}"] = (50_000, 1)  # only the first response is cut
    weights.download([item], progress=False, offline=False, retries=2)
    assert item.destination.read_bytes() == PAYLOAD
    assert [r["status"] for r in server.requests] == [200, 206]


def test_wrong_sha_from_etag_deletes_part(server: FileServer, dest: Path, fake_load) -> None:
    wrong = sha(b"something else")
    item = sam2_item(server, dest, ETag=f'"{wrong}"')
    with pytest.raises(IntegrityError) as ei:
        weights.download([item], progress=False, offline=False)
    msg = str(ei.value)
    assert wrong in msg and sha(PAYLOAD) in msg and "corrupt" in msg
    assert not item.destination.exists() and not item.part_path.exists() and fake_load == []


def test_weak_or_short_etags_are_not_checksums(server: FileServer, dest: Path, fake_load) -> None:
    item = sam2_item(server, dest, ETag=f'W/"{sha(b"x")}"')
    weights.download([item], progress=False, offline=False)
    server.headers[f"/{SAM2_TINY}"] = {"ETag": '"d41d8cd98f00b204e9800998ecf8427e"'}  # md5 (S3)
    weights.download([item], progress=False, offline=False, force=True)
    assert item.destination.read_bytes() == PAYLOAD


def test_registry_sha_mismatch_for_dinov2(server: FileServer, dest: Path, fake_load) -> None:
    server.add("/dinov2-small/config.json", b'{"model_type": "dinov2", "hidden_size": 384}')
    server.add("/dinov2-small/model.safetensors", PAYLOAD)
    items = weights.plan_downloads(None, "small", mirror=server.base_url, dest_dir=dest)
    with pytest.raises(IntegrityError, match="from the registry"):
        weights.download(items, progress=False, offline=False)
    assert (dest / "dinov2-small" / "config.json").is_file()
    assert sorted(os.listdir(dest / "dinov2-small")) == ["config.json"]


def test_hugging_face_redirect_with_linked_etag(server: FileServer, dest: Path, fake_load) -> None:
    server.add("/cdn/blob", PAYLOAD, {"ETag": '"not-a-sha"'})
    for tag, ok in ((sha(PAYLOAD), True), (sha(b"other"), False)):
        server.redirects["/repo/resolve/main/file.pt"] = (
            server.url("/cdn/blob"), {"X-Linked-Etag": f'"{tag}"', "X-Linked-Size": "300003"}
        )
        (base,) = weights.plan_downloads("tiny", None, mirror=server.base_url, dest_dir=dest)
        item = dataclasses.replace(base, url=server.url("/repo/resolve/main/file.pt"))
        if ok:
            weights.download([item], progress=False, offline=False, force=True)
            assert item.destination.read_bytes() == PAYLOAD
        else:
            with pytest.raises(IntegrityError, match=tag):
                weights.download([item], progress=False, offline=False, force=True)
    assert [r["path"] for r in server.requests] == ["/repo/resolve/main/file.pt", "/cdn/blob"] * 2


def test_http_404_names_url_and_layout(server: FileServer, dest: Path, fake_load) -> None:
    (item,) = weights.plan_downloads("tiny", None, mirror=server.base_url, dest_dir=dest)
    with pytest.raises(DownloadError, match="HTTP 404") as ei:
        weights.download([item], progress=False, offline=False)
    assert ei.value.unavailable and item.url in str(ei.value) and item.official_url in str(ei.value)


def test_unreachable_server_is_unavailable(dest: Path, fake_load) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (item,) = weights.plan_downloads("tiny", None, mirror=f"http://127.0.0.1:{port}", dest_dir=dest)
    with pytest.raises(DownloadError, match="could not reach 127.0.0.1") as ei:
        weights.download([item], progress=False, offline=False, retries=1)
    assert ei.value.unavailable and not dest.joinpath(SAM2_TINY).exists()


def test_offline_raises_before_any_socket(server: FileServer, dest: Path, monkeypatch) -> None:
    item = sam2_item(server, dest)

    def no_socket(*a, **k):  # noqa: ANN002, ANN003
        raise AssertionError("a socket was opened while offline")

    monkeypatch.setattr(socket.socket, "connect", no_socket)
    monkeypatch.setattr(socket, "create_connection", no_socket)
    monkeypatch.setenv(registry.ENV_OFFLINE, "1")
    with pytest.raises(OfflineError) as ei:
        weights.download([item], progress=False)
    msg = str(ei.value)
    for needle in (SAM2_TINY, item.url, str(dest), "RSEG_WEIGHTS_MIRROR", "RSEG_OFFLINE",
                   "rseg weights download"):
        assert needle in msg
    monkeypatch.delenv(registry.ENV_OFFLINE)
    with pytest.raises(OfflineError):
        weights.download(sam2_sizes="tiny", dinov2_sizes="small", dest_dir=dest, offline=True)
    assert server.requests == [] and not dest.exists()


def test_offline_allows_a_local_folder_mirror(
    tmp_path: Path, dest: Path, fake_load, monkeypatch
) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / SAM2_TINY).write_bytes(PAYLOAD)
    monkeypatch.setenv(registry.ENV_OFFLINE, "1")
    monkeypatch.setenv(registry.ENV_MIRROR, str(mirror))
    weights.download(sam2_sizes="tiny", dinov2_sizes=None, dest_dir=dest, progress=False)
    assert (dest / SAM2_TINY).read_bytes() == PAYLOAD
    with pytest.raises(DownloadError, match="not in the mirror folder") as ei:
        weights.download(sam2_sizes="small", dinov2_sizes=None, dest_dir=dest, progress=False)
    assert ei.value.unavailable and "sam2.1_hiera_small.pt" in str(ei.value)


def test_mirror_env_var_is_honoured(server: FileServer, dest: Path, fake_load, monkeypatch) -> None:
    server.add(f"/mirror/{SAM2_TINY}", PAYLOAD)
    monkeypatch.setenv(registry.ENV_MIRROR, server.url("/mirror/"))
    monkeypatch.setenv(registry.ENV_WEIGHTS_DIR, str(dest))
    paths = weights.download(sam2_sizes=["tiny"], dinov2_sizes=(), progress=False, offline=False)
    assert paths == [dest / SAM2_TINY] and paths[0].read_bytes() == PAYLOAD
    assert [r["path"] for r in server.requests] == [f"/mirror/{SAM2_TINY}"]


def test_cancel_keeps_part_and_resumes(server: FileServer, dest: Path, fake_load) -> None:
    item = sam2_item(server, dest)
    progress: list[int] = []
    with pytest.raises(DownloadCancelled, match="kept"):
        weights.download([item], offline=False, chunk_size=16384,
                         progress=lambda d, t, n: progress.append(d),
                         cancel=lambda: bool(progress) and progress[-1] >= 32768)
    kept = item.part_path.stat().st_size
    assert kept == 32768 and not item.destination.exists() and fake_load == []
    weights.download([item], progress=False, offline=False)
    assert item.destination.read_bytes() == PAYLOAD
    assert server.requests[-1]["headers"]["Range"] == f"bytes={kept}-"
    assert server.requests[-1]["sent"] == len(PAYLOAD) - kept


def test_concurrent_download_of_the_same_file_is_refused(
    server: FileServer, dest: Path, fake_load
) -> None:
    item = sam2_item(server, dest)
    dest.mkdir()
    with weights._DownloadLock(item):  # another process (or thread) is downloading it
        with pytest.raises(DownloadError, match="another download of this file is in progress"):
            weights.download([item], progress=False, offline=False)
    assert server.requests == []
    weights.download([item], progress=False, offline=False)
    assert sorted(os.listdir(dest)) == [SAM2_TINY]  # no .part, no .lock left


def test_tqdm_bar_goes_to_stderr(server: FileServer, dest: Path, fake_load, capsys) -> None:
    item = sam2_item(server, dest)
    weights.download([item], progress=True, offline=False)
    out, err = capsys.readouterr()
    assert out == "" and SAM2_TINY in err


# ----------------------------------------------------------------------------- strict loading
@pytest.fixture(scope="module")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real-architecture files with random weights: SAM 2.1 tiny (valid, DINOv2-as-SAM2, cut)."""
    import torch
    from sam2.build_sam import build_sam2
    from transformers import Dinov2Config, Dinov2Model

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    sam = build_sam2(registry.SAM2_MODELS["tiny"].config, None, device="cpu")
    torch.save({"model": sam.state_dict()}, root / "sam2_ok.pt")
    del sam
    dino = Dinov2Model(Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6))
    dino.save_pretrained(root / "dinov2-small")  # config.json + model.safetensors
    torch.save({"model": dino.state_dict()}, root / "sam2_is_dinov2.pt")
    del dino
    data = (root / "sam2_ok.pt").read_bytes()
    (root / "sam2_cut.pt").write_bytes(data[: len(data) // 2])
    safet = (root / "dinov2-small" / "model.safetensors").read_bytes()
    (root / "dinov2_cut.safetensors").write_bytes(safet[: len(safet) // 2])
    return {
        "sam2_ok": root / "sam2_ok.pt", "sam2_is_dinov2": root / "sam2_is_dinov2.pt",
        "sam2_cut": root / "sam2_cut.pt", "dinov2": root / "dinov2-small",
        "dinov2_cut": root / "dinov2_cut.safetensors",
    }


def test_real_sam2_checkpoint_downloads_lists_and_verifies(
    server: FileServer, dest: Path, model_files: dict[str, Path]
) -> None:
    server.add(f"/{SAM2_TINY}", model_files["sam2_ok"])
    weights.download(sam2_sizes="tiny", dinov2_sizes=None, dest_dir=dest,
                     mirror=server.base_url, progress=False, offline=False)
    placed = dest / SAM2_TINY
    assert placed.stat().st_size == model_files["sam2_ok"].stat().st_size
    status = {s.name: s for s in weights.list_weights(dest)}
    assert status[SAM2_TINY].present and status[SAM2_TINY].size == placed.stat().st_size
    assert not status["dinov2-small"].present and not status["sam2.1_hiera_small.pt"].present
    (res,) = weights.verify(dest)  # only what is present
    assert res.ok and res.name == SAM2_TINY, res.message
    # a size asked for by name but absent is reported, not skipped
    (small,) = weights.verify(dest, sam2_sizes="small")
    assert small.status == "missing"


@pytest.mark.parametrize("variant, needle", [
    ("sam2_is_dinov2", "DINOv2 checkpoint, not a SAM 2"),
    ("sam2_cut", "cannot be read"),
])
def test_corrupt_sam2_checkpoint_is_refused(
    server: FileServer, dest: Path, model_files: dict[str, Path], variant: str, needle: str
) -> None:
    server.add(f"/{SAM2_TINY}", model_files[variant])  # complete transfer, bad content
    with pytest.raises(IntegrityError, match="does not load as SAM 2.1 tiny") as ei:
        weights.download(sam2_sizes="tiny", dinov2_sizes=None, dest_dir=dest,
                         mirror=server.base_url, progress=False, offline=False)
    assert needle in str(ei.value)
    assert os.listdir(dest) == []  # neither the final file nor a .part
    # the same bad file put there by hand is reported by verify
    dest.joinpath(SAM2_TINY).write_bytes(model_files[variant].read_bytes())
    (res,) = weights.verify(dest)
    assert res.status == "failed" and needle in res.message


def test_real_dinov2_folder_downloads_and_verifies(
    server: FileServer, dest: Path, model_files: dict[str, Path], monkeypatch
) -> None:
    folder = model_files["dinov2"]
    digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    spec = registry.DINOV2_MODELS["small"]
    monkeypatch.setitem(registry.DINOV2_MODELS, "small",
                        dataclasses.replace(spec, safetensors_sha256=digest))
    for f in registry.DINOV2_FILES:
        server.add(f"/dinov2-small/{f}", folder / f)
    weights.download(sam2_sizes=None, dinov2_sizes="small", dest_dir=dest,
                     mirror=server.base_url, progress=False, offline=False)
    assert sorted(os.listdir(dest / "dinov2-small")) == ["config.json", "model.safetensors"]
    (res,) = weights.verify(dest, dinov2_sizes="small")
    assert res.ok and "matches the published" in res.message
    monkeypatch.setitem(registry.DINOV2_MODELS, "small", spec)  # the real published hash
    (res,) = weights.verify(dest)
    assert res.ok and "differs from the published" in res.message


def test_corrupt_dinov2_weights_are_refused(
    server: FileServer, dest: Path, model_files: dict[str, Path], monkeypatch
) -> None:
    spec = registry.DINOV2_MODELS["small"]
    monkeypatch.setitem(registry.DINOV2_MODELS, "small",
                        dataclasses.replace(spec, safetensors_sha256=None))
    server.add("/dinov2-small/config.json", model_files["dinov2"] / "config.json")
    server.add("/dinov2-small/model.safetensors", model_files["dinov2_cut"])
    with pytest.raises(IntegrityError, match="does not load as DINOv2 small"):
        weights.download(sam2_sizes=None, dinov2_sizes="small", dest_dir=dest,
                         mirror=server.base_url, progress=False, offline=False)
    assert sorted(os.listdir(dest / "dinov2-small")) == ["config.json"]  # no .part, no staging
    (res,) = weights.verify(dest)
    assert res.status == "failed" and "model.safetensors missing" in res.message


def test_dinov2_config_of_another_model_is_refused(server: FileServer, dest: Path) -> None:
    config = {"model_type": "vit", "hidden_size": 384}
    server.add("/dinov2-small/config.json", json.dumps(config).encode())
    items = weights.plan_downloads(None, "small", mirror=server.base_url, dest_dir=dest)
    with pytest.raises(IntegrityError, match="model_type 'vit'"):
        weights.download(items[:1], progress=False, offline=False)
    assert os.listdir(dest / "dinov2-small") == []


# ----------------------------------------------------------------------------- CLI
def run_cli(*argv: str) -> int:
    return cli_weights.main(["weights", *argv])


def test_cli_download_list_verify(
    server: FileServer, dest: Path, fake_load, capsys, monkeypatch
) -> None:
    monkeypatch.delenv(registry.ENV_OFFLINE, raising=False)
    server.add(f"/{SAM2_TINY}", PAYLOAD)
    code = run_cli("download", "--sam2", "tiny", "--dinov2", "none", "--dir", str(dest),
                   "--mirror", server.base_url, "--yes")
    out = capsys.readouterr().out
    assert code == 0 and "~156 MB" in out and server.url(f"/{SAM2_TINY}") in out
    assert (dest / SAM2_TINY).read_bytes() == PAYLOAD
    assert run_cli("download", "--sam2", "tiny", "--dinov2", "none", "--dir", str(dest)) == 0
    assert "already present" in capsys.readouterr().out
    assert run_cli("list", "--json", "--dir", str(dest)) == 0
    listing = json.loads(capsys.readouterr().out)
    present = {w["name"] for w in listing["weights"] if w["present"]}
    assert listing["dir"] == str(dest) and present == {SAM2_TINY}
    empty = dest.parent / "empty"
    assert run_cli("verify", "--json", "--dir", str(empty)) == 1
    assert json.loads(capsys.readouterr().out) == {"dir": str(empty), "ok": False, "results": []}


def test_cli_exit_codes(server: FileServer, dest: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv(registry.ENV_OFFLINE, "1")
    assert run_cli("download", "--dir", str(dest), "--yes") == 3
    captured = capsys.readouterr()
    assert "offline mode is on (RSEG_OFFLINE=1)" in captured.err and server.requests == []
    assert captured.out == ""  # no plan shown for a download that cannot run
    monkeypatch.delenv(registry.ENV_OFFLINE)
    assert run_cli("download", "--sam2", "tiny", "--dinov2", "none", "--dir", str(dest),
                   "--mirror", server.base_url, "--yes") == 3  # 404: unavailable
    assert "HTTP 404" in capsys.readouterr().err
    with pytest.raises(SystemExit) as ei:
        run_cli("download", "--sam2", "huge")
    assert ei.value.code == 2 and "choose from tiny" in capsys.readouterr().err
    assert run_cli("download", "--sam2", "none", "--dinov2", "none") == 2
    assert run_cli("download", "--mirror", "gopher://x", "--yes", "--dir", str(dest)) == 2


def test_cli_asks_on_a_tty_and_respects_no(
    server: FileServer, dest: Path, fake_load, monkeypatch, capsys
) -> None:
    monkeypatch.delenv(registry.ENV_OFFLINE, raising=False)
    server.add(f"/{SAM2_TINY}", PAYLOAD)
    prompts: list[str] = []
    monkeypatch.setattr(cli_weights.sys.stdin, "isatty", lambda: True, raising=False)
    monkeypatch.setattr("builtins.input", lambda p: prompts.append(p) or "n")
    argv = ("download", "--sam2", "tiny", "--dinov2", "none", "--dir", str(dest),
            "--mirror", server.base_url)
    assert run_cli(*argv) == 1
    assert prompts == ["Download now? [y/N] "] and server.requests == []
    assert "Nothing downloaded" in capsys.readouterr().out
    assert run_cli(*argv, "--yes") == 0 and len(prompts) == 1  # --yes skips the question


def test_cli_is_wired_through_add_weights_parser() -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="rseg")
    sub = parser.add_subparsers(dest="command")
    cli_weights.add_weights_parser(sub)
    args = parser.parse_args(["weights", "download"])
    assert args.func is cli_weights.cmd_download and args.sam2 == ["tiny"]
    assert args.dinov2 == ["small"] and not args.yes
    args = parser.parse_args(["weights", "verify", "--sam2", "tiny,base+", "--json"])
    assert args.func is cli_weights.cmd_verify and args.sam2 == ["tiny", "base_plus"]
