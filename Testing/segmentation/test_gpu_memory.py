"""GPU memory on a machine without a GPU: out-of-memory recovery and batch sizing.

The out-of-memory error is raised by forward pre-hooks on the real SAM 2 modules (the image
encoder and the memory attention) when a call holds more slices than a set limit: the error type
CUDA raises (`torch.cuda.OutOfMemoryError`), at the place a GPU would raise it. Batch sizing from
free memory replaces only the `torch.cuda` memory calls, each by a function with the real one's
signature; `torch.device` parsing stays real.
"""
from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from RetrievalSegLib.cli.main import main
from RetrievalSegLib.data.volume import write_volume
from RetrievalSegLib.engine.pipeline import RetrievalEngine
from _small_world import bank_of_first_case, small_engine, small_study
from RetrievalSegLib.segmentation import queries
from RetrievalSegLib.segmentation.queries import (
    CUDA_MAX_BATCH,
    MEMORY_SHARE,
    BatchSizer,
    OutOfDeviceMemory,
    auto_batch_size,
    batch_from_free_memory,
)
from RetrievalSegLib.segmentation.results import TimeEstimate
from RetrievalSegLib.segmentation.segment import segment_volume

RANGE = (1, 5)  # four slices: one batch of 4, halved to 2 + 2
FAST = ["--random-weights", "--image-size", "256", "--dinov2-input-size", "56", "--device", "cpu"]


@pytest.fixture(scope="module")
def engine() -> RetrievalEngine:
    return small_engine()


@pytest.fixture(scope="module")
def study():
    return small_study()


@pytest.fixture(scope="module")
def bank(tmp_path_factory, engine, study):
    return bank_of_first_case(tmp_path_factory.mktemp("bank") / "bank", engine, study)


@pytest.fixture(scope="module")
def reference(bank, engine, study):
    """The uninterrupted run: slices 1..4, one batch of 4, k = 2."""
    return segment_volume(study[1].image, bank, engine, k=2, batch_size=4, slice_range=RANGE)


class OutOfMemoryAbove:
    """Forward pre-hooks that raise CUDA's out-of-memory error when a call holds more than `limit`
    slices: the image encoder's input is [N, 3, S, S]; the memory attention's query tokens are
    [HW, N x labels, C]. Counts every call and every error."""

    def __init__(self, sam, limit: int, n_labels: int, where=("encoder", "attention")) -> None:
        self.limit, self.n_labels = int(limit), int(n_labels)
        self.calls: list[tuple[str, int]] = []
        self.raised: list[tuple[str, int]] = []
        model = sam.model
        self.handles = []
        if "encoder" in where:
            self.handles.append(model.image_encoder.register_forward_pre_hook(self._encoder))
        if "attention" in where:
            self.handles.append(model.memory_attention.register_forward_pre_hook(self._attention, with_kwargs=True))

    def _check(self, what: str, n: int) -> None:
        self.calls.append((what, n))
        if n > self.limit:
            self.raised.append((what, n))
            raise torch.cuda.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate 2.00 GiB (test hook: {n} slices > {self.limit})")

    def _encoder(self, module, args):
        self._check("encoder", int(args[0].shape[0]))

    def _attention(self, module, args, kwargs):
        curr = kwargs.get("curr", args[0] if args else None)
        curr = curr[0] if isinstance(curr, (list, tuple)) else curr
        self._check("attention", int(curr.shape[1]) // self.n_labels)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@pytest.fixture
def oom(engine):
    made = []

    def install(limit, where=("encoder", "attention"), n_labels=3):
        hook = OutOfMemoryAbove(engine.sam, limit, n_labels, where)
        made.append(hook)
        return hook

    yield install
    for h in made:
        h.remove()


# ----------------------------------------------------------------------------- out-of-memory recovery
def test_out_of_memory_in_memory_attention_halves_the_batch_and_gives_the_same_label_map(
        bank, engine, study, reference, oom):
    hook = oom(2, where=("attention",))
    lines: list[str] = []
    got = segment_volume(study[1].image, bank, engine, k=2, batch_size=4, slice_range=RANGE, log=lines.append)
    assert hook.raised == [("attention", 4)]  # once: the halved size is kept for the rest of the run
    assert {n for w, n in hook.calls if w == "attention"} == {4, 2}
    np.testing.assert_array_equal(got.labelmap.array, reference.labelmap.array)
    assert reference.labelmap.array.any()
    assert sorted(got.slices) == sorted(reference.slices) == [1, 2, 3, 4]
    np.testing.assert_allclose(got.confidence, reference.confidence, atol=1e-4)
    assert got.batch_size == 2
    sizing = got.batch_sizing
    assert (sizing["start"], sizing["end"], sizing["out_of_memory_halvings"]) == (4, 2, 1)
    assert any("out of memory" in line and "retrying with 2" in line for line in lines)
    assert sizing["notes"] == [line for line in lines if "out of memory" in line]


def test_out_of_memory_in_the_image_encoder_splits_its_group_and_gives_the_same_label_map(
        bank, engine, study, reference, oom):
    hook = oom(2, where=("encoder",))
    got = segment_volume(study[1].image, bank, engine, k=2, batch_size=4, slice_range=RANGE)
    # the group of 4 fails once; then the slices are encoded two by two
    assert hook.raised == [("encoder", 4)]
    assert [n for w, n in hook.calls if w == "encoder"] == [4, 2, 2]
    np.testing.assert_array_equal(got.labelmap.array, reference.labelmap.array)
    assert got.batch_sizing["encoder_size"] == 2 and got.batch_sizing["out_of_memory_halvings"] == 1


def test_out_of_memory_with_one_slice_says_what_to_try(bank, engine, study, oom):
    oom(0, where=("attention",))
    with pytest.raises(OutOfDeviceMemory) as err:
        segment_volume(study[1].image, bank, engine, k=2, batch_size=4, slice_range=RANGE)
    text = str(err.value)
    for advice in ("--image-size 512", "--k", "--device cpu", "memory attention", "k = 2", "3 label(s)"):
        assert advice in text, (advice, text)
    assert err.value.__cause__ is None and err.value.__suppress_context__  # no CUDA traceback chained


def test_an_error_that_is_not_out_of_memory_is_not_retried(bank, engine, study):
    calls = []

    def boom(module, args):
        calls.append(args[0].shape[0])
        raise RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR")

    h = engine.sam.model.image_encoder.register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="CUDNN_STATUS_INTERNAL_ERROR"):
            segment_volume(study[1].image, bank, engine, k=2, batch_size=4, slice_range=RANGE)
    finally:
        h.remove()
    assert calls == [4]


def test_rseg_segment_out_of_memory_at_one_slice_exits_1_with_advice_not_a_traceback(
        tmp_path, bank, study, capsys, monkeypatch):
    from RetrievalSegLib.cli import main as cli_main

    real = cli_main.make_engine
    hooks = []

    def make_engine_that_runs_out(args):
        eng = real(args)
        hooks.append(OutOfMemoryAbove(eng.sam, 0, 3, ("encoder",)))
        return eng

    monkeypatch.setattr(cli_main, "make_engine", make_engine_that_runs_out)
    image = tmp_path / "image.nii.gz"
    write_volume(study[1].image, image)
    rc = main(["segment", str(image), "--bank", str(bank.path), "--out", str(tmp_path / "seg.nii.gz"),
               "--k", "2", "--slices", "1:5", "--extent-stop", "0", "--no-progress", *FAST])
    err = capsys.readouterr().err
    assert rc == 1
    assert "rseg: error: SAM 2 ran out of memory on cpu in the image encoder with one slice per call" in err
    assert "--image-size 512" in err and "--device cpu" in err
    assert "Traceback" not in err
    assert "out of memory on cpu in the image encoder at 4 slices: retrying with 2" in err  # the log said it
    assert not (tmp_path / "seg.nii.gz").exists()
    for h in hooks:
        h.remove()


# ----------------------------------------------------------------------------- batch size from free memory
def _signature_true(real, fake):
    """`fake` after checking it takes exactly the parameters `real` takes."""
    assert list(inspect.signature(fake).parameters) == list(inspect.signature(real).parameters)
    return fake


class FakeCudaMemory:
    """torch.cuda's memory calls for one GPU of `total` bytes, the rest of torch untouched."""

    def __init__(self, monkeypatch, free: int, total: int = 80 * 2**30) -> None:
        self.free, self.total, self.allocated, self.peak, self.reserved = free, total, 0, 0, 0
        self.devices: list = []
        fakes = {
            "mem_get_info": self.mem_get_info, "memory_allocated": self.memory_allocated,
            "max_memory_allocated": self.max_memory_allocated, "memory_reserved": self.memory_reserved,
            "reset_peak_memory_stats": self.reset_peak_memory_stats,
        }
        for name, fake in fakes.items():
            monkeypatch.setattr(torch.cuda, name, _signature_true(getattr(torch.cuda, name), fake))

    def _seen(self, device) -> None:
        self.devices.append(torch.device(device))

    def mem_get_info(self, device=None) -> tuple[int, int]:
        self._seen(device)
        return self.free, self.total

    def memory_allocated(self, device=None) -> int:
        self._seen(device)
        return self.allocated

    def max_memory_allocated(self, device=None) -> int:
        self._seen(device)
        return self.peak

    def memory_reserved(self, device=None) -> int:
        self._seen(device)
        return self.reserved

    def reset_peak_memory_stats(self, device=None) -> None:
        self._seen(device)
        self.peak = self.allocated


def test_batch_from_free_memory_leaves_headroom_and_stays_within_1_and_the_cap():
    gib = 2**30
    assert batch_from_free_memory(10 * gib, gib) == int(10 * MEMORY_SHARE)
    assert batch_from_free_memory(gib // 2, gib) == 1  # one slice is always tried (then halving ends it)
    assert batch_from_free_memory(10_000 * gib, gib) == CUDA_MAX_BATCH


def test_auto_batch_size_on_cuda_reads_the_free_memory_of_the_chosen_gpu(monkeypatch):
    mem = FakeCudaMemory(monkeypatch, free=6 * 2**30)
    mem.reserved, mem.allocated = 2 * 2**30, 2**30  # 1 GiB cached by torch but unused: usable too
    per = queries.estimated_slice_bytes(1024, 8, 3)
    got = auto_batch_size("cuda:1", 1024, 8, 3)
    assert got == batch_from_free_memory(7 * 2**30, per) and 1 <= got < CUDA_MAX_BATCH
    assert set(mem.devices) == {torch.device("cuda", 1)}
    mem.free, mem.reserved, mem.allocated = 200 * 2**30, 0, 0
    assert auto_batch_size("cuda:1", 512, 4, 1) == CUDA_MAX_BATCH


def test_the_first_batch_measures_its_footprint_and_sizes_the_rest_from_it(monkeypatch):
    mem = FakeCudaMemory(monkeypatch, free=4 * 2**30)
    mem.allocated = 3 * 2**30  # the model and the supports' memories
    lines: list[str] = []
    sizer = BatchSizer(32, "cuda:1", auto=True, log=lines.append)

    def query_of_8_slices():
        mem.peak = mem.allocated + 8 * 300 * 2**20  # 300 MiB per slice at its peak
        return "result"

    assert sizer.measure(8, query_of_8_slices) == "result"
    assert sizer.slice_bytes == 300 * 2**20 and sizer.peak_bytes == mem.peak
    assert sizer.size == batch_from_free_memory(4 * 2**30, 300 * 2**20) == 8
    assert lines == ["batch size 32 -> 8: 300 MiB per slice measured, 4.0 GiB free on cuda:1"]
    assert set(mem.devices) == {torch.device("cuda", 1)}
    mem.peak = 10**15
    assert sizer.measure(8, lambda: "again") == "again" and sizer.size == 8  # measured once
    given = BatchSizer(32, "cuda:1", auto=False)
    given.measure(8, query_of_8_slices)
    assert given.size == 32 and given.slice_bytes == 300 * 2**20  # a --batch-size is honoured


def test_time_estimate_shows_the_batch_and_the_peak_gpu_memory():
    e = TimeEstimate(8, 1.6, 8, 88, False, "cuda:1", 1024, "bf16", 16, 3 * 2**30)
    assert "batch 16, peak GPU memory 3.0 GiB" in e.describe()
    assert e.to_json()["peak_memory_bytes"] == 3 * 2**30
    cpu = TimeEstimate(4, 4.0, 4, 4, False, "cpu", 256, "fp32", 1)
    assert "peak GPU memory" not in cpu.describe() and cpu.to_json()["peak_memory_bytes"] is None


# ----------------------------------------------------------------------------- propagation's walk (issue 27)
@pytest.fixture(scope="module")
def propagation_reference(bank, engine, study):
    """The uninterrupted propagation run: start slices 1 and 4, so each walk step holds two slices."""
    return segment_volume(study[1].image, bank, engine, **PROPAGATION_RUN)


PROPAGATION_RUN = dict(k=2, batch_size=4, slice_range=RANGE, propagate=2, start_slice=[1, 4])


@pytest.mark.parametrize("where", ["attention", "encoder"])
def test_out_of_memory_in_a_propagation_walk_halves_and_gives_the_same_label_map(
        bank, engine, study, propagation_reference, oom, where):
    """`--propagate`: an out-of-memory error in the memory attention (or the image encoder) on a
    walk step's two slices halves that call and retries, as the other paths do, and the label map
    is the uninterrupted run's."""
    ref = propagation_reference
    hook = oom(1, where=(where,))
    lines: list[str] = []
    got = segment_volume(study[1].image, bank, engine, log=lines.append, **PROPAGATION_RUN)
    # step 0 (slices 1 and 4) fails once; then one slice per call for the rest of the run
    assert hook.raised == [(where, 2)]
    assert sorted({n for w, n in hook.calls if w == where}) == [1, 2]
    np.testing.assert_array_equal(got.labelmap.array, ref.labelmap.array)
    assert ref.labelmap.array.any() and sorted(got.slices) == sorted(ref.slices) == [1, 2, 3, 4]
    assert {i: got.slices[i].neighbours for i in got.slices} == {i: ref.slices[i].neighbours for i in ref.slices}
    sizing = got.batch_sizing
    assert sizing["out_of_memory_halvings"] == 1
    assert (sizing["encoder_size"] if where == "encoder" else sizing["end"]) == 1
    assert sum("out of memory" in line for line in lines) == 1


def test_out_of_memory_with_one_slice_in_a_propagation_walk_says_what_to_try(bank, engine, study, oom):
    oom(0, where=("attention",))
    with pytest.raises(OutOfDeviceMemory, match="memory attention with one slice per call"):
        segment_volume(study[1].image, bank, engine, k=2, batch_size=4, slice_range=RANGE, propagate=2,
                       start_slice=2)
