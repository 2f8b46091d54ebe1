"""The worker's job loop with events in unusual orders (issue 31, classes 5 and 7), in this process.

`Worker.run_job` is what the worker process runs for each job message; here it writes its protocol
messages to a real `Channel` over a byte buffer, so each test sees exactly what the client would
read, without a process (fast, and nothing left running if a test fails):

* a cancel that arrives before its job starts cancels that job (the job never runs), and the next
  job runs;
* a cancel that arrives after its job's result (the user pressed Cancel as the result came) does
  not cancel the next job;
* a segment job with the extent stop, through the worker's real handler and a random-weight
  engine: the total shrinks as the stop finds the structure's end and the last progress message
  is done == total (the progress bar completes). The slow worker-process version is
  Testing/segmentation/test_extent.py::test_extent_stop_and_estimate_through_the_worker.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest

from RetrievalSegLib.bank.support_bank import LabelInfo
from RetrievalSegLib.engine.pipeline import RetrievalEngine
from RetrievalSegLib.data.synthetic import LABELS, make_synthetic_study
from RetrievalSegLib.worker import protocol as wp
from RetrievalSegLib.worker import server
from RetrievalSegLib.worker.client import labels_json, volume_spec


class _Worker(server.Worker):
    """The real worker, its job inputs handed over as the reader thread would after their array
    frames arrived (`_received`): the .npy files the client staged in the job's folder."""

    def run_job(self, message: dict) -> None:
        folder = message.pop("folder", None)
        if folder is not None:
            arrays = {p.name: np.load(p, allow_pickle=False) for p in sorted(Path(folder).glob("*.npy"))}
            self._received[message["id"]] = arrays
            message["arrays"] = sorted(arrays)
        super().run_job(message)


def _worker() -> tuple[server.Worker, io.BytesIO]:
    out = io.BytesIO()
    return _Worker(server.Channel(out), parent_pid=None, idle_timeout=600.0), out


def _messages(out: io.BytesIO, job_id: str) -> list[dict]:
    """The job's messages as the client reads them (JSON lines and the array frames between them)."""
    reader = wp.FrameReader(wp.FROM_WORKER)
    reader.feed(out.getvalue())
    return [m for m in reader.messages() if m.get("id") == job_id]


def _job(job_id: str, kind: str, folder, params: dict) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    return {"type": "job", "id": job_id, "kind": kind, "folder": str(folder), "params": params}


@pytest.fixture()
def recorded(monkeypatch):
    """The "load" job replaced by one that records that it ran (no model is loaded)."""
    ran: list[str] = []

    def job_load(ctx, params):  # the handler signature: (JobContext, params) -> result
        ran.append(ctx.id)
        return {"ran": ctx.id}

    monkeypatch.setitem(server.HANDLERS, "load", job_load)
    return ran


def test_a_cancel_before_its_job_starts_cancels_that_job_only(tmp_path, recorded) -> None:
    worker, out = _worker()
    worker.cancel("job-1")  # the reader thread applies a cancel at once, before the job is taken
    worker.run_job(_job("job-1", "load", tmp_path / "1", {}))
    assert [m["type"] for m in _messages(out, "job-1")] == ["started", "cancelled"]
    assert recorded == []  # never ran
    worker.run_job(_job("job-2", "load", tmp_path / "2", {}))
    assert [m["type"] for m in _messages(out, "job-2")] == ["started", "result"]
    assert recorded == ["job-2"]


def test_a_cancel_after_the_result_does_not_cancel_the_next_job(tmp_path, recorded) -> None:
    worker, out = _worker()
    worker.run_job(_job("job-1", "load", tmp_path / "1", {}))
    assert [m["type"] for m in _messages(out, "job-1")] == ["started", "result"]
    worker.cancel("job-1")  # too late: its result is already out
    worker.run_job(_job("job-2", "load", tmp_path / "2", {}))
    assert [m["type"] for m in _messages(out, "job-2")] == ["started", "result"]
    assert recorded == ["job-1", "job-2"]


def test_segment_job_with_the_extent_stop_completes_its_progress(tmp_path) -> None:
    """Presence threshold 1e9: every slice is 'absent', so from start slice 3 with N = 2 the walk
    segments 2..4 (3 and one more each way) and the total falls from 6 to 3."""
    study = make_synthetic_study(2, shape=(6, 32, 32), spacing=(1.2, 1.2, 5.0), seed=11)
    settings = wp.EngineSettings(device="cpu", image_size=256, random_weights=True).to_json()
    worker, out = _worker()
    # The engine these settings load, with DINOv2 at 56 px instead of 224 (what every fast test
    # uses; the job handlers are what this test is about): handed to the worker as if loaded.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        worker._engine = RetrievalEngine.load(random_weights=True, image_size=256, device="cpu", dinov2_input_size=56)
    worker._engine_settings = wp.EngineSettings.from_json(settings)
    bank = str(tmp_path / "bank")
    labels = [LabelInfo(v, name, rgb) for v, (name, rgb) in sorted(LABELS.items())]
    worker.run_job(_job("create", "create_bank", tmp_path / "j1", {"settings": settings, "bank": bank,
                                                                     "labels": labels_json(labels)}))
    folder = tmp_path / "j2"
    folder.mkdir()
    one_slice = study[0].labels.array.copy()
    one_slice[[i for i in range(6) if i != 3]] = 0  # one support: one SAM 2 memory to compute
    worker.run_job(_job("add", "add_volume", folder, {
        "settings": settings, "bank": bank, "volume": volume_spec(folder, "volume", study[0].image),
        "labelmap": wp.save_array(folder, "labels", one_slice), "case_id": study[0].case_id,
        "axis": None, "window": [0.0, 1000.0]}))
    assert [m["type"] for m in _messages(out, "add")][-1] == "result"
    folder = tmp_path / "j3"
    folder.mkdir()
    worker.run_job(_job("seg", "segment", folder, {
        "settings": settings, "bank": bank, "volume": volume_spec(folder, "volume", study[1].image),
        "runs": [[0, 6]], "axis": 2, "k": 1, "window": None, "batch_size": 1,
        "extent_stop": 2, "presence_threshold": 1e9, "start_slice": [3]}))
    messages = _messages(out, "seg")
    assert messages[-1]["type"] == "result", messages[-1]
    progress = [(m["done"], m["total"]) for m in messages if m["type"] == "progress"]
    assert progress[0] == (0, 6)
    assert all(t2 <= t1 and d2 >= d1 for (d1, t1), (d2, t2) in zip(progress, progress[1:])), progress
    assert progress[-1] == (3, 3), progress  # the bar completes although 3 slices were never segmented
    result = messages[-1]["result"]
    assert sorted(s["index"] for s in result["slices"]) == [2, 3, 4]
    assert result["beyond_extent"] == [0, 1, 5]
