"""Where a cohort's volumes run: local worker processes (`run_local`) or Ray actors (`run_ray`).

Both load the models once per worker and then take volumes one at a time (`cohort.segment_one`).

Local workers are `multiprocessing` processes started with "spawn" (a fresh interpreter: no torch
state or threads inherited through fork). We do not reuse the Slicer worker (`worker.py`): its
protocol moves arrays between Slicer and the models as .npy files, one client at a time; a cohort
worker reads and writes files itself, so a pipe that carries a volume's manifest row and its result
is all it needs. A worker that dies (killed, out of memory, a native crash) fails only the volume it
was on (nothing was written for it: outputs are atomic) and a new worker takes the rest.

Ray: one actor per GPU of the cluster (`num_gpus=1`), else `workers` CPU actors; an actor loads
the models in its constructor and keeps them. Ray restarts a dead actor (max_restarts) and retries
its volume once (max_task_retries; safe, since outputs are atomic); a volume that still fails is
recorded as failed, like any other.

Ctrl-C (SIGINT to the command, or to its whole process group as a terminal sends it): local
workers ignore SIGINT (they start with it ignored), so the parent alone decides: no new volume
starts, each worker gets one SIGTERM, which it turns into a clean stop (a write in progress removes
its temporary file), and is killed if it has not exited after a grace time; a result that arrived
in the meantime is kept, the volumes in flight are recorded as interrupted (nothing was written for
them: outputs are atomic) and `CohortInterrupted` carries every volume's result so that the
command can still write its summary. The next run of the same command resumes.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Callable, Sequence

from .volume_job import CohortSettings, CohortVolume, ReadOnlyBank, failed_result, segment_one, unfinished_result

Event = Callable[[str, dict], None]  # ("started" | "progress" | "result" | "worker", payload)


class CohortFatal(Exception):
    """No worker could start (e.g. the weights are missing): nothing can be segmented."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class CohortInterrupted(Exception):
    """Ctrl-C during a run. `results`: one per volume, in order: finished ones as they ended, the
    ones in flight and the ones not started with status "interrupted"."""

    def __init__(self, results: list[dict]) -> None:
        super().__init__("interrupted")
        self.results = results


INTERRUPTED_IN_FLIGHT = "interrupted while being segmented (Ctrl-C or SIGTERM); nothing was written for it"
INTERRUPTED_NOT_STARTED = "not started: the run was interrupted (Ctrl-C or SIGTERM)"


def interrupted_result(vol: CohortVolume, out_dir: Path, in_flight: bool) -> dict:
    """The result of a volume a Ctrl-C stopped (in flight: its record says so) or never started."""
    message = INTERRUPTED_IN_FLIGHT if in_flight else INTERRUPTED_NOT_STARTED
    return unfinished_result(vol, out_dir, "interrupted", message, record=in_flight)


def _interrupted(volumes: Sequence[CohortVolume], results: dict[str, dict], running: set[str],
                 out_dir: str | Path) -> CohortInterrupted:
    """After a Ctrl-C (local workers or Ray): every volume's result, the finished ones as they ended,
    those in `running` (case ids) interrupted in flight, the others not started."""
    out = Path(out_dir)
    return CohortInterrupted([results.get(v.case_id) or interrupted_result(v, out, v.case_id in running)
                              for v in volumes])


def visible_gpus() -> int:
    """CUDA GPUs this process sees (0 without torch.cuda)."""
    try:
        import torch

        return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - no usable CUDA is "no GPU"
        return 0


def worker_devices(device: str, workers: int | None, gpus: int) -> tuple[int, list[str] | None]:
    """(number of local workers, device of each worker or None for the options' own device).

    --device auto or cuda on a machine with `gpus` GPUs: one worker per GPU by default, worker i
    on cuda:(i mod gpus) (more workers than GPUs share them round-robin). An explicit device
    (cuda:N, cpu, mps) is every worker's; without GPUs, one worker unless --workers says more.
    """
    gpus = int(gpus) if str(device) in ("auto", "cuda") else 0
    n = int(workers) if workers else max(1, gpus)
    return n, ([f"cuda:{i % gpus}" for i in range(n)] if gpus else None)


class _Models:
    """A worker's models and bank view, loaded once (`make_engine` from the model options)."""

    def __init__(self, model_args: dict, settings: CohortSettings) -> None:
        from ..engine.build import make_engine

        self.settings = settings
        self.bank = ReadOnlyBank(settings.bank, settings.cache_dir, expect=(settings.bank_id, settings.bank_revision))
        self.engine = make_engine(argparse.Namespace(**model_args))

    def run(self, vol: CohortVolume, progress: Callable[[int, int], None] | None = None) -> dict:
        return segment_one(vol, self.engine, self.bank, self.settings, progress)


# ----------------------------------------------------------------------------- local processes
def sigterm_as_ctrl_c(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
    """SIGTERM handler (a worker stopped by its parent; the command stopped by a scheduler): unwind
    once, as Ctrl-C would, so that a write in progress removes its temporary file and the command
    writes its summary; a second SIGTERM is ignored during the unwinding."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def _worker_main(conn, model_args: dict, settings_json: dict, threads: int | None) -> None:
    """A local worker: load the models once, then segment the volumes the parent sends."""
    import signal

    from ..engine.build import WeightsUnavailable

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle (it starts us ignoring it)
    signal.signal(signal.SIGTERM, sigterm_as_ctrl_c)
    try:
        if threads:
            import torch

            torch.set_num_threads(threads)
        try:
            models = _Models(model_args, CohortSettings(**settings_json))
        except WeightsUnavailable as e:
            conn.send(("fatal", 3, str(e)))
            return
        except Exception as e:  # noqa: BLE001 - reported to the parent, which stops the run
            conn.send(("fatal", 1, f"{type(e).__name__}: {e}"))
            return
        conn.send(("ready", os.getpid(), models.engine.sam2_identity))
        while True:
            try:
                job = conn.recv()
            except EOFError:
                return
            if job is None:
                return
            vol = CohortVolume(**job)
            result = models.run(vol, lambda d, t: conn.send(("progress", vol.case_id, d, t)))
            conn.send(("result", result))
    except (KeyboardInterrupt, BrokenPipeError):  # stopped by the parent (SIGTERM) or the parent is gone
        return


def _exit_text(exitcode: int | None) -> str:
    import signal

    if exitcode is not None and exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


def _stop_interrupted(slots: list[dict], grace_s: float) -> None:
    """After Ctrl-C: one SIGTERM to each worker (a clean stop, `sigterm_as_ctrl_c`), then SIGKILL for
    any still running after `grace_s` (e.g. inside one long native call)."""
    live = [s["proc"] for s in slots if s["proc"] is not None]
    for proc in live:
        if proc.is_alive():
            proc.terminate()
    deadline = time.monotonic() + grace_s
    for proc in live:
        proc.join(timeout=max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=10)


def _start_ignoring_sigint(proc) -> None:
    """Start `proc` with SIGINT ignored: a spawned interpreter keeps an ignored SIGINT ignored, so a
    Ctrl-C that reaches the whole process group cannot interrupt a worker even while it starts."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        proc.start()  # signal dispositions can only be changed from the main thread
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        proc.start()
    finally:
        signal.signal(signal.SIGINT, old)


def run_local(volumes: Sequence[CohortVolume], model_args: dict, settings: CohortSettings, workers: int,
              on_event: Event, devices: Sequence[str] | None = None, threads: int | None = None,
              interrupt_grace_s: float = 30.0) -> list[dict]:
    """Segment `volumes` on `workers` local processes; returns one result per volume, in order.
    Raises `CohortInterrupted` (with every volume's result) on Ctrl-C.

    devices: one device per worker slot (e.g. cuda:0, cuda:1); default: the model options' device.
    threads: torch threads per CPU worker; default: the cores split evenly between several workers
    (so that N workers do not oversubscribe the CPU), torch's own default for a single worker.
    """
    import multiprocessing as mp
    from multiprocessing.connection import wait

    ctx = mp.get_context("spawn")
    pending = list(volumes)
    abandoned: list[CohortVolume] = []
    results: dict[str, dict] = {}
    workers = max(1, min(int(workers), len(pending))) if pending else 0
    cpu_threads = threads or (max(1, (os.cpu_count() or 1) // workers) if workers > 1 else None)
    slots: list[dict] = []
    restarts_left = len(pending) + workers  # every death fails one volume, so this bounds the loop

    def start(slot_index: int) -> dict:
        args = dict(model_args)
        if devices:
            args["device"] = devices[slot_index % len(devices)]
        threads = None if str(args.get("device", "")).startswith("cuda") else cpu_threads
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker_main, args=(child, args, settings.to_json(), threads),
                           name=f"rseg-cohort-{slot_index}", daemon=True)
        _start_ignoring_sigint(proc)
        child.close()
        slot = {"index": slot_index, "proc": proc, "conn": parent, "job": None, "ready": False}
        on_event("worker", {"slot": slot_index, "pid": proc.pid, "state": "starting"})
        return slot

    def dispatch(slot: dict) -> None:
        if pending:
            vol = pending.pop(0)
            slot["job"] = vol
            slot["conn"].send(vol.to_json())
            on_event("started", {"case_id": vol.case_id, "slot": slot["index"], "pid": slot["proc"].pid})
        else:
            slot["conn"].send(None)
            slot["job"] = None

    fatal: tuple[int, str] | None = None
    interrupted = False
    try:
        slots = [start(i) for i in range(workers)]
        while any(s["proc"] is not None for s in slots):
            live = [s for s in slots if s["proc"] is not None]
            ready = wait([s["conn"] for s in live] + [s["proc"].sentinel for s in live])
            for slot in live:
                conn, proc = slot["conn"], slot["proc"]
                msg = None
                if conn in ready:
                    try:
                        msg = conn.recv()
                    except (EOFError, OSError):
                        msg = None
                if msg is not None:
                    kind = msg[0]
                    if kind == "ready":
                        slot["ready"] = True
                        on_event("worker", {"slot": slot["index"], "pid": msg[1], "state": "ready"})
                        dispatch(slot)
                    elif kind == "progress":
                        on_event("progress", {"case_id": msg[1], "done": msg[2], "total": msg[3]})
                    elif kind == "result":
                        res = msg[1]
                        results[res["case_id"]] = res
                        on_event("result", res)
                        dispatch(slot)
                    elif kind == "fatal":
                        fatal = (msg[1], msg[2])
                        abandoned.extend(pending)
                        pending.clear()
                    continue
                if proc.sentinel in ready or (conn in ready and msg is None):
                    proc.join(timeout=5)
                    if proc.is_alive():
                        continue
                    vol = slot["job"]
                    if vol is not None:
                        res = failed_result(vol, Path(settings.out_dir),
                                            f"the worker process died ({_exit_text(proc.exitcode)}) while "
                                            "segmenting this volume; nothing was written for it")
                        results[vol.case_id] = res
                        on_event("result", res)
                    on_event("worker", {"slot": slot["index"], "pid": proc.pid, "state": _exit_text(proc.exitcode)})
                    conn.close()
                    slot["proc"], slot["job"] = None, None
                    if pending and fatal is None and (slot["ready"] or vol is not None) and restarts_left > 0:
                        restarts_left -= 1
                        slots[slot["index"]] = start(slot["index"])
            if fatal is not None and all(s["job"] is None for s in slots if s["proc"] is not None):
                for s in slots:
                    if s["proc"] is not None:
                        try:
                            s["conn"].send(None)
                        except OSError:
                            pass
                break
        if fatal is not None and not results:
            raise CohortFatal(fatal[1], fatal[0])
        if pending and not any(s["ready"] for s in slots):
            raise CohortFatal("no cohort worker could start (see the messages above)")
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if interrupted:
            _stop_interrupted(slots, interrupt_grace_s)
        for s in slots:
            proc = s["proc"]
            if proc is not None:
                proc.join(timeout=10)
                if proc.is_alive():
                    proc.terminate()
                    proc.join(timeout=10)
    if interrupted:
        for s in slots:  # a result sent just before the stop is a finished volume: keep it
            if s["proc"] is None:
                continue
            try:
                while s["conn"].poll(0):
                    msg = s["conn"].recv()
                    if msg and msg[0] == "result":
                        results[msg[1]["case_id"]] = msg[1]
                        on_event("result", msg[1])
            except (EOFError, OSError):
                pass
        running = {s["job"].case_id for s in slots if s["proc"] is not None and s["job"] is not None}
        raise _interrupted(volumes, results, running, settings.out_dir)
    for vol in [*abandoned, *pending]:  # left over after a fatal error
        results.setdefault(vol.case_id, failed_result(vol, Path(settings.out_dir),
                                                      f"not started: the run stopped ({fatal[1] if fatal else 'no worker'})"))
    return [results[v.case_id] for v in volumes if v.case_id in results]


# ----------------------------------------------------------------------------- Ray
class CohortActor:
    """A Ray actor: the models loaded once in the constructor, then one volume per call."""

    def __init__(self, model_args: dict, settings_json: dict) -> None:
        self.models = _Models(model_args, CohortSettings(**settings_json))

    def segment(self, job: dict) -> dict:
        return self.models.run(CohortVolume(**job))


#: Ray replaces a node address of 127.0.0.1 by the machine's network address and then listens on
#: every interface, unless this switch (read when Ray is imported) is off: then the GCS, raylet and
#: workers listen on 127.0.0.1 only. Its name is historical; it is what keeps a private Ray local.
RAY_LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def connect_ray(address: str) -> None:
    """Join the Ray cluster at `address` ('auto': the running cluster; 'local': start a private one
    on this machine, listening on 127.0.0.1 only, without a dashboard). A Ray already initialised
    here is used."""
    if address == "local":
        os.environ.update(RAY_LOOPBACK_ENV)  # before `import ray`: Ray reads it at import
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if ray.is_initialized():
        return
    if address == "local":
        ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
        ip = ray.util.get_node_ip_address()
        if ip != "127.0.0.1":  # Ray was imported before the switch was set: it would listen on the network
            ray.shutdown()
            raise CohortFatal(f"--ray local: Ray started on {ip}, where it listens on the network, not on 127.0.0.1 "
                              "only: Ray was imported before rseg could set its loopback switch; set "
                              f"{' '.join(f'{k}={v}' for k, v in RAY_LOOPBACK_ENV.items())} before Ray is imported", 2)
    else:
        ray.init(address=address, log_to_driver=False)


def run_ray(volumes: Sequence[CohortVolume], model_args: dict, settings: CohortSettings, address: str,
            cpu_workers: int, on_event: Event) -> list[dict]:
    """Segment `volumes` on Ray actors (one per GPU of the cluster, else `cpu_workers`)."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise CohortFatal("--ray needs Ray: pip install 'retrievalseg[ray]' (or pip install ray)", 2)
    connect_ray(address)  # imports Ray (for 'local' after setting its loopback switch)
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    n = gpus if gpus >= 1 else max(1, int(cpu_workers))
    n = max(1, min(n, len(volumes)))
    opts = {"num_gpus": 1} if gpus >= 1 else {"num_cpus": 1}
    args = dict(model_args)
    if gpus >= 1 and args.get("device", "auto") == "auto":
        args["device"] = "cuda"  # Ray sets CUDA_VISIBLE_DEVICES to the actor's GPU
    remote = ray.remote(max_restarts=2, max_task_retries=1, **opts)(CohortActor)
    actors = [remote.remote(args, settings.to_json()) for _ in range(n)]
    on_event("worker", {"state": f"{n} Ray actor(s)", "gpus": gpus})
    pending = list(volumes)
    in_flight: dict = {}
    results: dict[str, dict] = {}

    def submit(actor) -> None:
        if pending:
            vol = pending.pop(0)
            in_flight[actor.segment.remote(vol.to_json())] = (actor, vol)
            on_event("started", {"case_id": vol.case_id})

    for a in actors:
        submit(a)
    interrupted = False
    try:
        while in_flight:
            done, _ = ray.wait(list(in_flight), num_returns=1)
            ref = done[0]
            actor, vol = in_flight.pop(ref)
            try:
                res = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - RayActorError / RayTaskError: this volume failed
                text = str(e).strip().splitlines()
                res = failed_result(vol, Path(settings.out_dir),
                                    f"Ray worker failed on this volume ({type(e).__name__}: {text[-1] if text else e})")
            results[vol.case_id] = res
            on_event("result", res)
            submit(actor)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        for a in actors:
            try:
                ray.kill(a)
            except Exception:  # noqa: BLE001 - already gone
                pass
    if interrupted:
        raise _interrupted(volumes, results, {vol.case_id for _, vol in in_flight.values()}, settings.out_dir)
    return [results[v.case_id] for v in volumes if v.case_id in results]


def wait_for_record(path: Path, predicate: Callable[[dict], bool], timeout: float) -> dict:
    """Poll a JSON record file until `predicate(record)` holds (used by tests and tools)."""
    import json

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            doc = json.loads(Path(path).read_text(encoding="utf-8"))
            if predicate(doc):
                return doc
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    raise TimeoutError(f"{path} did not reach the expected state within {timeout} s")
