"""OpenSSH's sshd on 127.0.0.1 for the remote-worker tests (never another address).

A free port, a temporary host key, an authorized key for the current user, a config in a temp
folder (`sshd -f`), run in the foreground (`-D -e`) so that the fixture owns its pid and ends it.
The client side gets its own known_hosts file and key; the user's ssh configuration, agent and
known hosts are not used. `.ci/run` installs Debian's `openssh-server`.
"""
from __future__ import annotations

import getpass
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

SSHD_CANDIDATES = ("/usr/sbin/sshd", "/usr/local/sbin/sshd")
#: This checkout: the server's side imports the library from here too, so the worker over ssh runs
#: the code under test (a mutant copy included), not the editable install.
ROOT = Path(__file__).resolve().parents[1]


def remote_python(home: Path | None = None) -> str:
    """The server's Python command for `--worker-python`. sshd passes no environment: PYTHONPATH and
    the offline switches are set here, and HOME when given (so that `~/bank` names a folder only
    the server's side finds: a path taken on this side by mistake is not found)."""
    env = f"HOME={shlex.quote(str(home))} " if home is not None else ""
    return (f"env {env}PYTHONPATH={shlex.quote(str(ROOT))} RSEG_OFFLINE=1 HF_HUB_OFFLINE=1 "
            f"TRANSFORMERS_OFFLINE=1 {sys.executable}")


def sshd_binary() -> str | None:
    """The sshd to run: $RSEG_SSHD, else the distribution's."""
    if os.environ.get("RSEG_SSHD"):
        return os.environ["RSEG_SSHD"]
    for path in SSHD_CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    return shutil.which("sshd")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Sshd:
    """One sshd on 127.0.0.1:<free port> with everything it needs under `folder`."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.host = "127.0.0.1"
        self.user = getpass.getuser()
        self.port = _free_port()
        self.host_key = folder / "ssh_host_ed25519_key"
        self.user_key = folder / "id_ed25519"
        self.known_hosts = folder / "known_hosts"
        self.empty_known_hosts = folder / "known_hosts_empty"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"ssh://{self.user}@{self.host}:{self.port}"

    def ssh_options(self, known_hosts: Path | None = None) -> list[str]:
        """Client options: only this test's key and known_hosts, no user config, no agent."""
        return ["-F", "/dev/null", "-i", str(self.user_key), "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none",
                "-o", f"UserKnownHostsFile={known_hosts or self.known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null",
                "-o", "ConnectTimeout=20"]

    def start(self, binary: str) -> "Sshd":
        self.folder.mkdir(parents=True, exist_ok=True)
        for key in (self.host_key, self.user_key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        (self.folder / "authorized_keys").write_text(self.user_key.with_suffix(".pub").read_text())
        host_pub = " ".join(self.host_key.with_suffix(".pub").read_text().split()[:2])
        self.known_hosts.write_text(f"[{self.host}]:{self.port} {host_pub}\n")
        self.empty_known_hosts.write_text("")
        config = self.folder / "sshd_config"
        config.write_text("\n".join([
            f"Port {self.port}", f"ListenAddress {self.host}", f"HostKey {self.host_key}",
            f"AuthorizedKeysFile {self.folder / 'authorized_keys'}", f"PidFile {self.folder / 'sshd.pid'}",
            "StrictModes no", "UsePAM no", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
            "PubkeyAuthentication yes", "PermitRootLogin prohibit-password", "X11Forwarding no",
            "AllowTcpForwarding no", "LogLevel VERBOSE",
        ]) + "\n")
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation folder
        log = open(self.folder / "sshd.log", "ab")
        self.proc = subprocess.Popen([binary, "-D", "-e", "-f", str(config)], stdout=log, stderr=log,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited with code {self.proc.returncode}: {self.log()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=1):
                    return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"sshd did not listen within 20 s: {self.log()}")

    def log(self) -> str:
        try:
            return (self.folder / "sshd.log").read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None


def start_or_skip(folder: Path) -> Sshd:
    """A started sshd; skip where none is installed, except in CI ($CI or $RSEG_REQUIRE_SSHD), where it fails."""
    import pytest

    binary = sshd_binary()
    if binary is None:
        if os.environ.get("CI") or os.environ.get("RSEG_REQUIRE_SSHD"):
            pytest.fail("sshd is missing in CI; .ci/run installs Debian's openssh-server")
        pytest.skip("OpenSSH's sshd is not installed (apt-get install -y openssh-server)")
    return Sshd(folder).start(binary)
