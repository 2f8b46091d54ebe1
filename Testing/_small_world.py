"""The small segmentation world several test files share: a random-weight engine at 256 px with
DINOv2 at 56 px (and its SAM 2 engine alone), a 2-case synthetic study, and a bank made of the first case."""
from __future__ import annotations

import warnings
from pathlib import Path

from RetrievalSegLib.bank.support_bank import LabelInfo, SupportBank
from RetrievalSegLib.data.synthetic import LABELS, make_synthetic_study
from RetrievalSegLib.engine.pipeline import RetrievalEngine
from RetrievalSegLib.engine.sam2_memory import Sam2MemoryEngine
from RetrievalSegLib.models.loaders import load_sam2


def small_engine() -> RetrievalEngine:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return RetrievalEngine.load(random_weights=True, image_size=256, device="cpu", dinov2_input_size=56)


def small_sam2_engine() -> Sam2MemoryEngine:
    """SAM 2.1 tiny with seeded random weights at 256 px, on the CPU (the engine tests' model)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Sam2MemoryEngine(load_sam2("tiny", random_weights=True, seed=0, device="cpu", image_size=256))


def small_study(n_slices: int = 6, seed: int | None = None):
    kw = {} if seed is None else {"seed": seed}
    return make_synthetic_study(2, shape=(n_slices, 40, 36), spacing=(1.2, 1.2, 5.0), **kw)


def bank_of_first_case(folder: Path, engine: RetrievalEngine, study) -> SupportBank:
    """A bank with the synthetic labels, holding every annotated slice of the study's first case."""
    b = SupportBank.create(folder, [LabelInfo(v, n, c) for v, (n, c) in LABELS.items()], engine.embedder.identity)
    b.add_volume(study[0].image, study[0].labels, study[0].case_id, engine.embedder)
    return b


def bank_through_worker(client, path: Path, case, settings, case_id: str | None = None, **run) -> Path:
    """A bank at `path` with the synthetic labels holding every annotated slice of `case`, made by the
    worker `client` as the module makes one (jobs create_bank and add_volume); `run`: e.g. timeout."""
    from RetrievalSegLib.worker import protocol as wp
    from RetrievalSegLib.worker.client import labels_json, volume_spec

    labels = [LabelInfo(v, n, c) for v, (n, c) in sorted(LABELS.items())]
    client.run("create_bank", {"settings": settings.to_json(), "bank": str(path), "labels": labels_json(labels)}, **run)
    folder = client.new_job_folder()
    client.run("add_volume", {
        "settings": settings.to_json(), "bank": str(path), "volume": volume_spec(folder, "volume", case.image),
        "labelmap": wp.save_array(folder, "labels", case.labels.array),
        "case_id": case.case_id if case_id is None else case_id, "axis": None, "window": [0.0, 1000.0],
    }, folder=folder, **run)
    return path
