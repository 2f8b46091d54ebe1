"""The Slicer side of the model worker: start it, send jobs, poll without blocking, cancel, restart.

Nothing here runs model code or starts a thread: the caller (Slicer's main thread, from a QTimer)
calls `WorkerJob.poll()`, which reads whatever the worker has written to its pipe so far and
never waits. Scripts and tests may block with `WorkerJob.wait()`.

A job's inputs and outputs are staged in its own folder under the temporary folder (`.npy` files,
no pickle), removed when the job ends; they travel to and from the worker as frames in the
protocol itself, so the worker may run on another host (`target`: over ssh, `worker.remote`). A worker that dies mid-job (killed, out of memory, a crash in
a native library) ends that job as "failed" with a message and the tail of the worker's log; the
next job starts a new worker. Cancel is cooperative first; a worker that does not stop within
`cancel_grace_s` is killed.

Inside Slicer, `python` is CTKAppLauncher (`PythonSlicer`): the process this client starts is the
launcher, and the worker is *its* child (QProcess, standard streams forwarded). So the worker's
own pid comes from its "ready" message; ending it means ending that pid first and then the
launcher (POSIX: the launcher leads a new process group that the worker shares; Windows:
`taskkill /T`); and a crash reads as the launcher's exit code 1, so the cause is taken from what
the worker itself reported.
"""
from __future__ import annotations

import itertools
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .. import __version__
from . import protocol as wp
from .protocol import JobEvent
from .remote import SshTarget, describe_ssh_failure, ssh_options_from_env

log = logging.getLogger("RetrievalSeg")

#: The folder that holds the RetrievalSegLib package (put on the worker's PYTHONPATH).
LIBRARY_PARENT = str(Path(__file__).resolve().parents[1])


class WorkerError(RuntimeError):
    """The worker could not be started or broke the protocol."""


class WorkerJob:
    """One job sent to the worker; `poll()` its events on the main thread."""

    def __init__(
        self,
        client: "WorkerClient",
        job_id: str,
        kind: str,
        folder: Path,
        message: dict[str, Any],
        on_result: Callable[[dict[str, Any], Path], Any] | None,
    ) -> None:
        self.client = client
        self.id = job_id
        self.kind = kind
        self.folder = folder
        self.message = message
        self.wire = b""  # what was sent: the array frames, then the job line (sent again on an idle restart)
        self._on_result = on_result
        self._events: list[JobEvent] = []
        self.started = False
        self.outcome: str | None = None  # "finished", "cancelled" or "failed", once known
        self.result: Any = None
        self.error: BaseException | None = None
        self.cancel_requested_at: float | None = None
        self.t0 = time.monotonic()

    @property
    def running(self) -> bool:
        """True until the job's final event has been read."""
        return self.outcome is None

    def poll(self) -> list[JobEvent]:
        """The events that arrived since the last poll (never blocks)."""
        self.client.pump()
        return self._take()

    def wait(self, timeout: float | None = None) -> list[JobEvent]:
        """Block until the job ends (or `timeout`); return the events not yet polled."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.outcome is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            self.client.pump(block_s=0.1 if left is None else min(0.1, left))
        return self._take()

    def cancel(self) -> None:
        """Ask the worker to stop this job; it is killed if it has not stopped after the grace time."""
        self.client.cancel(self)

    def _take(self) -> list[JobEvent]:
        out, self._events = self._events, []
        return out

    # ---------------------------------------------------------------- called by the client
    def _add(self, event: JobEvent) -> None:
        if self.outcome is not None:
            return
        if event.kind == "finished" and self._on_result is not None:
            try:
                event.result = self._on_result(event.result, self.folder)
            except Exception as e:  # a result we cannot read is a failed job, not a crash
                event = JobEvent("failed", f"could not read the worker's result: {type(e).__name__}: {e}",
                                 elapsed_s=event.elapsed_s, error=e)
        if event.terminal:
            self.outcome = event.kind
            self.result, self.error = event.result, event.error
            shutil.rmtree(self.folder, ignore_errors=True)
        self._events.append(event)


class WorkerClient:
    """Starts and talks to `python -m RetrievalSegLib.worker`; one job at a time."""

    def __init__(
        self,
        python: str | None = None,
        env: Mapping[str, str] | None = None,
        *,
        idle_timeout_s: float = 1800.0,
        cancel_grace_s: float = 10.0,
        log_dir: str | Path | None = None,
        temp_dir: str | Path | None = None,
        target: SshTarget | str | None = None,
        ssh: str = "ssh",
        ssh_options: Sequence[str] | None = None,
        compress: bool | None = None,
    ) -> None:
        self.python = python or sys.executable
        #: None: this computer; else the host the worker runs on, through `ssh` (see worker.remote).
        self.target = SshTarget.parse(target) if isinstance(target, str) else target
        self.ssh = ssh
        self.ssh_options = list(ssh_options) if ssh_options is not None else ssh_options_from_env(env)
        self.compress = (self.target is not None) if compress is None else bool(compress)
        self.remote_pid: int | None = None  # a remote worker's pid (on its host; never signalled from here)
        self.remote_version: str | None = None
        self.env = dict(env if env is not None else os.environ)
        self.idle_timeout_s = idle_timeout_s
        self.cancel_grace_s = cancel_grace_s
        self.log_dir = Path(log_dir or os.environ.get("RSEG_WORKER_LOG_DIR") or tempfile.gettempdir())
        self.temp_dir = str(temp_dir) if temp_dir is not None else None
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path: Path | None = None
        self.worker_pid: int | None = None  # the real worker's pid (from "ready"); the launcher's is process.pid
        self._worker_identity: str | None = None  # Linux: its start time, so that a reused pid is never killed
        self._cwd: str | None = None  # the worker's private working directory
        self.protocol_errors: list[str] = []  # what the worker could not understand from us
        self.job: WorkerJob | None = None
        self._reader = wp.FrameReader(wp.FROM_WORKER)
        self._eof = False
        self._ready = False
        self._exit_reason: str | None = None
        self._ids = itertools.count(1)
        self._starts = 0
        self._launcher_pid: int | None = None

    # ---------------------------------------------------------------- process
    @property
    def where(self) -> str:
        """Where the worker runs, for messages: "this computer" or ssh://user@host[:port]."""
        return "this computer" if self.target is None else str(self.target)

    @property
    def alive(self) -> bool:
        """True while a worker process runs."""
        return self.process is not None and self.process.poll() is None and not self._eof

    def start(self) -> None:
        """Start a worker unless one is running."""
        if self.alive:
            return
        self._reap()
        self._starts += 1
        self.log_dir.mkdir(parents=True, exist_ok=True)
        # A unique name per start, even for two clients in one Slicer (the module and its self-test).
        fd, log_name = tempfile.mkstemp(prefix=f"RetrievalSeg-worker-{os.getpid()}-{self._starts}-", suffix=".log",
                                        dir=self.log_dir)
        os.close(fd)
        self.log_path = Path(log_name)
        # `python -m` puts the working directory first on sys.path: in Slicer's working directory a
        # folder named like a package (sam2/, numpy/) would shadow it. The worker gets an empty one.
        self._cwd = tempfile.mkdtemp(prefix="rseg-worker-cwd-", dir=self.temp_dir)
        env = dict(self.env)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (LIBRARY_PARENT, env.get("PYTHONPATH", "")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        env["RSEG_WORKER_LOG"] = str(self.log_path)
        if self.target is not None:  # the remote worker ends when ssh's connection (its stdin) closes
            command = self.target.command(self.idle_timeout_s, self.ssh, self.ssh_options)
        else:
            command = [self.python, "-m", "RetrievalSegLib.worker", "--parent-pid", str(os.getpid()),
                       "--idle-timeout", str(self.idle_timeout_s)]
        with open(self.log_path, "ab") as log_file:
            try:
                self.process = subprocess.Popen(
                    command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_file, env=env,
                    cwd=self._cwd, close_fds=True,
                    # POSIX: a process group of its own (the launcher and the worker under it), ended
                    # as one, and out of reach of a Ctrl-C meant for Slicer's terminal.
                    start_new_session=os.name == "posix",
                    creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0) if os.name == "nt" else 0,
                )
            except OSError as e:
                raise WorkerError(f"could not start the RetrievalSeg worker ({' '.join(command)}): {e}") from e
        assert self.process.stdout is not None
        if os.name == "posix":
            os.set_blocking(self.process.stdout.fileno(), False)
        self._reader = wp.FrameReader(wp.FROM_WORKER)
        self._eof, self._exit_reason, self.worker_pid, self._ready = False, None, None, False
        self._worker_identity, self.remote_pid = None, None
        log.info("RetrievalSeg worker started (pid %s), log: %s", self.process.pid, self.log_path)

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the worker to exit (cancelling its job), then make sure it has, launcher and all."""
        if self.process is None:
            return
        if self.job is not None and self.job.outcome is None:
            self.job._add(JobEvent("cancelled", "the worker was stopped"))
        if self.process.poll() is None:
            try:
                self._write({"type": "shutdown"})
                assert self.process.stdin is not None
                self.process.stdin.close()
            except (OSError, ValueError):
                pass
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._reap()

    def kill(self) -> None:
        """End the worker at once: the real worker first, then the launcher that started it."""
        process = self.process
        if process is None:
            return
        launcher_running = process.poll() is None
        self._kill_worker_pid(launcher_running)
        if launcher_running:
            if os.name == "posix":
                try:  # the group it leads: the launcher and the worker, and anything they started
                    os.killpg(process.pid, signal.SIGKILL)
                except OSError:
                    pass
            else:
                subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)], capture_output=True,
                               creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0))
            try:
                process.kill()
            except OSError:
                pass
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            pass

    def _kill_worker_pid(self, launcher_running: bool) -> None:
        """Kill the real worker by its pid, unless that pid may belong to another process by now."""
        pid = self.worker_pid
        if pid is None or self.process is None or pid == self.process.pid:
            return  # no launcher in between (or no pid yet): killing the process is enough
        # While the launcher runs, the worker (its child) cannot have been reaped, so the pid is
        # still the worker's. Afterwards only a matching start time (Linux) proves it.
        if not launcher_running and (self._worker_identity is None or _process_identity(pid) != self._worker_identity):
            return
        try:
            os.kill(pid, getattr(signal, "SIGKILL", signal.SIGTERM))  # Windows: TerminateProcess
        except OSError:
            pass

    def _reap(self) -> None:
        if self.process is None:
            return
        for stream in (self.process.stdin, self.process.stdout):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass
        if self.process.poll() is None or self._worker_left_behind():
            self.kill()
        self.process = None
        if self._cwd is not None:
            shutil.rmtree(self._cwd, ignore_errors=True)
            self._cwd = None

    def _worker_left_behind(self) -> bool:
        """True when the launcher is gone but the worker it started still runs (a killed launcher)."""
        pid = self.worker_pid
        return (pid is not None and self.process is not None and pid != self.process.pid
                and self._worker_identity is not None and _process_identity(pid) == self._worker_identity)

    # ---------------------------------------------------------------- jobs
    def new_job_folder(self) -> Path:
        """A fresh folder for one job's arrays (removed when the job ends)."""
        return Path(tempfile.mkdtemp(prefix="rseg-job-", dir=self.temp_dir))

    def submit(
        self,
        kind: str,
        params: dict[str, Any],
        folder: Path | None = None,
        on_result: Callable[[dict[str, Any], Path], Any] | None = None,
    ) -> WorkerJob:
        """Send a job (starting the worker if needed); `on_result(result, folder)` converts its result."""
        if kind not in wp.JOB_KINDS:
            raise ValueError(f"unknown job kind {kind!r}; one of {wp.JOB_KINDS}")
        if self.job is not None and self.job.outcome is None:
            raise RuntimeError("RetrievalSeg is still running; wait for it or cancel it first")
        folder = folder if folder is not None else self.new_job_folder()
        job_id = f"{os.getpid()}-{next(self._ids)}"
        # Every .npy file staged in the job's folder travels as a frame before the job line.
        names = sorted(p.name for p in Path(folder).iterdir() if p.suffix == ".npy")
        message = {"type": "job", "id": job_id, "kind": kind, "arrays": names, "compress": self.compress,
                   "params": params}
        line = wp.encode(message)  # refuse what JSON cannot carry before starting anything
        job = WorkerJob(self, job_id, kind, folder, message, on_result)
        self.job = job
        try:
            frames = []
            for name in names:
                path = Path(folder) / name
                if path.is_symlink() or not path.is_file():
                    raise wp.ProtocolError(f"array file {path} is not a regular file; refusing to send it")
                frames.append(wp.array_frame(job_id, name, path.read_bytes(), self.compress))
            job.wire = b"".join(frames) + line
            self.start()
            self._write_bytes(job.wire)
        except Exception as e:
            job._add(JobEvent("failed", f"could not send the job to the worker: {e}", error=e))
        return job

    def run(self, kind: str, params: dict[str, Any], folder: Path | None = None,
            on_result: Callable[[dict[str, Any], Path], Any] | None = None, timeout: float | None = None) -> Any:
        """Submit, wait, and return the job's result (raise its error; RuntimeError if cancelled).

        A job still running after `timeout` seconds is cancelled (killed after `cancel_grace_s` if
        it does not stop) before TimeoutError is raised, so the client takes the next job.
        """
        job = self.submit(kind, params, folder, on_result)
        events = job.wait(timeout)
        if job.outcome is None:
            job.cancel()
            job.wait(self.cancel_grace_s + 5.0)  # pump() kills it once the grace time has passed
            if job.outcome is None:  # still not ended: end it here
                self.kill()
                self._reap()
                job._add(JobEvent("cancelled", "stopped by force after the time limit",
                                  elapsed_s=time.monotonic() - job.t0))
            raise TimeoutError(f"worker job {kind} did not finish within {timeout} s; it was cancelled")
        if job.outcome == "finished":
            return job.result
        last = events[-1] if events else JobEvent(job.outcome)
        if job.error is not None and not isinstance(job.error, WorkerError):
            raise job.error
        raise RuntimeError(last.message or f"{kind} {job.outcome}")

    def cancel(self, job: WorkerJob) -> None:
        if job.outcome is not None or job.cancel_requested_at is not None:
            return
        job.cancel_requested_at = time.monotonic()
        try:
            self._write({"type": "cancel", "id": job.id})
        except (OSError, ValueError):
            pass  # the worker is gone: pump() reports it

    def send_raw(self, data: bytes) -> None:
        """Write bytes to the worker as they are (tests of the protocol's error handling)."""
        self.start()
        assert self.process is not None and self.process.stdin is not None
        self.process.stdin.write(data)
        self.process.stdin.flush()

    def _write(self, message: dict[str, Any]) -> None:
        self._write_bytes(wp.encode(message))

    def _write_bytes(self, data: bytes) -> None:
        assert self.process is not None and self.process.stdin is not None
        self.process.stdin.write(data)
        self.process.stdin.flush()

    # ---------------------------------------------------------------- reading
    def pump(self, block_s: float = 0.0) -> None:
        """Read and dispatch what the worker wrote; wait up to `block_s` for it (0: never block)."""
        if self.process is None:
            return
        if block_s > 0 and os.name == "posix" and not self._eof:
            import select

            assert self.process.stdout is not None
            select.select([self.process.stdout], [], [], block_s)
        elif block_s > 0:
            time.sleep(block_s)
        self._read_available()
        try:
            messages = self._reader.messages()
        except wp.ProtocolError as e:
            self._broken(f"the worker sent a malformed message ({e}); it was stopped")
            return
        for message in messages:
            self._dispatch(message)
            if self.process is None:  # broken off (e.g. a version mismatch)
                return
        self._check_cancel_grace()
        if self._eof or (self.process is not None and self.process.poll() is not None):
            self._worker_ended()

    def _read_available(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        fd = self.process.stdout.fileno()
        chunks = []
        while not self._eof:
            try:
                if os.name == "nt":
                    import _winapi  # type: ignore[import-not-found]
                    import msvcrt  # type: ignore[import-not-found]

                    avail = _winapi.PeekNamedPipe(msvcrt.get_osfhandle(fd), 0)[0]
                    if not avail:
                        break
                    data = os.read(fd, avail)
                else:
                    data = os.read(fd, 1 << 20)
            except BlockingIOError:
                break
            except (BrokenPipeError, OSError):
                data = b""
            if not data:
                self._eof = True
                break
            self._reader.feed(data)
            if not self._reader.bounded():
                break  # a line (or frame) past the bound: decided without reading (holding) more of it

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "ready":
            self._ready = True
            pid = message.get("pid")
            pid = pid if isinstance(pid, int) and pid > 0 else None
            if self.target is not None:  # a pid on another host: reported, never signalled from here
                self.remote_pid = pid
            else:
                self.worker_pid = pid
                self._worker_identity = _process_identity(self.worker_pid) if self.worker_pid else None
            self.remote_version = str(message.get("version"))
            if message.get("protocol") != wp.PROTOCOL_VERSION or message.get("version") != __version__:
                self._broken(version_mismatch(self.where, message.get("version"), message.get("protocol"),
                                              self.python if self.target is None else self.target.python))
            return
        if kind == "exit":
            self._exit_reason = str(message.get("reason"))
            return
        if kind == "protocol_error":
            text = str(message.get("message"))
            self.protocol_errors.append(text)
            log.error("RetrievalSeg worker could not understand a message: %s", text)
            return
        job = self.job
        if job is None or message.get("id") != job.id:
            log.warning("RetrievalSeg worker: message for an unknown job ignored: %s", kind)
            return
        elapsed = float(message.get("elapsed_s") or 0.0)
        if kind == "array":  # a result's array, written into the job's folder for `on_result`
            _write_array(job.folder, message["name"], message["npy"])
        elif kind == "started":
            job.started = True
        elif kind == "status":
            job._add(JobEvent("status", str(message.get("message", "")), elapsed_s=elapsed,
                              estimate=message.get("estimate")))
        elif kind == "progress":
            job._add(JobEvent(
                "progress", str(message.get("message", "")), int(message.get("done", 0)), int(message.get("total", 0)),
                elapsed, message.get("remaining_s"),
            ))
        elif kind == "diagnostics":
            job._add(JobEvent("diagnostics", elapsed_s=elapsed, result=message.get("slices")))
        elif kind == "result":
            job._add(JobEvent("finished", job.kind, elapsed_s=elapsed, result=message.get("result")))
        elif kind == "cancelled":
            job._add(JobEvent("cancelled", str(message.get("message", "cancelled")), elapsed_s=elapsed))
        elif kind == "error":
            text = str(message.get("message", "unknown error"))
            job._add(JobEvent(
                "failed", text, elapsed_s=elapsed, error=RuntimeError(text), traceback=str(message.get("traceback", "")),
            ))

    def _check_cancel_grace(self) -> None:
        job = self.job
        if job is None or job.outcome is not None or job.cancel_requested_at is None:
            return
        if time.monotonic() - job.cancel_requested_at > self.cancel_grace_s:
            log.warning("RetrievalSeg worker did not stop within %.0f s of cancel; killing it", self.cancel_grace_s)
            self.kill()
            self._reap()
            job._add(JobEvent("cancelled", f"stopped by force: the worker did not stop within {self.cancel_grace_s:.0f} s",
                              elapsed_s=time.monotonic() - job.t0))

    def _worker_ended(self) -> None:
        """The worker's pipe closed or the process exited: end its job, forget the process."""
        code = self.process.poll() if self.process is not None else None
        if code is None and self.process is not None:
            try:
                code = self.process.wait(2)
            except subprocess.TimeoutExpired:
                self.kill()
                code = self.process.poll()
        reason = self._exit_reason
        self._launcher_pid = self.process.pid if self.process is not None else None
        self._reap()
        job = self.job
        if job is None or job.outcome is not None:
            return
        if reason == "idle" and not job.started:
            # It left for idleness just as this job was sent: give the job to a new worker.
            log.info("RetrievalSeg worker had exited for idleness; sending the job to a new one")
            try:
                self.start()
                self._write_bytes(job.wire)
            except Exception as e:
                job._add(JobEvent("failed", f"could not restart the worker: {e}", error=WorkerError(str(e))))
            return
        how = _describe_exit(code, reason, launcher=self.worker_pid is not None and self._launcher_pid != self.worker_pid)
        tail = self.log_tail()
        ssh_failure = describe_ssh_failure(self.target, tail, code) if self.target is not None and not self._ready else None
        if ssh_failure is not None:
            job._add(JobEvent("failed", f"{ssh_failure} Log: {self.log_path}", elapsed_s=time.monotonic() - job.t0,
                              error=WorkerError(ssh_failure), traceback=tail))
            return
        if self.target is not None:
            how = f"{how}; the worker ran on {self.target}: a dropped connection ends it there"
        message = (
            f"The RetrievalSeg worker process stopped unexpectedly ({how}) during {job.kind}. Nothing was written "
            "to the scene; the support bank only ever holds complete entries. The next action starts a new "
            f"worker. Worker log: {self.log_path}"
        )
        job._add(JobEvent("failed", message, elapsed_s=time.monotonic() - job.t0, error=WorkerError(message),
                          traceback=tail))

    def _broken(self, text: str) -> None:
        log.error("RetrievalSeg worker: %s", text)
        self.kill()
        self._reap()
        job = self.job
        if job is not None and job.outcome is None:
            job._add(JobEvent("failed", f"{text}. Worker log: {self.log_path}", error=WorkerError(text),
                              traceback=self.log_tail()))

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the current worker's log (for error details)."""
        if self.log_path is None:
            return ""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 16384))
                text = f.read().decode("utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def version_mismatch(where: str, version: Any, protocol: Any, python: str) -> str:
    """The exact message for a worker of another RetrievalSeg or protocol version."""
    return (f"the worker on {where} runs RetrievalSeg {version} (protocol {protocol}), this client RetrievalSeg "
            f"{__version__} (protocol {wp.PROTOCOL_VERSION}); install the same version there: "
            f"`{python} -m pip install retrievalseg=={__version__}`")


def _write_array(folder: Path, name: str, npy: bytes) -> None:
    """A received array into the job's own folder (a fresh name, then renamed: never through a link)."""
    path = Path(folder) / wp.check_array_name(name)
    fd, tmp = tempfile.mkstemp(prefix=".recv-", suffix=".npy", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(npy)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _describe_exit(code: int | None, reason: str | None = None, launcher: bool = False) -> str:
    """Why the worker ended, from what it said itself before the process's exit code.

    Through CTKAppLauncher the exit code is the launcher's: 1 when the worker crashed or was
    killed (QProcess::CrashExit), whatever the signal was.
    """
    if reason:
        return f"it exited: {reason}" + ("" if code in (0, None) else f", exit code {code}")
    if code is None:
        return "its output closed"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    if launcher and code == 1:
        return ("it ended without saying why: crashed or killed, e.g. out of memory; its launcher "
                "(PythonSlicer) reported exit code 1")
    return f"exit code {code}"


def _process_identity(pid: int | None) -> str | None:
    """Linux: the process's start time (with its pid, unique for the boot); None where unknown."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[-1].split()
        return None if fields[0] in (b"Z", b"X") else fields[19].decode()
    except (OSError, IndexError):
        return None


def volume_spec(folder: Path, name: str, vol: Any) -> dict[str, Any]:
    """A Volume as a job parameter: its voxels as .npy in the job folder, its geometry in JSON."""
    return {
        "array": wp.save_array(folder, name, vol.array),
        "spacing": [float(s) for s in vol.spacing],
        "origin": [float(o) for o in vol.origin],
        "direction": [float(d) for d in vol.direction],
    }


def labels_json(labels: Sequence[Any]) -> list[dict[str, Any]]:
    """Bank labels as plain JSON."""
    return [{"value": int(lab.value), "name": str(lab.name), "color": [float(c) for c in lab.color]} for lab in labels]
