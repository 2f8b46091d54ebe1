"""The worker on another host: `ssh -T user@host <python> -m RetrievalSegLib.worker`.

Nothing new listens on the network: the client starts the user's own `ssh` (their configuration,
keys and agent; RetrievalSeg stores no password) and speaks the worker protocol over its standard
streams, arrays included (`worker.protocol`). Host keys are checked strictly: an unknown host is
refused with a message saying how to accept it, never accepted silently (`StrictHostKeyChecking=yes`
on the command line wins over any `ssh_config`). The worker ends when the connection drops (its
stdin closes), so nothing is left running on the server.
"""
from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass
from typing import Any, Sequence

#: What `ssh` is always given: no prompt (a password or a host-key question would hang a job),
#: strict host keys, and keep-alives so that a dead network ends the job instead of hanging it.
SSH_OPTIONS = (
    "-T", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
    "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4",
)
DEFAULT_REMOTE_PYTHON = "python3"
_TARGET = re.compile(r"(?:(?P<user>[A-Za-z0-9_.][A-Za-z0-9_.-]*)@)?(?P<host>[A-Za-z0-9_.][A-Za-z0-9_.-]*|\[[0-9A-Fa-f:.]+\])"
                     r"(?::(?P<port>[0-9]{1,5}))?/?")


@dataclass(frozen=True)
class SshTarget:
    """Where the worker runs: `user@host[:port]` and the Python command there."""

    host: str
    user: str | None = None
    port: int | None = None
    python: str = DEFAULT_REMOTE_PYTHON

    @classmethod
    def parse(cls, text: str, python: str | None = None) -> "SshTarget":
        """`ssh://user@host[:port]` or `user@host[:port]`; ValueError (a usage error) otherwise."""
        spec = text.strip()
        if spec.startswith("ssh://"):
            spec = spec[len("ssh://"):]
        m = _TARGET.fullmatch(spec)
        if not m:  # also refuses a host that starts with "-" (it would be read as an ssh option)
            raise ValueError(f"not a worker host: {text!r}; expected ssh://user@host[:port] (or user@host)")
        port = int(m["port"]) if m["port"] else None
        if port is not None and not 0 < port < 65536:
            raise ValueError(f"not a port: {m['port']} in {text!r}")
        command = (python or "").strip() or DEFAULT_REMOTE_PYTHON
        return cls(m["host"].strip("[]"), m["user"], port, command)

    @property
    def destination(self) -> str:
        """`user@host` as ssh takes it."""
        return f"{self.user}@{self.host}" if self.user else self.host

    def __str__(self) -> str:
        return f"ssh://{self.destination}" + (f":{self.port}" if self.port else "")

    def command(self, idle_timeout_s: float, ssh: str = "ssh", options: Sequence[str] = ()) -> list[str]:
        """The local command line: ssh, its options, the user's extra options, the remote worker.

        The remote side starts in `/` (a folder named like a package in the login folder would
        shadow it: `python -m` puts the working folder first on sys.path); a bank path is taken
        on the server, absolute or `~/...`.
        """
        port = ["-p", str(self.port)] if self.port else []
        remote = f"cd / && exec {self.python} -m RetrievalSegLib.worker --idle-timeout {float(idle_timeout_s)!r}"
        return [ssh, *SSH_OPTIONS, *port, *options, "--", self.destination, remote]

    def accept_hint(self) -> str:
        """The command that shows and accepts the host key, to run once in a terminal."""
        port = f" -p {self.port}" if self.port else ""
        return f"ssh{port} {self.destination} true"


def ssh_options_from_env(env: dict[str, str] | None = None) -> list[str]:
    """Extra ssh options from $RSEG_SSH_OPTIONS (shell words, e.g. `-i ~/.ssh/gpu -o UserKnownHostsFile=...`)."""
    text = (env if env is not None else os.environ).get("RSEG_SSH_OPTIONS", "")
    return shlex.split(text)


def describe_ssh_failure(target: SshTarget, log_text: str, code: int | None) -> str | None:
    """What went wrong when ssh ended before the worker said "ready"; None if ssh did not say."""
    text = log_text or ""
    if "Host key verification failed" in text or "host key for" in text.lower() and "known" in text.lower():
        changed = "REMOTE HOST IDENTIFICATION HAS CHANGED" in text
        what = ("the host key of {t} has CHANGED since it was accepted: this may be an attack, or the "
                "server was reinstalled. Ask its administrator before removing the old key "
                "(ssh-keygen -R {h})") if changed else (
                "the host key of {t} is not known, and RetrievalSeg never accepts one silently. Check "
                "its fingerprint with the server's administrator and accept it once in a terminal: "
                "`{hint}` (answer yes), then try again")
        return "Could not connect to the worker: " + what.format(t=target, h=target.host, hint=target.accept_hint()) + "."
    if "Permission denied" in text:
        return (f"Could not connect to the worker: {target} refused the login (Permission denied). RetrievalSeg "
                "uses your own ssh keys and agent and never asks for a password: set up key login "
                f"(ssh-copy-id) and check that `{target.accept_hint()}` works without a prompt.")
    if code == 255:
        last = [line for line in text.splitlines() if line.strip()][-1:] or ["no message"]
        return f"Could not connect to the worker on {target} (ssh exit code 255): {last[0]}"
    if code == 127 or "No module named RetrievalSegLib" in text or "not found" in text:
        return (f"The worker could not start on {target}: `{target.python} -m RetrievalSegLib.worker` failed "
                "there. Install RetrievalSeg on the server (see README, Remote GPU) or set the remote "
                "Python command.")
    return None


class RemoteBank:
    """A support bank on the worker's host, as the worker described it (`bank_info`, or the
    `bank_state` a bank job returns with `describe_bank`): what the Slicer panel and the logic read
    of a bank they cannot open themselves. Entries carry metadata only; their images stay there.
    """

    def __init__(self, state: dict[str, Any], where: str) -> None:
        self.where = where  # ssh://user@host[:port]: the host whose path `path` is
        self.update(state)

    def update(self, state: dict[str, Any]) -> None:
        """Take the worker's newer description (after a job that changed the bank)."""
        from ..bank.format import LabelInfo

        self.path = str(state["path"])
        self.bank_id = str(state["bank_id"])
        self.revision = int(state["revision"])
        self.labels = tuple(LabelInfo(int(d["value"]), str(d["name"]), tuple(d["color"])) for d in state["labels"])
        self._entries = [RemoteEntry(str(e["id"]), str(e["case_id"]), int(e["axis"]), int(e["index"]),
                                     str(e["origin"])) for e in state["entries"]]

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> list["RemoteEntry"]:
        """The active entries (metadata)."""
        return list(self._entries)

    def entry(self, entry_id: str) -> "RemoteEntry":
        """The active entry with this id; KeyError if the worker did not list it."""
        for e in self._entries:
            if e.id == entry_id:
                return e
        raise KeyError(f"entry {entry_id} is not in the bank {self.path} on {self.where}")

    def reload(self) -> None:
        """Nothing to re-read here: the worker's jobs return the bank's state (`update`)."""

    def check_k(self, k: int, case_id: str | None = None, case_policy: str = "ignore") -> None:
        """ValueError when the bank lists fewer active entries than k (the worker checks exactly)."""
        if len(self) < int(k):
            raise ValueError(f"the support bank {self.describe()} has {len(self)} entries, fewer than k = {k}; "
                             "add annotated slices or lower --k")

    def describe(self) -> str:
        """"/srv/banks/liver on user@gpu-server": the path and the host it is on."""
        return f"{self.path} on {self.where.removeprefix('ssh://')}"


@dataclass(frozen=True)
class RemoteEntry:
    """An entry of a RemoteBank: what the worker says of it (no image)."""

    id: str
    case_id: str
    axis: int
    index: int
    origin: str
