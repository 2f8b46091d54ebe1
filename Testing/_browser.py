"""Headless Chromium driven through the DevTools protocol, for the report tests.

Chromium is Debian's `chromium` package (`apt-get install -y chromium`; `.ci/run` installs it).
It runs with a new empty profile, no sandbox (root in CI), no GPU, and every background service
off (`--disable-background-networking`, component updates, sync, QUIC), and it is only ever given
`file://` URLs; its DevTools endpoint listens on 127.0.0.1 (`--remote-debugging-address`), which
the conftest's loopback guard allows. The protocol goes through `websocket-client` (from the
hash-pinned lock): one WebSocket to the browser target with flattened sessions.

`Browser.render(path)` opens a page, waits for its load event and for every image to decode,
and returns what the tests check: console errors and uncaught exceptions (a Content-Security-
Policy violation is a console error), the URLs of every request, dialogs opened (an injected
`alert` would be one), and the result of a JavaScript expression; `screenshot` gives a PNG.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

INSTALL_HINT = ("headless Chromium is needed by the report tests and is not installed: install Debian's package "
                "with `sudo apt-get install -y chromium` (or set RSEG_CHROMIUM to a Chromium/Chrome binary); "
                ".ci/run installs it")

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--disable-extensions", "--no-default-browser-check",
         "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", "--hide-scrollbars",
         "--force-device-scale-factor=1", "--window-size=1300,900"]


def chromium_binary() -> str | None:
    """The Chromium to use: $RSEG_CHROMIUM, else chromium / chromium-browser on PATH."""
    env = os.environ.get("RSEG_CHROMIUM")
    if env:
        return shutil.which(env)
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


class Browser:
    """One headless Chromium process with its own throwaway profile."""

    def __init__(self, binary: str, timeout: float = 60.0) -> None:
        import websocket  # websocket-client, from the lock

        self.profile = Path(tempfile.mkdtemp(prefix="rseg-chromium-"))
        # Chromium's own log goes to a file (a pipe nobody reads would fill and block it).
        self.log = self.profile.with_name(self.profile.name + ".log")
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([binary, *FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while not (port_file.is_file() and len(port_file.read_text().splitlines()) >= 2):
            if self.proc.poll() is not None:
                err = self.log.read_text(encoding="utf-8", errors="replace")[-2000:]
                raise RuntimeError(f"chromium exited with code {self.proc.returncode}: {err}")
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError("chromium did not open its DevTools port within the timeout")
            time.sleep(0.05)
        port, path = port_file.read_text().splitlines()[:2]
        self.ws = websocket.create_connection(f"ws://127.0.0.1:{int(port)}{path}", timeout=timeout,
                                              suppress_origin=True)
        self.timeout = timeout
        self._id = 0
        self.events: list[dict] = []

    # -- protocol
    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        """Send a command and wait for its answer (events meanwhile are kept in self.events)."""
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        self.ws.send(json.dumps(msg))
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            reply = json.loads(self.ws.recv())
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)
        raise TimeoutError(f"no answer to {method}")

    def wait_event(self, method: str, session: str, timeout: float | None = None) -> dict:
        deadline = time.monotonic() + (timeout or self.timeout)
        seen = 0
        while time.monotonic() < deadline:
            for ev in self.events[seen:]:
                if ev.get("method") == method and ev.get("sessionId") == session:
                    return ev
            seen = len(self.events)
            self.ws.settimeout(max(0.1, deadline - time.monotonic()))
            self.events.append(json.loads(self.ws.recv()))
        raise TimeoutError(f"no {method} event")

    # -- pages
    def render(self, html_file: Path, expression: str, width: int = 1300) -> dict[str, Any]:
        """Open `html_file` (file:// only), wait for load and image decoding, evaluate `expression`."""
        url = Path(html_file).resolve().as_uri()
        assert url.startswith("file://")
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.events.clear()
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable", session=session)
        self.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": 900, "deviceScaleFactor": 1,
                                                         "mobile": False}, session=session)
        self.send("Page.navigate", {"url": url}, session=session)
        self.wait_event("Page.loadEventFired", session)
        value = self.evaluate(expression, session)
        result = {"value": value, "session": session, "target": target}
        result["console_errors"] = [
            e["params"] for e in self.events if e.get("sessionId") == session and (
                e.get("method") == "Runtime.exceptionThrown"
                or (e.get("method") == "Runtime.consoleAPICalled" and e["params"].get("type") in ("error", "assert"))
                or (e.get("method") == "Log.entryAdded" and e["params"]["entry"].get("level") == "error"))]
        result["requests"] = [e["params"]["request"]["url"] for e in self.events
                              if e.get("sessionId") == session and e.get("method") == "Network.requestWillBeSent"]
        result["dialogs"] = [e["params"] for e in self.events
                             if e.get("sessionId") == session and e.get("method") == "Page.javascriptDialogOpening"]
        return result

    def evaluate(self, expression: str, session: str) -> Any:
        """Value of a JavaScript expression (awaited when it is a promise); exceptions raise."""
        res = self.send("Runtime.evaluate", {"expression": expression, "awaitPromise": True, "returnByValue": True},
                        session=session)
        if "exceptionDetails" in res:
            raise RuntimeError(f"page script failed: {res['exceptionDetails']}")
        return res["result"].get("value")

    def screenshot(self, session: str, path: Path, max_height: int = 4000) -> Path:
        """Full-page PNG (up to max_height CSS pixels tall) written to `path`."""
        metrics = self.send("Page.getLayoutMetrics", session=session)
        size = metrics.get("cssContentSize") or metrics["contentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], max_height), "scale": 1}
        data = self.send("Page.captureScreenshot", {"format": "png", "clip": clip, "captureBeyondViewport": True},
                         session=session)["data"]
        Path(path).write_bytes(base64.b64decode(data))
        return Path(path)

    def close_page(self, target: str) -> None:
        self.send("Target.closeTarget", {"targetId": target})

    def close(self) -> None:
        try:
            if getattr(self, "ws", None) is not None:
                self.ws.close()
        finally:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=10)
            shutil.rmtree(self.profile, ignore_errors=True)
            self.log.unlink(missing_ok=True)


#: What every report page is checked for (evaluated in the page): each image decoded, its natural
#: size, whether it is blank (one colour), and the texts and attributes the tests look at.
PAGE_CHECKS = r"""
(async () => {
  const imgs = Array.from(document.images);
  await Promise.all(imgs.map(i => i.decode().catch(e => null)));
  const canvas = document.createElement("canvas");
  const ctx = canvas.getContext("2d", {willReadFrequently: true});
  const images = imgs.map(img => {
    let colors = 0, gray = 0, pixels = [];
    if (img.complete && img.naturalWidth > 0) {
      canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
      ctx.drawImage(img, 0, 0);
      const d = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
      const seen = new Set();
      for (let p = 0; p < d.length; p += 4) {
        const key = (d[p] << 16) | (d[p + 1] << 8) | d[p + 2];
        if (d[p] === d[p + 1] && d[p + 1] === d[p + 2]) { gray++; } else { seen.add(key); }
        if (seen.size > 4096) { break; }
      }
      colors = seen.size;
      pixels = Array.from(seen).slice(0, 64);
      const first = (d[0] << 16) | (d[1] << 8) | d[2];
      let differs = false;
      for (let p = 4; p < d.length; p += 4) {
        if (((d[p] << 16) | (d[p + 1] << 8) | d[p + 2]) !== first) { differs = true; break; }
      }
      return {cls: img.className, alt: img.alt, complete: img.complete, w: img.naturalWidth, h: img.naturalHeight,
              blank: !differs, nongray_colors: colors, colors: pixels,
              card: (img.closest("[data-slice-index]") || {}).dataset ? img.closest("[data-slice-index]")?.dataset.sliceIndex : null,
              support: !!img.closest(".support")};
    }
    return {cls: img.className, alt: img.alt, complete: img.complete, w: img.naturalWidth, h: img.naturalHeight,
            blank: true, nongray_colors: 0, colors: []};
  });
  return {
    kind: document.body.dataset.kind,
    title: document.title,
    text: document.body.innerText,
    scripts: document.scripts.length,
    images: images,
    legend: Array.from(document.querySelectorAll(".legend .swatch")).map(s => s.dataset.color),
    slices: Array.from(document.querySelectorAll(".slice-card")).map(c => ({index: Number(c.dataset.sliceIndex),
              tags: c.dataset.tags, supports: c.querySelectorAll(".support").length,
              support_images: c.querySelectorAll(".support img").length})),
    cases: Array.from(document.querySelectorAll(".case")).map(c => ({case: c.dataset.case, h3: c.querySelector("h3").textContent,
              panels: c.querySelectorAll(".panels img").length})),
    rows: Array.from(document.querySelectorAll("#volumes tbody tr")).map(r => ({case: r.dataset.case,
              flags: r.dataset.flags, caseText: r.cells[3].textContent, status: r.cells[4].textContent,
              images: r.querySelectorAll("img").length})),
    banner: !!document.getElementById("random-weights"),
    banner_color: document.getElementById("random-weights") ? getComputedStyle(document.getElementById("random-weights")).backgroundColor : null,
  };
})()
"""
