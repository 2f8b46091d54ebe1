"""Support bank edits: adding slices and volumes (with embedding), retiring and restoring."""
from __future__ import annotations

import uuid
import warnings
from dataclasses import replace
from typing import Callable, Mapping, Sequence

import numpy as np

from .format import (
    ENTRIES_DIR,
    SCHEMA_VERSION,
    _State,
    ORIGINS,
    RETIRED_BY_USER,
    BankEntry,
    BankModelMismatchError,
    BlankSliceWarning,
    Embedder,
    _now,
    _npz_bytes,
    _Prepared,
    _feature_dim,
    _reembed_hint,
    _retrieval_feature,
    _sha256,
    BankError,
)
from ..engine.memory_cache import _sanitise
from .storage import BankStore
from ..data.fileio import atomic_write_bytes
from ..data.volume import (
    AXIS_NAMES,
    Volume,
    array_axis,
    in_plane_spacing,
    num_slices,
    parse_axis,
    slice_view,
    through_plane_axis,
)


class BankEditing(BankStore):
    """Adding, retiring and restoring entries."""

    # ---------------------------------------------------------------- adding
    def add_volume(
        self,
        image: Volume,
        labelmap: Volume,
        case_id: str,
        embedder: Embedder,
        axis: int | str | None = None,
        window: tuple[float, float] | None = None,
        negatives: int = 0,
        slices: Sequence[int] | None = None,
        origin: str = "initial",
        progress: Callable[[int, int], None] | None = None,
    ) -> list[BankEntry]:
        """Add the annotated slices of a volume (plus up to `negatives` empty ones); newest wins."""
        from ..engine.preprocess import robust_window, to_uint8

        self.check_models(embedder.identity)
        case_id = self._check_case(case_id)
        origin = self._check_origin(origin)
        if not isinstance(image, Volume) or not isinstance(labelmap, Volume):
            raise TypeError("add_volume needs RetrievalSegLib.data.volume.Volume objects for image and labelmap")
        if not image.same_geometry(labelmap):
            raise ValueError(
                f"image and label map of case {case_id!r} do not share a geometry: image size "
                f"{image.size} spacing {image.spacing} origin {image.origin}, label map size "
                f"{labelmap.size} spacing {labelmap.spacing} origin {labelmap.origin}; resample "
                "the label map onto the image first"
            )
        lab = self._integer_labels(labelmap.array, case_id)
        ax = parse_axis(axis)
        if ax is None:
            ax = through_plane_axis(image.spacing)
        n = num_slices(image.array, ax)
        other = tuple(a for a in range(3) if a != array_axis(ax))
        annotated = np.asarray((lab != 0).any(axis=other))  # [n]
        if slices is not None:
            chosen: list[int] = []
            for s in slices:
                if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not 0 <= int(s) < n:
                    raise ValueError(
                        f"slice {s!r} is outside 0..{n - 1} along axis {AXIS_NAMES[ax]} of case {case_id!r}"
                    )
                if int(s) not in chosen:
                    chosen.append(int(s))
            chosen.sort()
        else:
            chosen = [int(i) for i in np.flatnonzero(annotated)]
        if isinstance(negatives, bool) or int(negatives) < 0:
            raise ValueError(f"negatives must be a count >= 0, got {negatives!r}")
        empty = [i for i in range(n) if not annotated[i] and i not in chosen]
        picked: list[int] = []
        if negatives and empty:
            m = min(int(negatives), len(empty))
            picked = sorted({empty[int((j + 0.5) * len(empty) / m)] for j in range(m)})
        indices = sorted(chosen + picked)
        if not indices:
            raise ValueError(
                f"label map of case {case_id!r} has no annotated slice along axis {AXIS_NAMES[ax]} "
                "(all zero); draw at least one slice, pick another axis, or ask for negatives"
            )
        if window is None:
            bounds = robust_window(image.array)
        else:
            bounds = (float(window[0]), float(window[1]))
            if not bounds[1] > bounds[0]:
                raise ValueError(f"intensity window needs low < high, got {window!r}")
        spacing = in_plane_spacing(image.spacing, ax)
        prepared = []
        for i in indices:
            inten = np.array(slice_view(image.array, ax, i))
            lab2 = slice_view(lab, ax, i)
            masks = {v: np.asarray(lab2 == v) for v in self.label_values}
            prepared.append(
                _Prepared(case_id, ax, i, spacing, to_uint8(inten, bounds), inten, masks, bounds)
            )
        self._embed_prepared(prepared, embedder, self.retrieval_features, progress)
        added = self._add_prepared(prepared, origin, embedder)
        self._warn_blank(prepared, added)
        return added

    def _warn_blank(self, prepared: Sequence[_Prepared], added: Sequence[BankEntry]) -> None:
        """Warn about added slices whose intensities are all one value (or not finite).

        SimpleITK reads NaN voxels of a NIfTI file as 0, so a slice of NaNs arrives as a blank
        slice; as a support it retrieves and teaches nothing, which the user should know.
        """
        blank: list[str] = []
        for p, e in zip(prepared, added):
            inten = np.asarray(p.intensities)
            finite = inten[np.isfinite(inten)] if inten.dtype.kind == "f" else inten
            if finite.size < inten.size:
                blank.append(f"{AXIS_NAMES[e.axis]}={e.index} ({e.id}: holds NaN or Inf)")
            elif finite.size == 0 or finite.min() == finite.max():
                value = finite.flat[0] if finite.size else "nothing"
                blank.append(f"{AXIS_NAMES[e.axis]}={e.index} ({e.id}: every voxel is {value})")
        if blank:
            case = added[0].case_id
            warnings.warn(
                f"case {case!r}: {len(blank)} slice(s) added as supports are blank: "
                + ", ".join(blank)
                + ". A blank image shows the models nothing (NaN voxels of a NIfTI file are read as 0);"
                f" check the image, and retire unintended entries with `rseg bank remove {self.path} ID`",
                BlankSliceWarning,
                stacklevel=3,
            )

    def add_slice(
        self,
        image_slice: np.ndarray,
        masks: Mapping[int, np.ndarray],
        case_id: str,
        axis: int | str,
        index: int,
        spacing: tuple[float, float],
        embedder: Embedder,
        intensities: np.ndarray | None = None,
        origin: str = "correction",
        window: tuple[float, float] | None = None,
    ) -> BankEntry:
        """Add one (corrected) slice; an older active entry of the same case/axis/index is retired.

        `image_slice` is the uint8 slice the models see; a non-uint8 slice is windowed (with
        `window`, default robust percentiles) and kept as `intensities`.
        """
        from ..engine.preprocess import robust_window, to_uint8, validate_image, validate_mask

        self.check_models(embedder.identity)
        case_id = self._check_case(case_id)
        origin = self._check_origin(origin)
        ax = parse_axis(axis)
        if ax is None:
            raise ValueError("add_slice needs an explicit slice axis (i, j or k), not 'auto'")
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
            raise ValueError(f"slice index must be an integer >= 0, got {index!r}")
        img = validate_image(image_slice, "image slice")
        if img.ndim != 2:
            raise ValueError(f"image slice must be grey 2D (H, W), got shape {img.shape}")
        sp = tuple(float(s) for s in spacing)
        if len(sp) != 2 or not all(s > 0 for s in sp):
            raise ValueError(f"spacing must be 2 positive numbers (rows, columns) in mm, got {spacing!r}")
        bounds: tuple[float, float] | None = None
        if img.dtype == np.uint8 and window is None:
            image_u8 = np.array(img)
        else:
            bounds = (
                (float(window[0]), float(window[1])) if window is not None else robust_window(img)
            )
            if not bounds[1] > bounds[0]:
                raise ValueError(f"intensity window needs low < high, got {window!r}")
            image_u8 = to_uint8(img, bounds)
        inten = np.array(img if intensities is None else intensities)
        if inten.shape != img.shape:
            raise ValueError(f"intensities have shape {inten.shape} but the image slice has {img.shape}")
        unknown = sorted(set(int(k) for k in masks) - set(self.label_values))
        if unknown:
            raise ValueError(
                f"masks for labels {unknown} given, but the support bank at {self.path} has labels "
                f"{self._labels_text()}"
            )
        mm = {
            int(v): validate_mask(m, img.shape, f"mask of label {v}") for v, m in masks.items()
        }
        for v in self.label_values:
            mm.setdefault(v, np.zeros(img.shape, dtype=bool))
        p = _Prepared(case_id, ax, int(index), sp, image_u8, inten, mm, bounds)  # type: ignore[arg-type]
        self._embed_prepared([p], embedder, self.retrieval_features, None)
        added = self._add_prepared([p], origin, embedder)
        self._warn_blank([p], added)
        return added[0]

    def _check_case(self, case_id: str) -> str:
        if not isinstance(case_id, str) or not case_id.strip():
            raise ValueError(f"case_id must be a non-empty string naming the patient/study, got {case_id!r}")
        return case_id.strip()

    @staticmethod
    def _check_origin(origin: str) -> str:
        if origin not in ORIGINS:
            raise ValueError(f"origin must be one of {ORIGINS}, got {origin!r}")
        return origin

    def _labels_text(self) -> str:
        return ", ".join(f"{lab.value}={lab.name}" for lab in self.labels)

    def _integer_labels(self, array: np.ndarray, case_id: str) -> np.ndarray:
        lab = np.asarray(array)
        if lab.dtype == np.bool_:
            lab = lab.astype(np.uint8)
        elif lab.dtype.kind == "f":
            if not np.isfinite(lab).all() or not np.array_equal(lab, np.round(lab)):
                raise ValueError(
                    f"label map of case {case_id!r} holds non-integer values; it must be a label map "
                    "(0 = background, integers for labels)"
                )
        elif lab.dtype.kind not in "iu":
            raise ValueError(f"label map of case {case_id!r} has dtype {lab.dtype}, expected integers")
        values = set(int(v) for v in np.unique(lab)) - {0}
        unknown = sorted(values - set(self.label_values))
        if unknown:
            shown = ", ".join(str(v) for v in unknown[:8]) + (", ..." if len(unknown) > 8 else "")
            what = f"{len(unknown)} values ({shown})" if len(unknown) > 8 else f"values [{shown}]"
            hint = " (is it an image rather than a label map?)" if len(unknown) > 8 else ""
            raise ValueError(
                f"label map of case {case_id!r} holds {what}{hint} that are not labels of the "
                f"support bank at {self.path} (it has {self._labels_text()}); relabel them to the "
                "bank's values or to 0, or use a bank with those labels"
            )
        return lab

    @staticmethod
    def _embed_prepared(
        prepared: list[_Prepared], embedder: Embedder, features: Sequence[str],
        progress: Callable[[int, int], None] | None,
    ) -> None:
        """Each slice's row of every feature in `features` the slices lack (`features[0]` the bank's
        primary one): every entry of a bank has a row of every feature it holds."""
        todo = [f for f in dict.fromkeys(features) if any(f not in p.features for p in prepared)]
        if not todo:
            return
        for feature, rows in embed_features(embedder, [p.image for p in prepared], todo, progress).items():
            for p, r in zip(prepared, rows):
                p.features[feature] = r

    def _add_prepared(self, prepared: list[_Prepared], origin: str, embedder: Embedder) -> list[BankEntry]:
        identity = embedder.identity
        with self._transaction(f"add {len(prepared)} {origin} slice(s)") as state:
            self.check_models(identity)  # re-check: someone may have re-embedded meanwhile
            # ... or added a feature: its rows are computed now, under the lock (rare, and short)
            primary = _retrieval_feature(state.dinov2)
            self._embed_prepared(prepared, embedder, (primary,) + tuple(state.features), None)
            for p in prepared:
                p.embedding = p.features[primary]
            dim = int(prepared[0].embedding.shape[0])  # type: ignore[union-attr]
            if state.embedding_dim is not None and state.embedding_dim != dim:
                raise BankModelMismatchError(
                    f"support bank at {self.path} holds {state.embedding_dim}-d embeddings but "
                    f"{identity} gives {dim}-d ones: re-embed it with {_reembed_hint(self.path, identity)}"
                )
            taken: set[str] = set()  # ids of this add; the bank's own are looked up in its index
            new_entries: list[BankEntry] = []
            for p in prepared:
                eid = self._new_id(p, taken)
                taken.add(eid)
                data = _npz_bytes(p, state.labels)
                atomic_write_bytes(self.path / ENTRIES_DIR / f"{eid}.npz", data, self.path)  # before any reference
                present = tuple(v for v, m in sorted(p.masks.items()) if m.any())
                new_entries.append(
                    BankEntry(
                        id=eid,
                        case_id=p.case_id,
                        axis=p.axis,
                        index=p.index,
                        spacing=p.spacing,
                        added=_now(),
                        origin=origin,
                        retired=False,
                        retired_by=None,
                        sha256=_sha256(data),
                        shape=(int(p.image.shape[0]), int(p.image.shape[1])),
                        labels_present=present,
                        window=None if p.window is None else (float(p.window[0]), float(p.window[1])),
                    )
                )
            entries = state.entries
            for ne in new_entries:  # newest wins: retire the active entry it replaces
                for n in self._active_with_key(state, ne.key):
                    entries[n] = replace(entries[n], retired=True, retired_by=ne.id)
                entries.append(ne)
            for ne, p in zip(new_entries, prepared):
                state.new_rows[ne.id] = np.asarray(p.embedding, dtype=np.float32)
            if state.embedding_dim is None:
                state.embedding_dim = dim
            for feature in state.features:
                want = _feature_dim(state, feature)
                got = {int(p.features[feature].shape[0]) for p in prepared}
                if got != {want}:
                    raise BankModelMismatchError(
                        f"support bank at {self.path} holds {want}-d {feature} embeddings but {identity} gives "
                        f"{sorted(got)}-d ones: re-embed it with {_reembed_hint(self.path, identity)}")
                state.new_feature_rows[feature] = {ne.id: np.asarray(p.features[feature], dtype=np.float32)
                                                   for ne, p in zip(new_entries, prepared)}
            self._commit(state)
        return new_entries

    def _new_id(self, p: _Prepared, taken: set[str]) -> str:
        while True:
            eid = f"{_sanitise(p.case_id, 40)}-{AXIS_NAMES[p.axis]}{p.index:04d}-{uuid.uuid4().hex[:6]}"
            if eid in taken or (self.path / ENTRIES_DIR / f"{eid}.npz").exists():
                continue
            if self._state.schema == SCHEMA_VERSION:  # the bank's ids: an indexed look-up
                with self._db_mutex:
                    if self._db().execute("SELECT 1 FROM entries WHERE id = ?", (eid,)).fetchone() is None:
                        return eid
            elif all(e.id != eid for e in self._state.entries):
                return eid

    def _active_with_key(self, state: _State, key: tuple[str, int, int]) -> list[int]:
        """Positions of active entries with this (case, axis, index): an indexed query, plus the
        entries appended in this transaction (a scan only for a schema-1 state)."""
        start = len(state.base) if state.base is not None else 0
        found: list[int] = []
        if state.base is not None and state.schema == SCHEMA_VERSION:
            with self._db_mutex:
                found = [int(r[0]) for r in self._db().execute(
                    "SELECT seq FROM entries WHERE case_id = ? AND axis = ? AND idx = ? AND retired = 0", key)]
        else:
            start = 0
        return [n for n in found if state.entries[n].active] + [
            n for n in range(start, len(state.entries)) if state.entries[n].active and state.entries[n].key == key
        ]

    # ---------------------------------------------------------------- retire / restore
    def remove(self, entry_id: str) -> BankEntry:
        """Retire an entry (its file is kept; `restore` brings it back)."""
        with self._transaction(f"retire {entry_id}") as state:
            n, e = self._find(state, entry_id)
            if e.retired:
                return e
            state.entries[n] = replace(e, retired=True, retired_by=RETIRED_BY_USER)
            self._commit(state)
            return state.entries[n]

    def restore(self, entry_id: str) -> BankEntry:
        """Un-retire an entry; the active entry of the same case/axis/index, if any, is retired."""
        with self._transaction(f"restore {entry_id}") as state:
            n, e = self._find(state, entry_id)
            if e.active:
                return e
            for m in self._active_with_key(state, e.key):
                if m != n:
                    state.entries[m] = replace(state.entries[m], retired=True, retired_by=e.id)
            state.entries[n] = replace(e, retired=False, retired_by=None)
            self._commit(state)
            return state.entries[n]


def embed_features(embedder: Embedder, images: Sequence[np.ndarray], features: Sequence[str],
                   progress: Callable[[int, int], None] | None = None) -> dict[str, np.ndarray]:
    """[N, dim] float32 finite rows of each retrieval feature in `features`, from one DINOv2 pass.

    An embedder's own feature comes from `embed`; several need its `embed_features` (SliceEmbedder's:
    every feature from the same tokens), and an embedder without it is refused with what to do.
    """
    features = list(dict.fromkeys(features))
    own = _retrieval_feature(embedder.identity)
    if features == [own]:
        rows = embedder.embed(images, progress=progress) if progress is not None else embedder.embed(images)  # type: ignore[call-arg]
        out = {own: rows}
    else:
        many = getattr(embedder, "embed_features", None)
        if many is None:
            raise BankError(
                f"the support bank holds embeddings of the retrieval features {', '.join(features)}; embedder "
                f"{embedder.identity} computes only {own}, so the new entries cannot get a row of each. Use "
                "RetrievalSeg's DINOv2 embedder (it computes every feature from one pass)")
        out = many(images, features, progress=progress)
    checked: dict[str, np.ndarray] = {}
    for feature in features:
        rows = np.asarray(out.get(feature), dtype=np.float32)
        if rows.ndim != 2 or rows.shape[0] != len(images) or not np.isfinite(rows).all():
            raise ValueError(
                f"embedder {embedder.identity} returned {rows.shape} (finite: {bool(np.isfinite(rows).all())}) "
                f"{feature} rows for {len(images)} slices, expected ({len(images)}, dim) finite values")
        if feature == own and rows.shape[1] != embedder.dim:
            raise ValueError(f"embedder {embedder.identity} returned {rows.shape[1]}-d rows, it says {embedder.dim}")
        checked[feature] = rows
    return checked
