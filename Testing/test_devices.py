"""Device choice on a machine without a GPU: `--device cuda:N` reaches SAM 2, DINOv2, the worker
and the cohort's workers; one cohort worker per GPU; Apple's MPS never takes a CUDA-only path.

Only what a GPU machine would answer differently is replaced, each by a function with the real
one's signature (`torch.cuda.is_available`, `device_count`, the memory calls); the loaders are
wrapped, not replaced: the wrapper records the device asked for and loads on the CPU.
`torch.device` parsing is real.
"""
from __future__ import annotations

import argparse
import inspect

import numpy as np
import pytest
import torch

from RetrievalSegLib.engine import device as devmem
from RetrievalSegLib.models import loaders


def _signature_true(real, fake):
    assert list(inspect.signature(fake).parameters) == list(inspect.signature(real).parameters), real
    return fake


def _gpus(monkeypatch, n: int) -> None:
    """A machine whose torch sees `n` CUDA GPUs (only the two questions `resolve_device` asks)."""
    monkeypatch.setattr(torch.cuda, "is_available", _signature_true(torch.cuda.is_available, lambda: n > 0))
    monkeypatch.setattr(torch.cuda, "device_count", _signature_true(torch.cuda.device_count, lambda: n))


def _no_cuda_call(monkeypatch) -> list[str]:
    """Every torch.cuda call the guards must avoid fails the test if made."""
    made: list[str] = []
    for name in ("mem_get_info", "memory_allocated", "max_memory_allocated", "memory_reserved",
                 "reset_peak_memory_stats", "empty_cache", "is_bf16_supported", "synchronize"):
        real = getattr(torch.cuda, name)
        params = list(inspect.signature(real).parameters)

        def fake(*args, _name=name, **kwargs):
            made.append(_name)
            raise AssertionError(f"torch.cuda.{_name} called for a non-CUDA device")

        fake.__signature__ = inspect.Signature([inspect.Parameter(p, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                                  default=None) for p in params])
        monkeypatch.setattr(torch.cuda, name, fake)
    return made


# ----------------------------------------------------------------------------- choosing a GPU
def test_cuda_n_names_that_gpu_and_a_missing_one_is_a_clear_error(monkeypatch):
    _gpus(monkeypatch, 2)
    assert loaders.resolve_device("cuda:1") == torch.device("cuda", 1)
    assert loaders.resolve_device("cuda") == torch.device("cuda")
    with pytest.raises(RuntimeError, match=r"device 'cuda:2' requested but this machine has 2 CUDA GPU\(s\) "
                                           r"\(cuda:0..cuda:1"):
        loaders.resolve_device("cuda:2")
    with pytest.raises(ValueError, match="cuda\\[:N\\]"):
        loaders.resolve_device("cuda:x")
    _gpus(monkeypatch, 0)
    with pytest.raises(RuntimeError, match="sees no CUDA GPU"):
        loaders.resolve_device("cuda:1")


class _LoadOnCpu:
    """Wraps load_sam2 / load_dinov2: records the device asked for, loads on the CPU."""

    def __init__(self, monkeypatch, module) -> None:
        self.asked: dict[str, str] = {}
        real_sam, real_dino = loaders.load_sam2, loaders.load_dinov2

        def load_sam2(size="sam2.1-tiny", checkpoint=None, *, device="auto", image_size=None, random_weights=False,
                      seed=0):
            self.asked["sam2"] = str(device)
            return real_sam(size, checkpoint, device="cpu", image_size=image_size,
                            random_weights=random_weights, seed=seed)

        def load_dinov2(size="small", path=None, *, device="auto", random_weights=False, seed=0):
            self.asked["dinov2"] = str(device)
            return real_dino(size, path, device="cpu", random_weights=random_weights, seed=seed)

        for name, fake in (("load_sam2", load_sam2), ("load_dinov2", load_dinov2)):
            real = getattr(loaders, name)
            monkeypatch.setattr(module, name, _signature_true(real, fake))


def test_rseg_device_cuda_1_reaches_sam2_and_dinov2(monkeypatch):
    from RetrievalSegLib.cli.common import model_options
    from RetrievalSegLib.engine import build

    rec = _LoadOnCpu(monkeypatch, loaders)  # build imports the loaders when it runs
    monkeypatch.setattr(build, "_loaded", {})
    args = model_options().parse_args(["--device", "cuda:1", "--random-weights", "--image-size", "256",
                                       "--dinov2-input-size", "56"])
    build.make_engine(args)
    assert rec.asked == {"sam2": "cuda:1", "dinov2": "cuda:1"}


def test_the_worker_engine_settings_take_the_device_to_both_models(monkeypatch):
    from RetrievalSegLib.engine import pipeline
    from RetrievalSegLib.worker.protocol import EngineSettings

    rec = _LoadOnCpu(monkeypatch, pipeline)
    settings = EngineSettings.from_json({**EngineSettings().to_json(), "device": "cuda:1", "random_weights": True,
                                         "image_size": 256})
    settings.load()
    assert rec.asked == {"sam2": "cuda:1", "dinov2": "cuda:1"}


@pytest.mark.parametrize("device,workers,gpus,expected", [
    ("auto", None, 2, (2, ["cuda:0", "cuda:1"])),  # one worker per GPU by default
    ("cuda", None, 4, (4, ["cuda:0", "cuda:1", "cuda:2", "cuda:3"])),
    ("auto", 3, 2, (3, ["cuda:0", "cuda:1", "cuda:0"])),  # more workers than GPUs: round-robin
    ("cuda:1", 3, 2, (3, None)),  # an explicit GPU is every worker's (the model options' device)
    ("cpu", None, 2, (1, None)),
    ("auto", None, 0, (1, None)),
    ("auto", 2, 0, (2, None)),
])
def test_cohort_workers_go_one_per_gpu_unless_a_device_is_given(device, workers, gpus, expected):
    from RetrievalSegLib.cohort.run import worker_devices

    assert worker_devices(device, workers, gpus) == expected


# ----------------------------------------------------------------------------- Apple silicon (MPS)
def test_mps_takes_no_cuda_memory_call_and_no_cuda_autocast(monkeypatch):
    from RetrievalSegLib.engine.sam2_memory import resolve_precision
    from RetrievalSegLib.segmentation.queries import CPU_BATCH_SIZE, BatchSizer, auto_batch_size

    made = _no_cuda_call(monkeypatch)
    emptied = []
    monkeypatch.setattr(torch.mps, "empty_cache", _signature_true(torch.mps.empty_cache, lambda: emptied.append(1)))
    assert auto_batch_size("mps", 1024, 8, 3) == CPU_BATCH_SIZE
    assert devmem.free_memory("mps") is None and devmem.reset_peak("mps") is None and devmem.peak_memory("mps") is None
    assert resolve_precision("auto", "mps") == "fp32"
    with pytest.raises(ValueError, match="bf16 autocast is supported here on cuda and cpu, not mps"):
        resolve_precision("bf16", "mps")
    sizer = BatchSizer(4, "mps", auto=True)
    assert sizer.measure(4, lambda: "ok") == "ok" and sizer.size == 4 and sizer.slice_bytes is None
    devmem.release_memory("mps")
    assert emptied == [1] and made == []


def test_out_of_memory_is_known_on_cuda_and_mps_and_nothing_else():
    assert devmem.is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert devmem.is_out_of_memory(RuntimeError(
        "MPS backend out of memory (MPS allocated: 17.2 GB, other allocations: 1.1 GB, max allowed: 18.1 GB)"))
    assert not devmem.is_out_of_memory(RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR"))
    assert not devmem.is_out_of_memory(MemoryError())  # host memory: not the GPU's, not retried


def test_release_memory_empties_the_cache_of_that_device_type_only(monkeypatch):
    cuda, mps = [], []
    monkeypatch.setattr(torch.cuda, "empty_cache", _signature_true(torch.cuda.empty_cache, lambda: cuda.append(1)))
    monkeypatch.setattr(torch.mps, "empty_cache", _signature_true(torch.mps.empty_cache, lambda: mps.append(1)))
    devmem.release_memory("cuda:1")
    assert (cuda, mps) == ([1], [])
    devmem.release_memory("cpu")
    assert (cuda, mps) == ([1], [])


def test_mps_windows_slices_with_numpy_not_the_cuda_path(monkeypatch):
    from RetrievalSegLib.data.volume import Volume
    from RetrievalSegLib.segmentation import slices

    def no_device_window(stack, bounds, device):
        raise AssertionError(f"window_on_device called for {device}")

    monkeypatch.setattr(slices, "window_on_device", _signature_true(slices.window_on_device, no_device_window))
    vol = Volume(np.arange(2 * 5 * 6, dtype=np.int16).reshape(2, 5, 6), spacing=(1.0, 1.0, 3.0))
    got = slices.slices_to_uint8(vol, 2, [0, 1], (0.0, 59.0), device="mps")
    want = [slices.slice_to_uint8(vol, 2, i, (0.0, 59.0)) for i in (0, 1)]
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


# ----------------------------------------------------------------------------- bench-volume's memory table
@pytest.mark.slow  # builds SAM 2 and runs 4 encoder + query calls: ~10 s on a quiet 2-core machine
def test_the_memory_table_has_a_row_per_size_k_and_batch_and_no_peak_off_cuda(capsys):
    from RetrievalSegLib.benchmarks.volume import memory_table, print_memory_table

    rows = memory_table("cpu", sizes=(256,), ks=(1, 2), batches=(1, 2), n_labels=1)
    assert [(r["image_size"], r["k"], r["batch"]) for r in rows] == [(256, 1, 1), (256, 1, 2), (256, 2, 1), (256, 2, 2)]
    assert all(r["peak"] is None and r["over_model"] is None and not r["oom"] and r["precision"] == "fp32"
               for r in rows)
    print_memory_table(rows + [dict(image_size=1024, k=16, batch=32, precision="bf16", oom=True, peak=None,
                                    over_model=None)], n_labels=1)
    out = capsys.readouterr().out
    assert "| 256 | 2 | 2 | fp32 | n/a | n/a |" in out and "| 1024 | 16 | 32 | bf16 | out of memory | out of memory |" in out
