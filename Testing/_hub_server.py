"""A small Hugging Face Hub compatible server on 127.0.0.1 for download tests.

It speaks what `huggingface_hub.hf_hub_download` needs from an endpoint (`HF_ENDPOINT`): HEAD and
GET on `/<repo_id>/resolve/<revision>/<filename>` with `X-Repo-Commit`, `ETag` (the SHA-256 for
LFS files, also as `X-Linked-Etag` / `X-Linked-Size`), `Content-Length`, HTTP Range, and the Hub's
`X-Error-Code` on a 404. It never offers Xet (no `X-Xet-Hash`): a plain HTTP mirror.

    with HubServer() as hub:
        hub.add("facebook/sam2.1-hiera-tiny", "sam2.1_hiera_tiny.pt", data)   # bytes or a Path
        hub.base_url           # http://127.0.0.1:PORT  (the HF_ENDPOINT / RSEG_WEIGHTS_MIRROR)
        hub.cut[path] = (offset, times)   # cut the next `times` GET bodies at `offset`
        hub.delay = 0.01       # seconds per 64 KiB block sent (a slow link)
        hub.requests           # [{"method", "path", "headers" (lower-case), "status", "sent"}]
"""
from __future__ import annotations

import hashlib
import re
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote

COMMIT = "0123456789abcdef0123456789abcdef01234567"
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")


@dataclass
class HubFile:
    source: bytes | Path
    etag: str  # what the server announces (tests may announce a hash the bytes do not have)
    lfs: bool

    @property
    def size(self) -> int:
        return len(self.source) if isinstance(self.source, bytes) else self.source.stat().st_size


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    protocol_version = "HTTP/1.0"  # one request per connection; a cut body ends with the socket

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence the log
        pass

    def do_HEAD(self) -> None:  # noqa: N802
        self._serve(body=False)

    def do_GET(self) -> None:  # noqa: N802
        self._serve(body=True)

    def _error(self, record: dict[str, Any], code: int, error_code: str) -> None:
        record["status"] = code
        self.send_response(code)
        self.send_header("X-Error-Code", error_code)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _serve(self, body: bool) -> None:
        owner = self.server.owner
        path = unquote(self.path.split("?", 1)[0])
        record: dict[str, Any] = {"method": self.command, "path": path,
                                  "headers": {k.lower(): v for k, v in self.headers.items()}, "status": None, "sent": 0}
        with owner.lock:
            owner.requests.append(record)
        m = _RESOLVE.match(path)
        if m is None or m["repo"] not in owner.repos:
            self._error(record, 404, "RepoNotFound")
            return
        entry = owner.repos[m["repo"]].get(m["file"])
        if entry is None:
            self._error(record, 404, "EntryNotFound")
            return
        length = entry.size
        start, status = 0, 200
        rm = _RANGE.match(self.headers.get("Range", "") or "")
        if body and rm:
            start = int(rm.group(1))
            if start >= length:
                record["status"] = 416
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{length}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        record["status"] = status
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length - start))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{entry.etag}"')
        if entry.lfs:
            self.send_header("X-Linked-Etag", f'"{entry.etag}"')
            self.send_header("X-Linked-Size", str(length))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{length - 1}/{length}")
        self.end_headers()
        if not body:
            return
        stop = length
        with owner.lock:
            cut = owner.cut.get(path)
            if cut is not None and cut[1] > 0:
                stop = max(start, min(length, cut[0]))
                owner.cut[path] = (cut[0], cut[1] - 1)
        try:
            self._send(entry.source, start, stop, record)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away (cancelled)

    def _send(self, source: bytes | Path, start: int, stop: int, record: dict[str, Any]) -> None:
        block = 1 << 16
        data = source if isinstance(source, bytes) else None
        with (open(source, "rb") if data is None else _NoFile()) as f:
            pos = start
            if f is not None:
                f.seek(start)
            while pos < stop:
                n = min(block, stop - pos)
                chunk = data[pos:pos + n] if data is not None else f.read(n)
                if not chunk:
                    break
                self.wfile.write(chunk)
                record["sent"] += len(chunk)
                pos += len(chunk)
                if self.server.owner.delay:
                    time.sleep(self.server.owner.delay)


class _NoFile:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: "HubServer"

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that hangs up mid-body is part of the tests


class HubServer:
    """Serves Hub repositories from memory or disk on an ephemeral 127.0.0.1 port."""

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, HubFile]] = {}
        self.cut: dict[str, tuple[int, int]] = {}
        self.delay = 0.0
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self._httpd: _Server | None = None

    def add(self, repo_id: str, filename: str, source: bytes | Path, *, lfs: bool = True,
            etag: str | None = None) -> str:
        """Serve `source` as `filename` of `repo_id`; return its resolve path on the server.

        LFS files announce their SHA-256 (the Hub's rule); others a git-blob-like SHA-1.
        `etag` overrides what is announced (a mirror whose copy is corrupt).
        """
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
        digest = hashlib.sha256(data).hexdigest() if lfs else hashlib.sha1(data).hexdigest()
        self.repos.setdefault(repo_id, {})[filename] = HubFile(source, etag or digest, lfs)
        return self.path(repo_id, filename)

    @staticmethod
    def path(repo_id: str, filename: str) -> str:
        """The resolve path of a file (revision main)."""
        return f"/{repo_id}/resolve/main/{filename}"

    @property
    def base_url(self) -> str:
        """http://127.0.0.1:PORT"""
        assert self._httpd is not None, "server not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def requests_for(self, path: str, method: str | None = None) -> list[dict[str, Any]]:
        """Requests received for `path` (optionally one method)."""
        with self.lock:
            return [r for r in self.requests
                    if r["path"] == path and (method is None or r["method"] == method)]

    def start(self) -> "HubServer":
        """Listen on 127.0.0.1 and serve in a daemon thread."""
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.owner = self
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
