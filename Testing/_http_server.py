"""A small real HTTP file server on 127.0.0.1 for download tests (Range, truncation, headers).

    with FileServer() as srv:
        srv.add("/dinov2-small/config.json", b"{...}")        # bytes or a Path on disk
        url = srv.url("/dinov2-small/config.json")
        srv.requests  # [{"path", "headers", "status", "sent"}] one per request, in order
"""
from __future__ import annotations

import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    protocol_version = "HTTP/1.0"  # one request per connection; a cut body ends with the socket

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence the log
        pass

    def do_GET(self) -> None:  # noqa: N802
        owner = self.server.owner
        record: dict[str, Any] = {"path": self.path, "headers": dict(self.headers), "status": None,
                                  "sent": 0}
        with owner.lock:
            owner.requests.append(record)
        redirect = owner.redirects.get(self.path)
        if redirect is not None:
            target, headers = redirect
            record["status"] = 302
            self.send_response(302)
            self.send_header("Location", target)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        source = owner.routes.get(self.path)
        if source is None:
            record["status"] = 404
            self.send_error(404, "not found")
            return
        length = len(source) if isinstance(source, bytes) else source.stat().st_size
        start, status = 0, 200
        m = _RANGE.match(self.headers.get("Range", "") or "")
        if m and not owner.ignore_range:
            start = int(m.group(1))
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
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{length - 1}/{length}")
        for k, v in owner.headers.get(self.path, {}).items():
            self.send_header(k, v)
        self.end_headers()
        stop = length
        cut = owner.truncate.get(self.path)
        if cut is not None and cut[1] != 0:
            stop = max(start, min(length, cut[0]))
            owner.truncate[self.path] = (cut[0], cut[1] - 1 if cut[1] is not None else None)
        try:
            self._send(source, start, stop, record)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away (cancelled)

    def _send(self, source: bytes | Path, start: int, stop: int, record: dict[str, Any]) -> None:
        block = 1 << 16
        if isinstance(source, bytes):
            pos = start
            while pos < stop:
                chunk = source[pos:min(stop, pos + block)]
                self.wfile.write(chunk)
                record["sent"] += len(chunk)
                pos += len(chunk)
            return
        with open(source, "rb") as f:
            f.seek(start)
            pos = start
            while pos < stop:
                chunk = f.read(min(block, stop - pos))
                if not chunk:
                    break
                self.wfile.write(chunk)
                record["sent"] += len(chunk)
                pos += len(chunk)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: "FileServer"

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that hangs up mid-body is part of the tests


class FileServer:
    """Serves files from memory or disk on an ephemeral 127.0.0.1 port, recording each request."""

    def __init__(self) -> None:
        self.routes: dict[str, bytes | Path] = {}
        self.headers: dict[str, dict[str, str]] = {}  # extra response headers per path
        self.redirects: dict[str, tuple[str, dict[str, str]]] = {}
        # path -> (byte offset where the body is cut, how many more responses to cut or None)
        self.truncate: dict[str, tuple[int, int | None]] = {}
        self.ignore_range = False
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    def add(self, path: str, source: bytes | Path, headers: dict[str, str] | None = None) -> str:
        """Serve `source` at `path`; return its full URL."""
        self.routes[path] = source
        if headers:
            self.headers[path] = headers
        return self.url(path)

    @property
    def base_url(self) -> str:
        """http://127.0.0.1:PORT"""
        assert self._httpd is not None, "server not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def url(self, path: str) -> str:
        """The full URL of `path`."""
        return self.base_url + path

    def requests_for(self, path: str) -> list[dict[str, Any]]:
        """Requests received for `path`."""
        with self.lock:
            return [r for r in self.requests if r["path"] == path]

    def start(self) -> "FileServer":
        """Listen on 127.0.0.1 and serve in a daemon thread."""
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.owner = self
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> "FileServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
