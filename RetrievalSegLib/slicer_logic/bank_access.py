"""The panel's support bank, on this computer or on the worker's host: open, create, verify.

A mixin of `logic.RetrievalSegLogic` (which provides `client`, `bank`, `_submit`, `_wait_result`,
`_require_idle`). With the worker on this computer the bank is a `SupportBank` opened here (reading
needs no model). With the worker on another host (`worker.remote`) a bank path is that host's: the
worker opens the bank and describes it (`bank_info`), every job that changes it returns its new
state (`describe_bank`), and the panel holds a `RemoteBank` (labels and entries, no images).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from .mrml_bridge import _labels, labels_from_segmentation
from ..worker.client import WorkerClient, WorkerJob, labels_json
from ..worker.protocol import JobEvent


class BankAccess:
    """Open, create and verify the logic's support bank, wherever the worker runs."""

    bank: Any
    client: WorkerClient

    @property
    def remote(self) -> bool:
        """True when the worker runs on another host: bank paths are that host's (worker.remote)."""
        return self.client.target is not None

    def bank_location(self) -> str:
        """Which host's bank is open: "/srv/banks/liver on user@gpu-server" ("" when none is)."""
        if self.bank is None:
            return ""
        return self.bank.describe() if self.remote else f"{self.bank.path} on this computer"

    def use_client(self, client: WorkerClient) -> None:
        """Run the next jobs on `client` (the panel's "Run on" changed): the old worker stops, and a
        bank of the old host is closed (its path means nothing on the new one)."""
        self._require_idle()
        old, self.client = self.client, client
        old.stop()
        if old.target != client.target:
            self.bank = None

    def open_bank(self, path: str | Path) -> Any:
        """Open the support bank at `path` and use it (reading needs no model); with a remote worker
        the path is on its host, and the worker describes the bank (blocking)."""
        from ..bank.support_bank import SupportBank

        self._require_idle()
        if self.remote:
            self.start_open_bank(path)
            return self._wait_result()
        self.bank = SupportBank.open(path)
        return self.bank

    def start_open_bank(self, path: str | Path) -> WorkerJob:
        """Open a bank on the worker's host (absolute or ~/... there); result: a RemoteBank."""
        from ..worker.remote import RemoteBank

        if not self.remote:
            raise RuntimeError("the worker runs on this computer: open its banks with open_bank")
        text = self._remote_path(path)

        def opened(event: JobEvent) -> None:
            if event.kind == "finished":
                self.bank = event.result = RemoteBank(event.result, self.client.where)

        return self._submit("bank_info", {"bank": text}, after=opened)

    def _remote_path(self, path: str | Path) -> str:
        text = str(path).strip()
        if not text.startswith(("/", "~")):
            raise ValueError(f"{text!r}: a bank on {self.client.where} is a path there; give it absolute or as ~/...")
        return text

    def _require_bank(self) -> Any:
        if self.bank is None:
            raise RuntimeError("no support bank is open; open one or create one from a segmentation")
        return self.bank

    def _reload_bank(self, event: JobEvent | None = None) -> None:
        state = (event.result or {}).get("bank_state") if event is not None and event.kind == "finished" else None
        if state is not None and self.remote and self.bank is not None:
            self.bank.update(state)  # a remote bank as the job left it
        elif self.bank is not None:
            self.bank.reload()

    def start_verify(self, repair: bool = False, reembed: bool = False) -> WorkerJob:
        """Check the open bank's files (repair / re-embed in the worker); result: the report JSON."""
        bank = self._require_bank()
        return self._submit("verify", {"bank": str(bank.path), "repair": repair, "reembed": reembed},
                            after=self._reload_bank)

    def start_create_bank(self, path: str | Path, labels: Sequence[Any]) -> WorkerJob:
        """Make a new bank with these labels, tied to the embedder of the current settings (with a
        remote worker: at this path on its host)."""
        self._require_idle()
        path = self._remote_path(path) if self.remote else path

        def opened(event: JobEvent) -> None:
            if event.kind == "finished" and self.remote:
                from ..worker.remote import RemoteBank

                self.bank = event.result = RemoteBank(event.result["bank_state"], self.client.where)
            elif event.kind == "finished":
                from ..bank.support_bank import SupportBank

                self.bank = SupportBank.open(path)
                event.result = self.bank

        return self._submit("create_bank", {"bank": str(path), "labels": labels_json(_labels(labels))}, after=opened)

    def start_create_bank_from_segmentation(self, path: str | Path, segmentation_node: Any) -> WorkerJob:
        """A new bank whose labels are the segmentation's segments (names and colours)."""
        return self.start_create_bank(path, labels_from_segmentation(segmentation_node))

    def create_bank(self, path: str | Path, labels: Sequence[Any]) -> Any:
        """Blocking `start_create_bank`; returns the opened bank."""
        self.start_create_bank(path, labels)
        return self._wait_result()

    def create_bank_from_segmentation(self, path: str | Path, segmentation_node: Any) -> Any:
        """Blocking `start_create_bank_from_segmentation`; returns the opened bank."""
        self.start_create_bank_from_segmentation(path, segmentation_node)
        return self._wait_result()
