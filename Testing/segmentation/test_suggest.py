"""Which slices to annotate next (RetrievalSegLib.segmentation.suggest, `rseg suggest`).

What is checked:
* on a volume made of distinct appearance groups (shuffled along the axis, unequal sizes), the
  picks from an empty bank hit every group before repeating one; with a bank covering some
  groups the picks come from the others; coverage after adding the picks beats the same number
  of evenly spaced slices and of seeded random slices (and those comparisons are not vacuous:
  the evenly spaced and most random choices miss a group);
* with the real DINOv2-small architecture and seeded random weights, these groups are separated
  (checked first: every slice is nearer to each slice of its own group than to any other
  group's), so the end-to-end tests use real embeddings; the selection rules (ties, confidence,
  gaps, empty slices, n larger than the volume) are also tested on given embeddings;
* a volume of constant slices: every pick flagged empty, spread along the axis;
* a bank made with another DINOv2 is refused with the re-embed command;
* `rseg suggest` prints the table or JSON, reads the last segmentation's sidecar (`--seg`), and
  exits 2 on usage errors and 1 on failures.
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest

from RetrievalSegLib.segmentation import provenance
from RetrievalSegLib.bank.support_bank import BankModelMismatchError, LabelInfo, SupportBank
from RetrievalSegLib.segmentation.slices import slices_to_uint8, window_for_volume
from RetrievalSegLib.segmentation.suggest import (
    EMPTY_INTENSITY,
    EMPTY_SEGMENTATION,
    REUSED_NOTE,
    LastSegmentation,
    VolumeEmbeddingCache,
    build_suggestions,
    coverage,
    cosine_distances,
    select_slices,
    suggest_slices,
)
from RetrievalSegLib.data.volume import Volume, write_volume

H = W = 48
GROUP_SIZES = (8, 2, 5, 3, 6)  # unequal: evenly spaced slices miss the small groups
DINO_SIZE = 56
CLI_MODEL = ["--random-weights", "--device", "cpu", "--dinov2-input-size", str(DINO_SIZE), "--no-progress"]


def _pattern(group: int, rng: np.random.Generator, j: int) -> np.ndarray:
    """One slice of an appearance group: a structure per group, noise and a small shift per slice."""
    yy, xx = np.mgrid[:H, :W]
    img = 200 + 30 * rng.standard_normal((H, W))
    s = 0.5 * j
    if group == 0:
        img[(yy - 14 - s) ** 2 + (xx - 14) ** 2 < 90] += 800  # a bright disc
    elif group == 1:
        img[(yy // 6) % 2 == 0] += 600  # stripes
    elif group == 2:
        img[((xx // 8) + (yy // 8)) % 2 == 0] += 500  # a checkerboard
    elif group == 3:
        r = np.hypot(yy - 32, xx - 32 - s)
        img[(r > 8) & (r < 14)] += 900  # a ring
    else:
        img += xx * 20  # a ramp
    return img


def groups_volume(seed: int = 0) -> tuple[Volume, np.ndarray]:
    """(volume, group of each slice): the groups shuffled along k."""
    rng = np.random.default_rng(seed)
    slices, groups = [], []
    for g, size in enumerate(GROUP_SIZES):
        for j in range(size):
            slices.append(_pattern(g, rng, j))
            groups.append(g)
    order = np.random.default_rng(seed + 1).permutation(len(slices))
    array = np.stack([slices[o] for o in order]).astype(np.int16)
    return Volume(array, (1.0, 1.0, 3.0)), np.array(groups)[order]


@pytest.fixture(scope="module")
def embedder():  # type: ignore[no-untyped-def]
    from RetrievalSegLib.models.loaders import load_dinov2
    from RetrievalSegLib.engine.retrieval import SliceEmbedder

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the RANDOM weights warning is expected
        dino = load_dinov2("small", random_weights=True, seed=0, device="cpu")
    return SliceEmbedder(dino, input_size=DINO_SIZE)


@pytest.fixture(scope="module")
def groups(embedder):  # type: ignore[no-untyped-def]
    """(volume, groups, windowed slices, embeddings, window)."""
    volume, g = groups_volume()
    bounds = window_for_volume(volume)
    images = slices_to_uint8(volume, 2, list(range(volume.array.shape[0])), bounds)
    return volume, g, images, embedder.embed(images), bounds


def _bank(path: Path, embedder, volume: Volume, bounds, indices, case_id: str = "other") -> SupportBank:  # type: ignore[no-untyped-def]
    bank = SupportBank.create(path, [LabelInfo(1, "thing", (1.0, 0.0, 0.0))], embedder.identity)
    for i in indices:
        img = volume.array[i]
        mask = np.zeros(img.shape, bool)
        mask[10:20, 10:20] = True
        bank.add_slice(img, {1: mask}, case_id, "k", int(i), (1.0, 1.0), embedder, origin="initial", window=bounds)
    return bank


def _clusters(sizes, dim: int = 16, spread: float = 0.05, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors around well-separated random centres, shuffled: (embeddings, cluster)."""
    rng = np.random.default_rng(seed)
    centres = np.linalg.qr(rng.standard_normal((dim, dim)))[0][: len(sizes)]
    vecs, labels = [], []
    for c, size in enumerate(sizes):
        for _ in range(size):
            v = centres[c] + spread * rng.standard_normal(dim)
            vecs.append(v / np.linalg.norm(v))
            labels.append(c)
    order = rng.permutation(len(vecs))
    return np.array(vecs)[order], np.array(labels)[order]


@pytest.fixture(scope="module")
def from_empty_bank(groups, embedder):  # type: ignore[no-untyped-def]
    """Suggestions for the groups volume without a bank: as many picks as groups, and two more."""
    return suggest_slices(groups[0], None, embedder, n=len(GROUP_SIZES) + 2)


@pytest.fixture()
def cli_embedder(monkeypatch, embedder):  # type: ignore[no-untyped-def]
    """The CLI's DINOv2 for CLI_MODEL is this module's embedder (same seeded random weights: one load)."""
    from RetrievalSegLib.engine import build as engine_build

    key = ("dino", "small", "None", "cpu", True, 0, DINO_SIZE)
    monkeypatch.setitem(engine_build._loaded, key, embedder)
    return embedder


# ------------------------------------------------------------------------------- random DINOv2 separates the groups
def test_random_weight_dinov2_separates_the_appearance_groups(groups) -> None:  # type: ignore[no-untyped-def]
    """The premise of the end-to-end tests below, checked rather than assumed."""
    _, g, _, emb, _ = groups
    d = cosine_distances(emb, emb)
    for group in range(len(GROUP_SIZES)):
        own, other = g == group, g != group
        assert d[np.ix_(own, own)].max() < d[np.ix_(own, other)].min(), group


# ------------------------------------------------------------------------------- end to end, real embeddings
def test_empty_bank_picks_hit_every_group_before_repeating_one(groups, from_empty_bank) -> None:  # type: ignore[no-untyped-def]
    volume, g, _, _, _ = groups
    result = from_empty_bank
    picked = [int(g[s.index]) for s in result.picks]
    assert sorted(picked[: len(GROUP_SIZES)]) == list(range(len(GROUP_SIZES)))
    assert [s.rank for s in result.picks] == list(range(1, len(GROUP_SIZES) + 3))
    assert result.coverage_before is None and result.bank_entries == 0
    first = result.picks[0]
    assert first.gap is None and first.reasons[0].startswith("represents the volume best")
    # Every slice is covered by exactly one pick, and a pick covers its own group's slices.
    covered = sorted(i for s in result.picks for i in s.covers)
    assert covered == list(range(volume.array.shape[0]))
    for s in result.picks[: len(GROUP_SIZES)]:
        assert all(g[i] == g[s.index] for i in s.covers)


def test_picks_come_from_the_groups_the_bank_does_not_cover(tmp_path, groups, embedder) -> None:  # type: ignore[no-untyped-def]
    volume, g, _, emb, bounds = groups
    covered_groups = (0, 4)
    in_bank = [int(i) for i in np.flatnonzero(np.isin(g, covered_groups))[:3]]
    bank = _bank(tmp_path / "bank", embedder, volume, bounds, in_bank)
    result = suggest_slices(volume, bank, embedder, n=3, case_id="other")
    assert sorted(int(g[s.index]) for s in result.picks) == [1, 2, 3]
    assert result.bank_entries == 3
    for s in result.picks:
        assert s.nearest_entry in {e.id for e in bank.entries()}
        assert s.distance_to_bank is not None and s.distance_to_bank > 0.01
        assert any(r.startswith("cosine distance") for r in s.reasons)
    # The coverage the result reports is the module's measure on the real bank rows.
    assert result.coverage_before == pytest.approx(coverage(emb, bank.embeddings()), abs=1e-6)
    assert result.coverage_after < result.coverage_before
    # This volume's own slices in the bank (its case id) are never suggested.
    assert result.in_bank == sorted(in_bank)
    again = build_suggestions(emb, bank.embeddings(), [e.id for e in bank.entries()], len(g), 2, in_bank=in_bank)
    assert not set(in_bank) & {s.index for s in again.picks}
    assert len(again.picks) == len(g) - len(in_bank) and any("3 already in the bank" in n for n in again.notes)


def test_coverage_after_the_picks_beats_evenly_spaced_and_random_slices(groups, from_empty_bank) -> None:  # type: ignore[no-untyped-def]
    volume, g, _, emb, _ = groups
    n = len(GROUP_SIZES)
    assert from_empty_bank.coverage_after == pytest.approx(coverage(emb, emb[[s.index for s in from_empty_bank.picks]]), abs=1e-6)
    ours = coverage(emb, emb[[s.index for s in from_empty_bank.picks[:n]]])
    even = np.linspace(0, len(g) - 1, n).round().astype(int)
    assert len(set(g[even])) < n  # non-vacuous: evenly spaced slices miss a group here
    assert ours < coverage(emb, emb[even]) / 5
    draws = [np.random.default_rng(seed).choice(len(g), n, replace=False) for seed in range(20)]
    assert sum(len(set(g[d])) < n for d in draws) >= 15  # most random draws miss a group
    for d in draws:
        assert ours < coverage(emb, emb[d])


def test_a_volume_of_constant_slices_gives_flagged_picks_spread_along_it(embedder) -> None:  # type: ignore[no-untyped-def]
    volume = Volume(np.full((9, 32, 32), 300, np.int16))
    result = suggest_slices(volume, None, embedder, n=3)
    assert [s.index for s in result.picks] == [4, 0, 8]  # ties: the middle, then farthest along the axis
    assert all(s.empty and s.empty_reason == EMPTY_INTENSITY for s in result.picks)
    assert result.empty_slices == list(range(9))
    assert any("every slice that can be suggested looks empty" in n for n in result.notes)
    assert result.coverage_after == pytest.approx(0.0, abs=1e-6)


def test_a_refresh_reuses_the_embeddings_of_the_same_voxels_only(tmp_path, groups, embedder) -> None:  # type: ignore[no-untyped-def]
    """The worker's suggestion refresh: the same volume, axis and window are not embedded again (same
    result, bit for bit); a changed voxel, another window or axis, another DINOv2 embed again."""
    volume = groups[0]
    calls = []

    class Counting:  # the real embedder, counting the slices it embeds
        identity = embedder.identity
        dinov2 = embedder.dinov2

        def __init__(self, identity=None):
            if identity is not None:
                self.identity = identity

        def embed(self, images, progress=None):
            calls.append(len(images))
            return embedder.embed(images, progress=progress)

    cache = VolumeEmbeddingCache(max_volumes=2)
    bank = _bank(tmp_path / "bank", embedder, volume, groups[4], [0, 1])
    first = suggest_slices(volume, bank, Counting(), n=4, embeddings_cache=cache)
    seen = []
    again = suggest_slices(volume, bank, Counting(), n=4, embeddings_cache=cache, progress=lambda d, t: seen.append((d, t)))
    n = volume.array.shape[0]
    assert calls == [n] and seen == [(n, n)]  # not embedded again; the progress still completes
    assert REUSED_NOTE in again.notes and REUSED_NOTE not in first.notes
    assert [p.index for p in again.picks] == [p.index for p in first.picks]
    assert again.coverage_after == first.coverage_after and again.picks == first.picks  # equal, not merely close
    uncached = suggest_slices(volume, bank, Counting(), n=4)
    assert [(p.index, p.distance_to_bank, p.gap) for p in uncached.picks] == [(p.index, p.distance_to_bank, p.gap) for p in again.picks]
    calls.clear()
    changed = volume.array.copy()
    changed[3, 10, 10] += 1  # one voxel
    suggest_slices(Volume(changed, volume.spacing), bank, Counting(), n=4, embeddings_cache=cache)
    suggest_slices(volume, bank, Counting(), n=4, window=(0.0, 500.0), embeddings_cache=cache)
    suggest_slices(volume, None, Counting("dinov2-small:other@56"), n=4, embeddings_cache=cache)
    assert calls == [n, n, n]
    assert len(cache._items) == 2  # least recently used out


def test_bank_made_with_another_dinov2_is_refused_with_the_reembed_hint(tmp_path, groups, embedder) -> None:  # type: ignore[no-untyped-def]
    volume = groups[0]
    other = SupportBank.create(tmp_path / "bank", [LabelInfo(1, "thing", (1.0, 0.0, 0.0))], "dinov2-base:sha256-0123456789abcdef@224")
    with pytest.raises(BankModelMismatchError, match=r"made with dinov2-base.*rseg bank verify --reembed .* --dinov2 small"):
        suggest_slices(volume, other, embedder, n=3)


# ------------------------------------------------------------------------------- the selection rules, given embeddings
def test_select_on_given_embeddings_hits_every_cluster_first() -> None:
    emb, cluster = _clusters((9, 1, 4, 2, 6))
    picks = select_slices(emb, np.zeros((0, emb.shape[1])), 7)
    assert sorted(cluster[p.index] for p in picks[:5]) == [0, 1, 2, 3, 4]
    # Gaps shrink as the picks cover the volume (farthest-point order).
    gaps = [p.gap for p in picks[1:]]
    assert gaps == sorted(gaps, reverse=True)
    # With the bank holding clusters 0 and 2, the first picks are the other three clusters.
    bank = emb[[int(np.flatnonzero(cluster == 0)[0]), int(np.flatnonzero(cluster == 2)[0])]]
    assert sorted(cluster[p.index] for p in select_slices(emb, bank, 3)) == [1, 3, 4]


def test_without_a_bank_the_first_pick_is_the_medoid() -> None:
    degrees = np.array([0, 30, 40, 10, 20])  # on an arc: 20 degrees is nearest to all the others
    emb = np.stack([np.cos(np.radians(degrees)), np.sin(np.radians(degrees))], axis=1)
    picks = select_slices(emb, np.zeros((0, 2)), 2)
    assert picks[0].index == 4 and picks[0].gap is None
    assert picks[0].mean_distance == pytest.approx(cosine_distances(emb, emb)[4].mean())
    # Then the farthest from it: 0 and 40 degrees are both 20 away, a tie that goes to the slice
    # farther along the axis from the pick (index 0, 4 slices away, not index 2).
    assert picks[1].index == 0


def test_ties_are_broken_along_the_axis_and_deterministically() -> None:
    emb = np.tile(np.eye(4)[:1], (7, 1))  # seven identical slices
    bank = np.eye(4)[1:2]  # one entry, equally far from all of them
    picks = select_slices(emb, bank, 3)
    assert [p.index for p in picks] == [3, 0, 6]  # middle, then the ends
    assert [p.index for p in select_slices(emb, bank, 3, anchors=[0])] == [6, 3, 2]  # away from slice 0 in the bank
    assert [p.index for p in select_slices(emb, bank, 3)] == [3, 0, 6]  # same input, same answer


def test_n_larger_than_the_volume_returns_every_slice_once(groups) -> None:  # type: ignore[no-untyped-def]
    emb = groups[3]
    result = build_suggestions(emb, np.zeros((0, emb.shape[1])), [], 100, 2)
    assert sorted(s.index for s in result.picks) == list(range(len(emb)))
    assert any("100 slices asked for" in n for n in result.notes)
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        select_slices(emb, np.zeros((0, emb.shape[1])), 0)


def test_low_confidence_and_not_segmented_slices_come_first_empty_ones_last() -> None:
    # Five slices at the same distance from the one bank entry (orthogonal to it).
    emb = np.eye(6)[1:]
    bank = np.eye(6)[:1]
    status = [provenance.SEGMENTED, provenance.SEGMENTED, provenance.BEYOND_EXTENT, provenance.SEGMENTED,
              provenance.SEGMENTED]
    last = LastSegmentation(status, np.array([0.9, 0.2, math.nan, 0.9, 0.95]),
                            np.array([False, False, False, True, False]))
    result = build_suggestions(emb, bank, ["e1"], 5, 2, last=last, blank=np.array([False] * 4 + [True]))
    order = [s.index for s in result.picks]
    # The gap (not segmented: uncertainty 1) first, then confidence 0.2, then 0.9; empties last.
    assert order[:3] == [2, 1, 0]
    assert set(order[3:]) == {3, 4}
    by_index = {s.index: s for s in result.picks}
    assert not by_index[2].empty and "not segmented (beyond extent) in the last segmentation: a gap" in by_index[2].reasons
    assert by_index[1].confidence == pytest.approx(0.2) and "confidence 0.20 in the last segmentation" in by_index[1].reasons
    assert by_index[3].empty and by_index[3].empty_reason == EMPTY_SEGMENTATION
    assert by_index[4].empty and by_index[4].empty_reason == EMPTY_INTENSITY
    assert result.empty_slices == [3, 4]
    # Without the last segmentation, the same slices are plain ties: the middle one first.
    assert [s.index for s in build_suggestions(emb, bank, ["e1"], 1, 2).picks] == [2]


def test_last_segmentation_from_a_sidecar(tmp_path) -> None:
    records = [
        {"index": 0, "status": provenance.SEGMENTED, "confidence": 0.8, "object_score": {"1": 2.0}, "iou": {"1": 0.9}},
        {"index": 1, "status": provenance.SEGMENTED, "confidence": 0.7, "object_score": {"1": -3.0}, "iou": {"1": 0.1}},
        {"index": 2, "status": provenance.BEYOND_EXTENT},
    ]
    path = provenance.write_sidecar(tmp_path / "seg.nii.gz", {"axis": "k", "bank": {"revision": 4}}, records)
    doc = provenance.read_sidecar(path)
    by_scores = LastSegmentation.from_sidecar(doc)
    assert by_scores.found_nothing.tolist() == [False, True, False]  # object score <= 0: absent
    assert by_scores.uncertainty().tolist() == pytest.approx([0.2, 0.3, 1.0])
    labelmap = np.zeros((3, 4, 4), np.uint8)
    labelmap[1, 2, 2] = 1  # the label map says slice 1 has something, slice 0 nothing
    by_map = LastSegmentation.from_sidecar(doc, labelmap)
    assert by_map.found_nothing.tolist() == [True, False, False]  # slice 2 is a gap, not empty
    assert by_map.axis == 2 and by_map.bank_revision == 4
    with pytest.raises(ValueError, match="4 slices along k, its sidecar describes 3"):
        LastSegmentation.from_sidecar(doc, np.zeros((4, 4, 4), np.uint8))


# ------------------------------------------------------------------------------- command line
def _cli(argv: list[str], capsys) -> tuple[int, str, str]:  # type: ignore[no-untyped-def]
    from RetrievalSegLib.cli.main import main

    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_suggest_table_json_and_seg(tmp_path, groups, cli_embedder, capsys) -> None:  # type: ignore[no-untyped-def]
    volume, g, _, _, bounds = groups
    image = write_volume(volume, tmp_path / "image.nrrd")
    bank = _bank(tmp_path / "bank", cli_embedder, volume, bounds, [int(np.flatnonzero(g == 0)[0])])
    code, out, err = _cli(["suggest", str(image), "--bank", str(bank.path), "--n", "2", *CLI_MODEL], capsys)
    assert code == 0, err
    assert "slices to annotate next along k (24 slices; bank" in out and "1 usable entries" in out
    assert "coverage (mean cosine distance" in out and "RANDOM WEIGHTS" in out
    assert sorted(int(g[int(line.split()[1])]) for line in out.splitlines()[2:] if line.split()[0] in "12") == [1, 4]
    # --seg: the last run segmented every slice but two, with one slice unsure.
    gaps = [int(i) for i in np.flatnonzero(g == 0)[1:3]]  # two slices of the covered group
    seg = np.ones(volume.array.shape, np.uint8)
    seg[gaps] = 0  # not segmented: background in the label map
    seg_path = write_volume(volume.with_array(seg), tmp_path / "seg.nii.gz")
    records = [{"index": i, "status": provenance.BEYOND_EXTENT} if i in gaps else
               {"index": i, "status": provenance.SEGMENTED, "confidence": 0.9, "object_score": {"1": 1.0}}
               for i in range(len(g))]
    provenance.write_sidecar(seg_path, {"axis": "k", "bank": {"revision": 1}}, records)
    code, out, err = _cli(["suggest", str(image), "--bank", str(bank.path), "--n", "6", "--json",
                           "--seg", str(seg_path), *CLI_MODEL], capsys)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["axis"] == "k" and doc["random_weights"] is True and doc["dinov2"] == cli_embedder.identity
    assert doc["coverage_after"] < doc["coverage_before"]
    picks = doc["picks"]
    assert len(picks) == 6 and not any(int(g[p["index"]]) == 0 for p in picks[:4])
    statuses = {p["index"]: p["status"] for p in picks}
    assert all(statuses[i] == provenance.BEYOND_EXTENT for i in gaps if i in statuses)
    # A gap of the covered group outranks the uncovered groups' second slices (its weight is 2,
    # theirs 1.1), and is never flagged empty although the last run has no label there.
    gap_picks = [p for p in picks if p["index"] in gaps]
    assert gap_picks and not any(p["empty"] for p in picks)
    assert "not segmented (beyond extent) in the last segmentation: a gap" in gap_picks[0]["reasons"]


def test_cli_suggest_errors(tmp_path, groups, cli_embedder, capsys) -> None:  # type: ignore[no-untyped-def]
    volume = groups[0]
    image = write_volume(volume, tmp_path / "image.nrrd")
    code, _, err = _cli(["suggest", str(image), "--n", "0", *CLI_MODEL], capsys)
    assert code == 2 and "expected an integer >= 1" in err
    code, _, err = _cli(["suggest", str(image), "--window", "400", *CLI_MODEL], capsys)
    assert code == 2 and "--window and --level together" in err
    code, _, err = _cli(["suggest", str(image), "--seg", str(tmp_path / "none.nii.gz"), *CLI_MODEL], capsys)
    assert code == 1 and "no sidecar" in err
    other = SupportBank.create(tmp_path / "other", [LabelInfo(1, "thing", (1.0, 0.0, 0.0))], "dinov2-base:sha256-0123456789abcdef@224")
    code, _, err = _cli(["suggest", str(image), "--bank", str(other.path), *CLI_MODEL], capsys)
    assert code == 1 and "rseg bank verify --reembed" in err
    code, _, err = _cli(["suggest", str(image), "--bank", str(tmp_path / "missing"), *CLI_MODEL], capsys)
    assert code == 1 and "missing" in err


def test_revision_note_compares_the_last_segmentation_with_the_bank_as_it_is(tmp_path, groups, embedder) -> None:  # type: ignore[no-untyped-def]
    """Issue 32: the note says nothing when the segmentation used this bank as it is, and says which
    revision (or which bank) it used when that differs; it is never a bare, misleading number."""
    volume, g, _, _, bounds = groups
    bank = _bank(tmp_path / "bank", embedder, volume, bounds, [int(np.flatnonzero(g == 0)[0])])
    n = volume.array.shape[0]

    def notes(revision, bank_id) -> list[str]:  # type: ignore[no-untyped-def]
        last = LastSegmentation([provenance.SEGMENTED] * n, np.full(n, 0.9), np.zeros(n, bool), 2, revision, bank_id)
        result = suggest_slices(volume, bank, embedder, n=1, window=bounds, last=last)
        return [x for x in result.notes if "segmentation made with" in x]

    then = bank.revision
    assert notes(then, bank.bank_id) == []  # made with this bank as it is now: nothing to say
    bank.add_slice(volume.array[int(np.flatnonzero(g == 1)[0])], {1: np.ones((H, W), bool)}, "other", "k", 99,
                   (1.0, 1.0), embedder, window=bounds)
    (note,) = notes(then, bank.bank_id)
    assert f"revision {then} of this bank, which is now at revision {then + 1}" in note
    (note,) = notes(then, "another-bank")
    assert "another support bank (id another-bank" in note and bank.bank_id in note
    (note,) = notes(then + 5, bank.bank_id)
    assert f"made with revision {then + 5} of this bank, but the bank is at revision {then + 1}" in note


def test_suggest_measures_the_bank_with_the_embedders_own_retrieval_feature(tmp_path, embedder):
    """A bank holding cls and mean: suggestions made with the mean embedder compare the volume's mean
    embeddings with the bank's mean rows, never with its cls rows (two features are never mixed)."""
    from RetrievalSegLib.engine.retrieval import SliceEmbedder
    from RetrievalSegLib.segmentation.suggest import bank_rows

    from _bank_helpers import LABELS, make_case

    mean = SliceEmbedder(embedder.dinov2, input_size=embedder.input_size, feature="mean")
    bank = SupportBank.create(tmp_path / "bank", LABELS, embedder.identity)
    bank.add_volume(*make_case(0), "p01", embedder)
    bank.add_feature(mean)
    images = [bank.load_entry(e.id).image for e in bank.entries()]
    _, rows = bank_rows(bank, mean.identity)
    np.testing.assert_allclose(rows, mean.embed(images), atol=1e-6)
    image, _ = make_case(1)
    got = suggest_slices(image, bank, mean, n=1, case_id="p02")
    volume_rows = mean.embed(slices_to_uint8(image, 2, list(range(image.array.shape[0])), window_for_volume(image)))
    assert got.coverage_before == pytest.approx(coverage(volume_rows, rows), abs=1e-5)
    assert got.coverage_before != pytest.approx(coverage(volume_rows, bank_rows(bank)[1]), abs=1e-5)
