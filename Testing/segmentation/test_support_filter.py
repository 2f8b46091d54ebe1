"""The support filter switch (`--support-filter all|foreground`): `foreground` conditions each label
only on retrieved slices that contain it (the top k of those, searching deeper than k), falls back
to the plain top k where fewer exist in the bank (recorded per slice), and changes nothing else."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from RetrievalSegLib.bank.support_bank import LabelInfo, SupportBank
from RetrievalSegLib.data.volume import Volume
from RetrievalSegLib.engine.pipeline import RetrievalEngine
from RetrievalSegLib.segmentation.provenance import segmentation_provenance, slice_records
from RetrievalSegLib.segmentation.queries import SupportMemories, retrieve
from RetrievalSegLib.segmentation.segment import segment_volume

from _bank_helpers import HashEmbedder

LABELS = [LabelInfo(1, "RV", (1.0, 0.0, 0.0)), LabelInfo(2, "Myo", (0.0, 1.0, 0.0)),
          LabelInfo(3, "LV", (0.0, 0.0, 1.0))]
#: labels drawn on each bank entry: 1 on all, 2 on three, 3 on one (fewer than k = 2)
DRAWN = [(1,), (1, 2), (1, 3), (1, 2), (1,), (1, 2), (1,), (1,)]
#: a smaller bank where SAM 2 runs (each entry costs a memory encoding): the same pattern
SMALL = [(1,), (1, 2), (1, 3), (1, 2), (1, 2)]


def _slice(seed: int, size=(40, 36)) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    rng = np.random.default_rng(seed)
    img = rng.normal(100, 20, size=size).astype(np.float32)
    yy, xx = np.mgrid[: size[0], : size[1]]
    r = np.hypot(yy - 20 - seed % 5, xx - 18 + seed % 3)
    masks = {1: r < 4, 2: (r >= 4) & (r < 7), 3: (r >= 7) & (r < 9)}
    for lab, m in masks.items():
        img[m] += 80 * lab
    return img, masks


def _bank(path, embedder, drawn=DRAWN) -> SupportBank:
    bank = SupportBank.create(path, LABELS, embedder.identity)
    for n, labs in enumerate(drawn):
        img, masks = _slice(n)
        bank.add_slice(img, {lab: masks[lab] for lab in labs}, f"p{n:02d}", 2, 0, (1.0, 1.0), embedder,
                       origin="initial", window=(0.0, 400.0))
    return bank


def _queries(n=5) -> list[np.ndarray]:
    return [np.clip(_slice(100 + i)[0] / 400 * 255, 0, 255).astype(np.uint8) for i in range(n)]


def test_foreground_keeps_per_label_the_top_k_of_the_slices_that_contain_it(tmp_path):
    emb = HashEmbedder()
    bank = _bank(tmp_path / "bank", emb)
    drawn = {e.id: set(e.labels_present) for e in bank.entries()}
    images = _queries()
    k = 2
    found = retrieve(emb, bank, images, k, support_filter="foreground", labels=[1, 2, 3])
    ranking = bank.search(emb.embed(images), len(DRAWN), case_policy="ignore")  # the whole bank, best first
    assert found.hits == [h[:k] for h in ranking]  # the plain top k is unchanged
    deeper = 0
    for j, full in enumerate(ranking):
        for lab in (1, 2):
            expect = [(eid, s) for eid, s in full if lab in drawn[eid]][:k]
            assert found.per_label[j][lab] == expect
            deeper += any(eid not in {e for e, _ in found.hits[j]} for eid, _ in expect)
        # label 3 is on one entry only (< k): the slice falls back to the plain top k, recorded
        assert found.per_label[j][3] == found.hits[j] and found.fallback[j] == [3]
    assert deeper  # some label's supports came from below the top k: the search went deeper

    plain = retrieve(emb, bank, images, k)  # the default filter: no per-label supports
    assert plain.per_label is None and plain.supports() == plain.hits


def test_foreground_respects_the_case_policy_when_searching_deeper(tmp_path):
    emb = HashEmbedder()
    bank = _bank(tmp_path / "bank", emb)
    excluded = {e.id for e in bank.entries() if e.case_id == "p01"}  # one of the three with label 2
    found = retrieve(emb, bank, _queries(3), 1, case_id="p01", case_policy="exclude",
                     support_filter="foreground", labels=[2])
    for j in range(3):
        ((eid, _),) = found.per_label[j][2]
        assert eid not in excluded and 2 in bank.entry(eid).labels_present and found.fallback[j] == []
    with pytest.raises(ValueError, match="all, foreground"):
        retrieve(emb, bank, _queries(1), 1, support_filter="present")


@pytest.fixture(scope="module")
def engine() -> RetrievalEngine:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return RetrievalEngine.load(random_weights=True, image_size=256, device="cpu", dinov2_input_size=56)


def _record_conditioning(monkeypatch, engine) -> list:
    """Every (labels, per slice row: per rank the memory used) memory attention is given."""
    calls = []
    real = engine.sam.query_batch

    def recording(features, memories, support_index, labels, items=None, **kw):
        calls.append((tuple(labels), [[memories[i] for i in row] for row in support_index], list(items)))
        return real(features, memories, support_index, labels, items=items, **kw)

    monkeypatch.setattr(engine.sam, "query_batch", recording)
    return calls


def _volume(n=3) -> Volume:
    return Volume(np.stack([_slice(200 + i)[0] for i in range(n)], axis=0), spacing=(1.0, 1.0, 4.0))  # [k, j, i]: n slices along k


def test_foreground_never_conditions_a_label_on_a_slice_without_it(tmp_path, monkeypatch, engine):
    bank = _bank(tmp_path / "bank", engine.embedder, drawn=SMALL)
    calls = _record_conditioning(monkeypatch, engine)
    seg = segment_volume(_volume(), bank, engine, k=2, labels=[1, 2, 3], support_filter="foreground",
                         window=(0.0, 400.0), batch_size=2)
    assert calls and seg.support_filter == "foreground"
    cached = SupportMemories(engine, bank, [1, 2, 3], "fp32")
    for labels, rows, items in calls:
        for j, row in zip(items, rows):
            assert len(row) == 2
            for li, lab in enumerate(labels):
                if lab != 3:  # label 3 falls back (one entry has it): recorded below
                    assert all(mem.present[li] for mem in row), f"label {lab} conditioned on a slice without it"
                # rank i of label lab is exactly the memory of that label's own i-th support
                for mem, (eid, _) in zip(row, seg.slices[j].supports_per_label[lab]):
                    own = cached.memory(eid).select(labels)
                    assert torch.equal(mem.maskmem_features[li].cpu(), own.maskmem_features[li].cpu())
                    assert torch.equal(mem.obj_ptr[li].cpu(), own.obj_ptr[li].cpu())
    for i, r in seg.slices.items():
        assert r.filter_fallback == [3]
        for lab in (1, 2):
            assert all(lab in bank.entry(eid).labels_present for eid, _ in r.supports_per_label[lab])
        assert r.supports_per_label[3] == r.retrieved
    records = [rec for rec in slice_records(seg) if rec["status"] == "segmented"]
    assert records and all(rec["filter_fallback"] == [3] and set(rec["supports_per_label"]) == {"1", "2", "3"}
                           for rec in records)
    prov = segmentation_provenance(seg, engine, bank, k=2)
    assert prov["support_filter"] == "foreground" and prov["retrieval_feature"] == "cls"

    # the default conditions label 2 on slices without it: the filter is what prevents it
    calls.clear()
    plain = segment_volume(_volume(), bank, engine, k=2, labels=[1, 2, 3], window=(0.0, 400.0), batch_size=2)
    assert plain.support_filter == "all" and all(r.supports_per_label is None for r in plain.slices.values())
    assert any(not mem.present[labels.index(2)] for labels, rows, _ in calls for row in rows for mem in row)
    assert "supports_per_label" not in slice_records(plain)[0]


@pytest.mark.slow  # ~10 s of CPU on top of the test above; `make test-all` runs it
def test_foreground_changes_nothing_where_every_support_has_every_label(tmp_path, engine):
    bank = _bank(tmp_path / "bank", engine.embedder, drawn=[(1, 2, 3)] * 3)
    kw = dict(k=2, labels=[1, 2, 3], window=(0.0, 400.0), batch_size=1)
    a = segment_volume(_volume(2), bank, engine, **kw)
    b = segment_volume(_volume(2), bank, engine, support_filter="foreground", **kw)
    np.testing.assert_array_equal(a.labelmap.array, b.labelmap.array)
    for i in a.slices:
        assert a.slices[i].object_score == b.slices[i].object_score and b.slices[i].filter_fallback == []
