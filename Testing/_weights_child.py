"""Runs one weights operation in a fresh process and prints its outcome as JSON (last line).

huggingface_hub reads HF_ENDPOINT / HF_HUB_OFFLINE once, at import, so every download test runs
here, in a subprocess started with the environment under test (RSEG_WEIGHTS_MIRROR, RSEG_OFFLINE,
HF_HOME...). Outgoing connections to anything but loopback are refused, as in conftest.

    python _weights_child.py '{"op": "download", "kwargs": {...}, "fake_load": true, ...}'
"""
from __future__ import annotations

import ipaddress
import json
import socket
import sys
from pathlib import Path
from typing import Any

_real_connect = socket.socket.connect


def _loopback_only(self: socket.socket, address: Any) -> Any:
    if self.family in (socket.AF_INET, socket.AF_INET6):
        host = str(address[0])
        if host != "localhost" and not ipaddress.ip_address(host.split("%")[0]).is_loopback:
            raise ConnectionRefusedError(f"tests may only contact loopback addresses, not {host!r}")
    return _real_connect(self, address)


socket.socket.connect = _loopback_only  # type: ignore[method-assign]


def main(spec: dict[str, Any]) -> dict[str, Any]:
    import RetrievalSegLib  # noqa: F401 - maps RSEG_* onto HF_* before huggingface_hub loads
    from RetrievalSegLib.cli import weights as cli_weights
    from RetrievalSegLib.models import registry
    from RetrievalSegLib.models import weights

    out: dict[str, Any] = {"progress": [], "checked": []}
    for size, digest in (spec.get("dinov2_sha") or {}).items():  # the published hash, replaced
        import dataclasses

        registry.DINOV2_MODELS[size] = dataclasses.replace(
            registry.DINOV2_MODELS[size], safetensors_sha256=digest
        )
    if spec.get("fake_load"):  # payloads are random bytes: record the strict-load call instead
        def record(item: Any, path: Path) -> None:
            out["checked"].append([item.name, str(path), path.is_file()])

        weights._check_loadable = record  # type: ignore[assignment]
    from huggingface_hub import constants

    out["hub"] = {"endpoint": constants.ENDPOINT, "offline": constants.HF_HUB_OFFLINE,
                  "cache": constants.HF_HUB_CACHE}
    try:
        import hf_xet  # noqa: F401

        out["hf_xet_installed"] = True
    except ImportError:
        out["hf_xet_installed"] = False
    op = spec["op"]
    try:
        if op == "download":
            cancel_after = spec.get("cancel_after")

            def progress(done: int, total: int | None, name: str) -> None:
                out["progress"].append([done, total, name])

            def cancel() -> bool:
                return cancel_after is not None and len(out["progress"]) >= cancel_after

            if "each" in spec:  # several downloads in one process (each may fail on its own)
                out["each"] = []
                for kwargs in spec["each"]:
                    try:
                        weights.download(progress=progress, cancel=cancel, **kwargs)
                        out["each"].append({"error": None})
                    except weights.WeightsError as e:
                        out["each"].append({"error": type(e).__name__, "message": str(e)})
            else:
                paths = weights.download(progress=progress, cancel=cancel, **spec["kwargs"])
                out["paths"] = [str(p) for p in paths]
            if spec.get("locate"):
                from RetrievalSegLib.models import loaders as models

                out["sam2"] = str(models.default_sam2_checkpoint("tiny"))
                out["dinov2"] = str(models.default_dinov2_folder("small"))
                out["list"] = [s.to_json() for s in weights.list_weights()]
            if spec.get("verify"):
                out["verify"] = [r.to_json() for r in weights.verify()]
        elif op == "cli":
            out["exit"] = cli_weights.main(["weights", *spec["argv"]])
        elif op == "hub_download":  # the library alone, to show what the mapped variables do
            from huggingface_hub import hf_hub_download

            out["paths"] = [hf_hub_download(spec["repo_id"], spec["filename"])]
        elif op == "env":  # only what huggingface_hub read at import (out["hub"])
            pass
        else:
            raise SystemExit(f"unknown op {op!r}")
        out["error"] = None
    except Exception as e:  # the test asserts on the type and the message
        out["error"] = type(e).__name__
        out["message"] = str(e)
        out["unavailable"] = getattr(e, "unavailable", None)
    return out


if __name__ == "__main__":
    result = main(json.loads(sys.argv[1]))
    sys.stdout.flush()
    print("\n" + json.dumps(result))
