"""Weights downloader on huggingface_hub: a loopback Hub mirror, real HTTP, strict-load integrity.

Every download runs in a subprocess (`_weights_child.py`) because huggingface_hub reads
HF_ENDPOINT / HF_HUB_OFFLINE once, at import: the subprocess starts with RSEG_WEIGHTS_MIRROR /
RSEG_OFFLINE and shows that RetrievalSegLib maps them before the library loads. The server
(`_hub_server.py`) speaks the Hub's resolve protocol on 127.0.0.1 and never offers Xet. Tests of
HTTP mechanics replace the strict load with a recorder (their payloads are random bytes); the
integrity tests load real files into the real architectures with random weights.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from _hub_server import COMMIT, HubServer
from RetrievalSegLib.cli import weights as cli_weights
from RetrievalSegLib.models import registry
from RetrievalSegLib.models import weights

HERE = Path(__file__).resolve().parents[1]
ROOT = HERE.parent
CHILD = HERE / "_weights_child.py"
SAM2 = registry.sam2_spec("tiny")  # facebook/sam2.1-hiera-tiny, sam2.1_hiera_tiny.pt
DINO = registry.DINOV2_MODELS["small"]  # facebook/dinov2-small
PAYLOAD = os.urandom(300_000) + b"end"
DINO_CONFIG = json.dumps({"model_type": "dinov2", "hidden_size": 384}).encode()
DINO_WEIGHTS = os.urandom(50_000)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def hub() -> HubServer:
    with HubServer() as srv:
        yield srv


def child_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A clean environment: no proxies, no offline switches, a private HF_HOME."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in (
        "http_proxy", "https_proxy", "all_proxy", "no_proxy", "rseg_offline", "hf_hub_offline",
        "transformers_offline", "rseg_weights_mirror", "rseg_weights_dir", "hf_endpoint",
        "hf_hub_cache", "huggingface_hub_cache", "rseg_sam2_checkpoint", "rseg_dinov2_path")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_TELEMETRY="1", PYTHONIOENCODING="utf-8",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE)]))
    env.update(extra)
    return env


def run_child(spec: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    # UTF-8 whatever the locale (make may run with LANG unset): bars and names carry "…"
    proc = subprocess.run([sys.executable, str(CHILD), json.dumps(spec)], env=env, cwd=ROOT,
                          capture_output=True, encoding="utf-8", errors="replace", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["stdout"], out["stderr"] = proc.stdout, proc.stderr
    return out


def serve_defaults(hub: HubServer) -> None:
    """SAM 2.1 tiny and DINOv2 small as the Hub publishes them (LFS weights, plain config)."""
    hub.add(SAM2.repo_id, SAM2.filename, PAYLOAD)
    hub.add(DINO.repo_id, "config.json", DINO_CONFIG, lfs=False)
    hub.add(DINO.repo_id, "model.safetensors", DINO_WEIGHTS)


def snapshot(tmp_path: Path, repo_id: str) -> Path:
    return tmp_path / "hf" / "hub" / ("models--" + repo_id.replace("/", "--")) / "snapshots" / COMMIT


def gets(hub: HubServer) -> list[dict[str, Any]]:
    return [r for r in hub.requests if r["method"] == "GET"]


# ----------------------------------------------------------------------------- catalogue, plan
def test_catalogue_is_the_repositories_sam2_itself_reads() -> None:
    from sam2.build_sam import HF_MODEL_ID_TO_FILENAMES

    sam21 = [s for s in registry.SAM2_MODELS.values() if s.name.startswith("sam2.1-")]
    assert len(sam21) == 4
    for spec in sam21:
        assert HF_MODEL_ID_TO_FILENAMES[spec.repo_id] == (spec.config, spec.filename)
    medsam2 = registry.sam2_spec("medsam2")  # not in sam2's table: MedSAM2's own download script
    assert (medsam2.repo_id, medsam2.filename) == ("wanglab/MedSAM2", "MedSAM2_latest.pt")
    assert [d.repo_id for d in registry.DINOV2_MODELS.values()] == [
        "facebook/dinov2-small", "facebook/dinov2-base", "facebook/dinov2-large"]


def test_plan_cache_folder_and_mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in (registry.ENV_MIRROR, registry.ENV_WEIGHTS_DIR, registry.HF_ENV_ENDPOINT):
        monkeypatch.delenv(var, raising=False)
    items = weights.plan_downloads("tiny,large", ["small"])
    assert [(i.repo_id, i.filename) for i in items] == [
        ("facebook/sam2.1-hiera-tiny", "sam2.1_hiera_tiny.pt"),
        ("facebook/sam2.1-hiera-large", "sam2.1_hiera_large.pt"),
        ("facebook/dinov2-small", "config.json"), ("facebook/dinov2-small", "model.safetensors")]
    assert items[0].url == "https://huggingface.co/facebook/sam2.1-hiera-tiny/resolve/main/sam2.1_hiera_tiny.pt"
    assert all(i.local_dir is None and i.destination is None for i in items)  # the HF cache
    assert items[1].approx_mb == 898 and items[3].sha256 == DINO.safetensors_sha256
    # a plain weights folder: the layout air-gapped sites copy by hand
    folder = tmp_path / "w"
    items = weights.plan_downloads("tiny", "small", dest_dir=folder, mirror="http://m.example/hub/")
    assert [i.destination for i in items] == [
        folder / SAM2.filename, folder / "dinov2-small" / "config.json",
        folder / "dinov2-small" / "model.safetensors"]
    assert items[2].url == "http://m.example/hub/facebook/dinov2-small/resolve/main/model.safetensors"
    monkeypatch.setenv(registry.ENV_WEIGHTS_DIR, str(folder))
    monkeypatch.setenv(registry.ENV_MIRROR, "https://intranet/hf")
    (item,) = weights.plan_downloads("tiny", None)
    assert item.destination == folder / SAM2.filename and item.endpoint == "https://intranet/hf"
    monkeypatch.setenv(registry.ENV_MIRROR, str(tmp_path))  # a folder is not a mirror
    with pytest.raises(ValueError, match=f"not a URL.*set {registry.ENV_WEIGHTS_DIR}"):
        weights.plan_downloads("tiny", None)
    with pytest.raises(ValueError, match="http or https"):
        weights.plan_downloads("tiny", None, mirror="ftp://x/")
    with pytest.raises(ValueError, match="choose one of"):
        weights.plan_downloads("huge", None, mirror="")


# ----------------------------------------------------------------------------- environment
def test_rseg_switches_reach_huggingface_hub_and_offline_refuses(
    hub: HubServer, tmp_path: Path
) -> None:
    serve_defaults(hub)
    plain = run_child({"op": "env"}, child_env(tmp_path))
    assert plain["hub"]["endpoint"] == "https://huggingface.co" and not plain["hub"]["offline"]
    assert plain["hub"]["cache"] == str(tmp_path / "hf" / "hub")
    env = child_env(tmp_path, RSEG_OFFLINE="1", RSEG_WEIGHTS_MIRROR=hub.base_url + "/")
    out = run_child({"op": "download", "kwargs": {}}, env)
    assert out["hub"] == {"endpoint": hub.base_url, "offline": True, "cache": plain["hub"]["cache"]}
    assert out["error"] == "OfflineError"
    for needle in (SAM2.filename, "dinov2-small/model.safetensors", "RSEG_OFFLINE=1",
                   "RSEG_WEIGHTS_DIR", "rseg weights download", hub.base_url):
        assert needle in out["message"]
    # the library itself, called directly, is offline too: the mapping happened before its import
    direct = run_child({"op": "hub_download", "repo_id": SAM2.repo_id, "filename": SAM2.filename},
                       env)
    assert direct["error"] in ("LocalEntryNotFoundError", "OfflineModeIsEnabled")
    cli = run_child({"op": "cli", "argv": ["download", "--yes"]}, env)
    assert cli["exit"] == 3 and "offline mode is on (RSEG_OFFLINE=1)" in cli["stderr"]
    assert "Weights go to" not in cli["stdout"]  # no plan shown for a download that cannot run
    assert hub.requests == []


# ----------------------------------------------------------------------------- downloads
def test_download_into_the_shared_cache_through_a_mirror(hub: HubServer, tmp_path: Path) -> None:
    serve_defaults(hub)
    env = child_env(tmp_path, RSEG_WEIGHTS_MIRROR=hub.base_url)
    spec = {"op": "download", "kwargs": {}, "fake_load": True,
            "dinov2_sha": {"small": sha(DINO_WEIGHTS)}}
    out = run_child(spec, env)
    assert out["error"] is None, out["message"]
    sam_snap, dino_snap = snapshot(tmp_path, SAM2.repo_id), snapshot(tmp_path, DINO.repo_id)
    assert out["paths"] == [str(sam_snap / SAM2.filename), str(dino_snap / "config.json"),
                            str(dino_snap / "model.safetensors")]
    assert Path(out["paths"][0]).read_bytes() == PAYLOAD
    assert Path(out["paths"][2]).read_bytes() == DINO_WEIGHTS
    # the cache's blob of an LFS file is named by its SHA-256, as huggingface_hub lays it out
    assert Path(os.path.realpath(out["paths"][0])).name == sha(PAYLOAD)
    # every file strictly checked at its final path, a DINOv2 config before its weights
    assert [c[0] for c in out["checked"]] == [
        "dinov2-small/config.json", SAM2.filename, "dinov2-small/model.safetensors"]
    assert all(c[2] for c in out["checked"])
    # plain HTTP through the mirror: HEAD then GET of each resolve URL, no Range, no Xet
    # (hf_xet is installed; the mirror offers no Xet headers, so it is never needed)
    assert out["hf_xet_installed"]
    sam_path = hub.path(SAM2.repo_id, SAM2.filename)
    assert [r["method"] for r in hub.requests_for(sam_path)] == ["HEAD", "GET"]
    assert {r["path"] for r in hub.requests} == {
        sam_path, hub.path(DINO.repo_id, "config.json"), hub.path(DINO.repo_id, "model.safetensors")}
    assert all("Range" not in r["headers"] for r in gets(hub))
    assert "RetrievalSeg/" in hub.requests[0]["headers"]["user-agent"]
    # progress: per file, from 0 to the full size
    sam_progress = [p for p in out["progress"] if p[2] == SAM2.filename]
    assert sam_progress[0][:2] == [0, len(PAYLOAD)] and sam_progress[-1][:2] == [len(PAYLOAD)] * 2
    # present now: nothing fetched again, and the loaders find the cache (no network)
    before = len(hub.requests)
    found = run_child({**spec, "locate": True}, env)
    assert found["paths"] == out["paths"] and len(hub.requests) == before
    assert found["sam2"] == str(sam_snap / SAM2.filename) and found["dinov2"] == str(dino_snap)
    listed = {e["name"]: e for e in found["list"]}
    assert listed[SAM2.filename]["present"] and listed[SAM2.filename]["location"] == "cache"
    assert listed["dinov2-small"]["size"] == len(DINO_CONFIG) + len(DINO_WEIGHTS)
    assert not listed["sam2.1_hiera_small.pt"]["present"]


def test_cli_download_into_a_plain_folder(hub: HubServer, tmp_path: Path) -> None:
    serve_defaults(hub)
    folder = tmp_path / "weights"
    env = child_env(tmp_path)
    argv = ["download", "--dir", str(folder), "--mirror", hub.base_url, "--yes"]
    out = run_child({"op": "cli", "argv": argv, "fake_load": True,
                     "dinov2_sha": {"small": sha(DINO_WEIGHTS)}}, env)
    assert out["exit"] == 0, out["stderr"]
    # the size is shown before the download, with where each file comes from
    assert "~156 MB" in out["stdout"] and "~88 MB" in out["stdout"]
    assert hub.base_url + hub.path(SAM2.repo_id, SAM2.filename) in out["stdout"]
    assert f"Weights go to: {folder}" in out["stdout"]
    assert SAM2.filename in out["stderr"]  # the tqdm bar goes to stderr
    assert (folder / SAM2.filename).read_bytes() == PAYLOAD
    assert (folder / "dinov2-small" / "model.safetensors").read_bytes() == DINO_WEIGHTS
    assert not (tmp_path / "hf" / "hub" / ("models--" + SAM2.repo_id.replace("/", "--"))).exists()
    listed = run_child({"op": "cli", "argv": ["list", "--json", "--dir", str(folder)]}, env)
    report = json.loads(listed["stdout"].strip().rsplit("\n\n", 1)[0])
    assert report["dir"] == str(folder)
    assert {w["name"] for w in report["weights"] if w["present"]} == {SAM2.filename, "dinov2-small"}


def test_resume_after_a_cut_connection(hub: HubServer, tmp_path: Path) -> None:
    # huggingface_hub writes in 10 MiB chunks and resumes from the last chunk it wrote, so the
    # file must be larger than one chunk for a cut to leave something to resume from.
    chunk = 10 * 2**20
    big = os.urandom(chunk + 2 * 2**20)
    hub.add(SAM2.repo_id, SAM2.filename, big)
    path = hub.path(SAM2.repo_id, SAM2.filename)
    hub.cut[path] = (chunk + 2**20, 1)  # the first body stops 1 MiB into the second chunk
    out = run_child({"op": "download", "kwargs": {"dinov2_sizes": None}, "fake_load": True},
                    child_env(tmp_path, RSEG_WEIGHTS_MIRROR=hub.base_url))
    assert out["error"] is None, out["message"]
    assert Path(out["paths"][0]).read_bytes() == big
    first, second = hub.requests_for(path, "GET")
    assert first["status"] == 200 and first["sent"] == chunk + 2**20
    assert second["headers"]["range"] == f"bytes={chunk}-"
    assert second["status"] == 206 and second["sent"] == len(big) - chunk


def test_corrupt_copy_is_refused_and_removed(hub: HubServer, tmp_path: Path) -> None:
    bad = bytearray(PAYLOAD)
    bad[1000] ^= 0xFF  # same length, one byte flipped: only the SHA-256 can tell
    hub.add(SAM2.repo_id, SAM2.filename, bytes(bad), etag=sha(PAYLOAD))
    env = child_env(tmp_path, RSEG_WEIGHTS_MIRROR=hub.base_url)
    spec = {"op": "download", "kwargs": {"dinov2_sizes": None}, "fake_load": True}
    out = run_child(spec, env)
    assert out["error"] == "IntegrityError" and "is corrupt: SHA-256" in out["message"]
    assert sha(PAYLOAD) in out["message"] and out["checked"] == []  # refused before loading
    repo = tmp_path / "hf" / "hub" / ("models--" + SAM2.repo_id.replace("/", "--"))
    assert list((repo / "blobs").iterdir()) == [] and list((repo / "snapshots" / COMMIT).iterdir()) == []
    cli = run_child({"op": "cli", "argv": ["download", "--dinov2", "none", "--yes"],
                     "fake_load": True}, env)
    assert cli["exit"] == 1 and "is corrupt" in cli["stderr"]
    hub.add(SAM2.repo_id, SAM2.filename, PAYLOAD)  # the mirror is repaired: fetched anew
    assert run_child(spec, env)["error"] is None


def test_cancel_discards_the_partial_file(hub: HubServer, tmp_path: Path) -> None:
    serve_defaults(hub)
    out = run_child({"op": "download", "kwargs": {"dinov2_sizes": None}, "fake_load": True,
                     "cancel_after": 1}, child_env(tmp_path, RSEG_WEIGHTS_MIRROR=hub.base_url))
    assert out["error"] == "DownloadCancelled" and out["checked"] == []
    repo = tmp_path / "hf" / "hub" / ("models--" + SAM2.repo_id.replace("/", "--"))
    assert [p.name for p in repo.rglob("*") if p.is_file() and "blobs" in p.parts] == []
    assert not (snapshot(tmp_path, SAM2.repo_id) / SAM2.filename).exists()


def test_file_missing_on_the_mirror_is_unavailable(hub: HubServer, tmp_path: Path) -> None:
    hub.add(SAM2.repo_id, "other.pt", PAYLOAD)  # the repository exists, the file does not
    out = run_child({"op": "cli", "argv": ["download", "--dinov2", "none", "--yes"]},
                    child_env(tmp_path, RSEG_WEIGHTS_MIRROR=hub.base_url))
    assert out["exit"] == 3
    assert hub.base_url + hub.path(SAM2.repo_id, SAM2.filename) in out["stderr"]
    assert "RemoteEntryNotFoundError" in out["stderr"]


@pytest.mark.slow  # huggingface_hub retries a dead endpoint with backoff (about 25 s)
def test_unreachable_mirror_is_unavailable(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = run_child({"op": "download", "kwargs": {"dinov2_sizes": None}},
                    child_env(tmp_path, RSEG_WEIGHTS_MIRROR=f"http://127.0.0.1:{port}"))
    assert out["error"] == "DownloadError" and out["unavailable"]
    assert f"127.0.0.1:{port}" in out["message"] and "RSEG_WEIGHTS_MIRROR" in out["message"]


# ----------------------------------------------------------------------------- strict loading
@pytest.fixture(scope="module")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small real files: DINOv2-small (random weights) and two SAM 2 checkpoints that must fail."""
    import torch
    from transformers import Dinov2Config, Dinov2Model

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    dino = Dinov2Model(Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6))
    dino.save_pretrained(root / "dinov2-small")  # config.json + model.safetensors
    # a DINOv2-like state dict saved as a SAM 2 checkpoint: loads, but into the wrong model
    torch.save({"model": {"embeddings.cls_token": torch.zeros(1, 1, 384)}}, root / "not_sam2.pt")
    # a checkpoint that needs pickle (an arbitrary object): refused by weights_only=True
    torch.save({"model": {"x": torch.zeros(1)}, "extra": Path("pickled")}, root / "pickle.pt")
    return {"dinov2": root / "dinov2-small", "not_sam2": root / "not_sam2.pt",
            "pickle": root / "pickle.pt"}


def test_checkpoints_that_do_not_load_strictly_are_refused(
    hub: HubServer, tmp_path: Path, model_files: dict[str, Path]
) -> None:
    # complete, honest transfers (the SHA-256 matches) of files that are not SAM 2.1 checkpoints
    hub.add(SAM2.repo_id, SAM2.filename, model_files["not_sam2"])
    small = registry.sam2_spec("small")
    hub.add(small.repo_id, small.filename, model_files["pickle"])
    out = run_child({"op": "download", "each": [
        {"sam2_sizes": "tiny", "dinov2_sizes": None}, {"sam2_sizes": "small", "dinov2_sizes": None},
    ]}, child_env(tmp_path, RSEG_WEIGHTS_MIRROR=hub.base_url))
    (tiny, pickled) = out["each"]
    assert tiny["error"] == "IntegrityError" and "does not load as SAM 2.1 tiny" in tiny["message"]
    assert "DINOv2 checkpoint, not a SAM 2" in tiny["message"]
    assert pickled["error"] == "IntegrityError" and "weights_only=True failed" in pickled["message"]
    for spec in (SAM2, small):  # removed from the cache: the next download fetches it anew
        repo = tmp_path / "hf" / "hub" / ("models--" + spec.repo_id.replace("/", "--"))
        assert [p for p in repo.rglob("*") if p.is_file() and "refs" not in p.parts] == []


def test_real_dinov2_downloads_loads_and_verifies(
    hub: HubServer, tmp_path: Path, model_files: dict[str, Path]
) -> None:
    folder = model_files["dinov2"]
    for f in registry.DINOV2_FILES:
        hub.add(DINO.repo_id, f, folder / f, lfs=f.endswith(".safetensors"))
    digest = sha((folder / "model.safetensors").read_bytes())
    out = run_child({"op": "download", "kwargs": {"sam2_sizes": None}, "verify": True,
                     "dinov2_sha": {"small": digest}},
                    child_env(tmp_path, RSEG_WEIGHTS_MIRROR=hub.base_url))
    assert out["error"] is None, out["message"]
    (res,) = out["verify"]  # only what is present: DINOv2 small, in the cache
    assert res["ok"] and res["name"] == "dinov2-small", res["message"]
    assert res["path"] == str(snapshot(tmp_path, DINO.repo_id))
    assert "SHA-256 matches the published file" in res["message"]


# ----------------------------------------------------------------------------- CLI (no network)
def run_cli(*argv: str) -> int:
    return cli_weights.main(["weights", *argv])


def test_cli_usage_errors_and_consent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as ei:
        run_cli("download", "--sam2", "huge")
    assert ei.value.code == 2 and "choose from sam2.1-tiny" in capsys.readouterr().err
    assert run_cli("download", "--sam2", "none", "--dinov2", "none") == 2
    assert run_cli("download", "--mirror", "gopher://x", "--yes", "--dir", str(tmp_path)) == 2
    assert run_cli("download", "--mirror", str(tmp_path), "--yes", "--dir", str(tmp_path)) == 2
    assert "set RSEG_WEIGHTS_DIR to it instead" in capsys.readouterr().err
    for var in ("RSEG_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    prompts: list[str] = []
    monkeypatch.setattr(cli_weights.sys.stdin, "isatty", lambda: True, raising=False)
    monkeypatch.setattr("builtins.input", lambda p: prompts.append(p) or "n")
    fetched: list[Any] = []
    monkeypatch.setattr(weights, "download", lambda *a, **k: fetched.append(a))
    assert run_cli("download", "--dir", str(tmp_path / "w")) == 1
    assert prompts == ["Download now? [y/N] "] and fetched == []
    out = capsys.readouterr().out
    assert "Nothing downloaded" in out and "about 244 MB in all" in out
    assert run_cli("verify", "--json", "--dir", str(tmp_path / "empty")) == 1
    assert json.loads(capsys.readouterr().out)["results"] == []


def test_cli_download_with_stdin_not_a_terminal_refuses_without_yes(hub: HubServer, tmp_path: Path) -> None:
    """Issue 32: `rseg weights download` in a pipe or a script cannot ask, so without --yes it
    downloads nothing and exits 2 with a message (as `make demo`); a "y" in the pipe is not consent."""
    serve_defaults(hub)
    folder = tmp_path / "weights"
    env = child_env(tmp_path, RSEG_WEIGHTS_MIRROR=hub.base_url)
    proc = subprocess.run([sys.executable, "-m", "RetrievalSegLib.cli", "weights", "download", "--dir", str(folder)],
                          input="y\n", env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "not a terminal" in proc.stderr and "--yes" in proc.stderr and "nothing downloaded" in proc.stderr
    assert "about 244 MB in all" in proc.stdout  # the plan is shown: what --yes would fetch
    assert "Download now?" not in proc.stdout and hub.requests == []
    assert not folder.exists() or not any(folder.rglob("*"))


def test_cli_is_wired_through_add_weights_parser() -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="rseg")
    sub = parser.add_subparsers(dest="command")
    cli_weights.add_weights_parser(sub)
    args = parser.parse_args(["weights", "download"])
    assert args.func is cli_weights.cmd_download and args.sam2 == ["sam2.1-tiny"]
    assert args.dinov2 == ["small"] and not args.yes
    args = parser.parse_args(["weights", "verify", "--sam2", "tiny,base+", "--json"])
    assert args.func is cli_weights.cmd_verify and args.sam2 == ["sam2.1-tiny", "sam2.1-base-plus"]


def test_missing_weights_name_the_hugging_face_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    from RetrievalSegLib.models import loaders as models

    for var in (registry.ENV_WEIGHTS_DIR, registry.ENV_SAM2_CHECKPOINT, registry.ENV_DINOV2_PATH):
        monkeypatch.delenv(var, raising=False)
    cache = str(registry.hub_cache_dir())  # conftest's throwaway HF_HOME: empty
    with pytest.raises(models.MissingWeightsError) as ei:
        models.load_sam2("tiny", device="cpu")
    msg = str(ei.value)
    assert f"the Hugging Face cache ({cache}) (facebook/sam2.1-hiera-tiny)" in msg
    assert "rseg weights download --sam2 sam2.1-tiny" in msg and registry.ENV_WEIGHTS_DIR in msg
    with pytest.raises(models.MissingWeightsError, match="facebook/dinov2-small"):
        models.load_dinov2("small", device="cpu")


def test_worker_download_job_reports_progress_cancels_and_refuses_a_bad_file(
    hub: HubServer, tmp_path: Path
) -> None:
    """The Slicer panel's path: a `download` job in the worker process, progress, cancel, errors."""
    import time

    from RetrievalSegLib.worker import protocol as wp
    from RetrievalSegLib.worker.client import WorkerClient

    big = os.urandom(24 * 2**20)  # three of huggingface_hub's 10 MiB chunks
    hub.add(SAM2.repo_id, SAM2.filename, big)
    hub.add(DINO.repo_id, "config.json", DINO_CONFIG, lfs=False)
    hub.add(DINO.repo_id, "model.safetensors", DINO_WEIGHTS)
    hub.delay = 0.01  # ~4 s for the checkpoint: the cancel arrives while it is being sent
    folder = tmp_path / "weights"
    settings = wp.EngineSettings(device="cpu", weights_dir=str(folder)).to_json()
    client = WorkerClient(env=child_env(tmp_path, RSEG_WEIGHTS_MIRROR=hub.base_url),
                          log_dir=tmp_path, cancel_grace_s=60.0)
    try:
        job = client.submit("download", {"settings": settings})
        events: list[Any] = []
        deadline = time.monotonic() + 180
        while not any(e.kind == "progress" and e.total == len(big) for e in events):
            assert time.monotonic() < deadline and job.outcome is None, [e.kind for e in events]
            events += job.wait(0.05)
        job.cancel()
        events += job.wait(120)
        assert job.outcome == "cancelled", events[-1].message
        done = max(e.done for e in events if e.kind == "progress" and e.total == len(big))
        assert done < len(big) and not (folder / SAM2.filename).exists()
        assert hub.requests_for(hub.path(SAM2.repo_id, SAM2.filename), "GET")[0]["sent"] < len(big)
        # a complete transfer of a file that is no SAM 2.1 checkpoint: the job fails and says why
        hub.delay = 0.0
        job = client.submit("download", {"settings": settings})
        events = job.wait(240)
        assert job.outcome == "failed" and "does not load as SAM 2.1 tiny" in events[-1].message
        assert not (folder / SAM2.filename).exists()
    finally:
        client.stop()
