"""A stand-in for CTKAppLauncher, the `PythonSlicer` that Slicer starts the worker with.

What it copies, read from commontk/AppLauncher v0.1.33, `Base/ctkAppLauncher.cpp`
(`ctkAppLauncherPrivate::runProcess` and `applicationFinished`), and Slicer 5.10, which sets
`sys.executable` to `PythonSlicer` (`qSlicerCoreApplication.cxx`):

* the launcher does not `exec`: it starts the real interpreter as a *child* (`QProcess::start`)
  and stays alive as its parent until the child ends;
* with no splash screen (PythonSlicer has none) the child's standard streams are the launcher's
  own (`QProcess::ForwardedChannels` and `ForwardedInputChannel`): the child inherits them;
* `NormalExit` -> the launcher exits with the child's code; `CrashExit` (the child died of a
  signal) -> it prints "exit abnormally - Report the problem." and exits with `EXIT_FAILURE` (1);
* it installs no signal handler: killing the launcher leaves the child running.

`make_launcher(folder)` writes an executable `PythonSlicer` that does the same with this test
run's Python (or `python=`, e.g. a fake worker) as the child. POSIX only (a `#!` script).
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

_LAUNCHER = '''
import subprocess
import sys

REAL = {real!r}
# No stdin/stdout/stderr arguments: the child inherits the launcher's streams, as QProcess's
# forwarded channels give them.
child = subprocess.Popen([REAL, *sys.argv[1:]])
code = child.wait()
if code < 0:  # QProcess::CrashExit
    sys.stderr.write("[%s] exit abnormally - Report the problem.\\n" % REAL)
    sys.stderr.flush()
    sys.exit(1)
sys.exit(code)
'''


def make_launcher(folder: str | Path, python: str | Path | None = None, name: str = "PythonSlicer") -> Path:
    """Write the launcher stand-in into `folder`; its child is `python` (default: this interpreter)."""
    path = Path(folder) / name
    real = str(python or sys.executable)
    path.write_text(f"#!{sys.executable}\n" + _LAUNCHER.format(real=real), encoding="utf-8")
    path.chmod(0o755)
    return path


def running(pid: int) -> bool:
    """True while `pid` exists and has not exited (a zombie has: it only waits to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[-1].split()[0] not in (b"Z", b"X")
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    """Wait until process `pid` is gone; True if it is."""
    deadline = time.monotonic() + timeout
    while running(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not running(pid)
