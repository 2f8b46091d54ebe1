"""Writes the schema-1 bank fixtures of test_bank_v2.py with the code of main at 995a891
(the last schema-1 RetrievalSeg): run `PYTHONPATH=<checkout of 995a891> python make_v1_bank.py`.

bank_v1_folder.zip: the bank folder as it lies on disk (bank.json, embeddings.npy, entries/);
bank_v1_export.zip: `SupportBank.export` of the same bank. The bank holds initial entries of two
cases, a correction that retired the entry it replaced, an entry retired by the user and one
marked damaged by `verify --repair` (its file deleted).
"""
import hashlib
import os
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from RetrievalSegLib.bank.support_bank import LabelInfo, SupportBank


class HashEmbedder:  # the same stand-in as Testing/bank/test_bank.py
    def __init__(self, dim=16, name="dinov2-small:hash"):
        self.dim = dim
        self.identity = f"{name}@{dim}"

    def embed(self, images, progress=None):
        out = np.empty((len(images), self.dim), dtype=np.float32)
        for n, im in enumerate(images):
            seed = int.from_bytes(hashlib.sha256(np.ascontiguousarray(im).tobytes()).digest()[:8], "little")
            v = np.random.default_rng(seed).normal(size=self.dim).astype(np.float32)
            out[n] = v / np.linalg.norm(v)
        return out


here = Path(__file__).resolve().parent
emb = HashEmbedder()
with tempfile.TemporaryDirectory() as tmp:
    path = Path(tmp) / "bank"
    bank = SupportBank.create(path, [LabelInfo(1, "RV", (1.0, 0.0, 0.0)), LabelInfo(2, "Myo", (0.0, 1.0, 0.0))], emb.identity)
    rng = np.random.default_rng(0)
    for case in ("p01", "p01_frame02", "p02"):
        for k in range(4):
            img = rng.integers(0, 255, (16, 16), dtype=np.uint8)
            bank.add_slice(img, {1: img > 128, 2: img < 40}, case, "k", k, (1.5, 1.5), emb, origin="initial")
    img = rng.integers(0, 255, (16, 16), dtype=np.uint8)
    correction = bank.add_slice(img, {1: img > 100}, "p02", "k", 1, (1.5, 1.5), emb)  # retires p02 k=1
    bank.remove(bank.list_entries(case_id="p01")[0].id)  # retired by the user
    damaged = bank.list_entries(case_id="p02")[0]
    os.unlink(bank.entry_path(damaged.id))
    report = bank.verify(repair=True, embedder=emb)
    assert bank.entry(damaged.id).damaged, report.summary()
    with zipfile.ZipFile(here / "bank_v1_folder.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(path.rglob("*")):
            if f.is_file() and f.name != ".lock":
                zf.write(f, f.relative_to(path).as_posix())
    bank.export(here / "bank_v1_export.zip")
    print("wrote", here / "bank_v1_folder.zip", here / "bank_v1_export.zip", len(bank.entries(True)), "entries", file=sys.stderr)
