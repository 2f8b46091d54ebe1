"""Support bank verify / repair / re-embed: checks every file against bank.json, rebuilds only
what is rebuildable, marks (never drops) damaged entries."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .format import (
    BANK_FILE,
    DB_FILE,
    EMBEDDINGS_FILE,
    SCHEMA_VERSION,
    ENTRIES_DIR,
    INDEX_FILE,
    BankCorruptError,
    BankEntry,
    Embedder,
    EmbedderSource,
    LabelInfo,
    VerifyReport,
    BankModelMismatchError,
    _base_identity,
    _feature_dim,
    _reembed_hint,
    _retrieval_feature,
    _State,
)


def _index_name(state: _State) -> str:
    """The file that lists the bank's entries: bank.db (schema 2) or bank.json (schema 1)."""
    return DB_FILE if state.schema == SCHEMA_VERSION else BANK_FILE
from ..engine.memory_cache import MEMORIES_DIR, memory_cache_name
from .edit import embed_features
from .storage import BankStore
from ..data.fileio import TMP_PREFIX, check_no_links, is_link, read_bytes
from ..data.volume import AXIS_NAMES


class BankVerify(BankStore):
    """Verify, repair and re-embed a bank."""

    # ---------------------------------------------------------------- embeddings
    def _embed_entries(
        self,
        entries: Sequence[BankEntry],
        labels: Sequence[LabelInfo],
        embedder: Embedder,
        progress: Callable[[int, int], None] | None = None,
        batch: int = 64,
    ) -> dict[str, np.ndarray]:
        """Embeddings of readable entries by id (entries marked damaged are skipped)."""
        todo = [e for e in entries if e.damaged is None]
        out: dict[str, np.ndarray] = {}
        for start in range(0, len(todo), batch):
            chunk = todo[start : start + batch]
            images = [self._load(e, labels).image for e in chunk]
            rows = np.asarray(embedder.embed(images), dtype=np.float32)
            if rows.shape != (len(chunk), embedder.dim):
                raise ValueError(f"embedder {embedder.identity} returned shape {rows.shape} for {len(chunk)} slices")
            bad = [e.id for e, r in zip(chunk, rows) if not np.isfinite(r).all()]
            if bad:
                raise ValueError(
                    f"embedder {embedder.identity} returned non-finite values (NaN or Inf) for entries "
                    f"{bad[:5]}{' ...' if len(bad) > 5 else ''}; nothing was written. Check the model "
                    "(weights, device, precision) and retry"
                )
            out.update({e.id: r for e, r in zip(chunk, rows)})
            if progress is not None:
                progress(min(start + batch, len(todo)), len(todo))
        return out

    def _embed_entries_features(
        self,
        entries: Sequence[BankEntry],
        labels: Sequence[LabelInfo],
        embedder: Embedder,
        features: Sequence[str],
        progress: Callable[[int, int], None] | None = None,
        batch: int = 64,
    ) -> dict[str, dict[str, np.ndarray]]:
        """Rows of each of `features` for readable entries, by feature and id (one DINOv2 pass per batch)."""
        todo = [e for e in entries if e.damaged is None]
        out: dict[str, dict[str, np.ndarray]] = {f: {} for f in features}
        for start in range(0, len(todo), batch):
            chunk = todo[start : start + batch]
            rows = embed_features(embedder, [self._load(e, labels).image for e in chunk], features)
            for feature, r in rows.items():
                out[feature].update({e.id: v for e, v in zip(chunk, r)})
            if progress is not None:
                progress(min(start + batch, len(todo)), len(todo))
        return out

    def add_feature(self, embedder: Embedder, progress: Callable[[int, int], None] | None = None) -> bool:
        """Add the embeddings of `embedder`'s retrieval feature beside those the bank holds (`rseg bank
        reembed --retrieval-feature F`); False when the bank holds that feature already (nothing done).

        The feature must come from the bank's own DINOv2 model and input size (another model: `verify
        --reembed`, which replaces them). The slow part runs without the lock; entries added meanwhile
        are embedded under it, and the rows land in one commit with the feature's name.
        """
        feature = _retrieval_feature(embedder.identity)
        snapshot = self._current()
        if self._has_feature(snapshot, embedder):
            return False
        vectors = self._embed_entries(snapshot.entries, snapshot.labels, embedder, progress)
        with self._transaction(f"add retrieval feature {feature} ({embedder.identity})") as state:
            if self._has_feature(state, embedder):
                return False
            new = [e for e in state.entries if e.id not in vectors and e.damaged is None]
            if new:
                vectors.update(self._embed_entries(new, state.labels, embedder))
            dim = int(embedder.dim)
            state.features = tuple(state.features) + (feature,)
            want = _feature_dim(state, feature)
            if want is not None and want != dim:
                raise BankModelMismatchError(
                    f"support bank at {self.path} needs {want}-d {feature} rows, {embedder.identity} gives "
                    f"{dim}-d ones; nothing was changed")
            state.all_feature_rows = {feature: self._rows_for(state, vectors, dim)}
            self._commit(state)
        return True

    def _has_feature(self, state: _State, embedder: Embedder) -> bool:
        """Whether the bank holds `embedder`'s feature; BankModelMismatchError for another DINOv2 model."""
        if _base_identity(embedder.identity) != _base_identity(state.dinov2):
            raise BankModelMismatchError(
                f"support bank at {self.path} was made with {state.dinov2}, the embedder is {embedder.identity}: "
                "a further retrieval feature must come from the same DINOv2 model and input size (one pass "
                f"gives them all). To change the model, re-embed the bank with "
                f"{_reembed_hint(self.path, embedder.identity)} (it replaces the embeddings)")
        return _retrieval_feature(embedder.identity) in (_retrieval_feature(state.dinov2),) + tuple(state.features)

    def _rows_for(self, state: _State, vectors: Mapping[str, np.ndarray], dim: int) -> np.ndarray:
        rows = np.zeros((len(state.entries), dim), dtype=np.float32)  # damaged entries: zero rows
        for n, e in enumerate(state.entries):
            if e.id in vectors:
                rows[n] = vectors[e.id]
        return rows

    def reembed(self, embedder: Embedder, progress: Callable[[int, int], None] | None = None) -> None:
        """Recompute every embedding with `embedder` and adopt its identity."""
        snapshot = self._current()
        # The slow part runs without the lock; entries added meanwhile are embedded under it.
        vectors = self._embed_entries(snapshot.entries, snapshot.labels, embedder, progress)
        with self._transaction() as state:
            self._apply_reembed(state, embedder, vectors)
            self._commit(state)

    def _apply_reembed(self, state: _State, embedder: Embedder, vectors: dict[str, np.ndarray]) -> None:
        """The primary feature becomes `embedder`'s (replaced, as before further features existed); the
        further features stay, recomputed when the DINOv2 model or input size changed (one pass)."""
        new = [e for e in state.entries if e.id not in vectors and e.damaged is None]
        if new:
            vectors.update(self._embed_entries(new, state.labels, embedder))
        keep = tuple(f for f in state.features if f != _retrieval_feature(embedder.identity))
        same_model = _base_identity(embedder.identity) == _base_identity(state.dinov2)
        self._write_embeddings(state, self._rows_for(state, vectors, int(embedder.dim)))
        state.embedding_dim = int(embedder.dim)
        state.dinov2 = embedder.identity
        state.features = keep
        if keep and not same_model:
            rows = self._embed_entries_features(state.entries, state.labels, embedder, keep)
            state.all_feature_rows = {f: self._rows_for(state, rows[f], _feature_dim(state, f) or 0) for f in keep}

    # ---------------------------------------------------------------- verify
    def verify(
        self,
        embedder: EmbedderSource | None = None,
        repair: bool = False,
        reembed: bool = False,
        progress: Callable[[int, int], None] | None = None,
    ) -> VerifyReport:
        """Check every file against bank.json; with `repair`, rebuild what is rebuildable.

        Repair removes temp files, marks damaged entries (never drops them), trims or rebuilds
        embeddings.npy (rebuilding needs `embedder`, or a zero-argument callable that makes one),
        deletes a stale index.faiss and the SAM 2 memory caches. `reembed` re-embeds everything
        with `embedder` (implies repair).
        """
        if reembed:
            repair = True
            if embedder is None:
                raise ValueError("reembed needs an embedder")
        if not repair:
            return self._check(self._current(), embedder if _is_embedder(embedder) else None)
        with self._transaction() as state:
            found = self._check(state, None)
            actions: list[str] = []
            for t in found.temp_files:
                if self._remove_rebuildable(self.path / t):
                    actions.append(f"removed leftover temp file {t}")
            damaged = {e: "missing file" for e in found.missing}
            damaged.update(found.corrupt)
            for n, e in enumerate(state.entries):
                reason = damaged.get(e.id)
                if reason is not None and e.damaged != reason:
                    state.entries[n] = replace(e, damaged=reason)
                    actions.append(f"marked entry {e.id} damaged ({reason}); it is kept but not retrieved")
                elif reason is None and e.damaged is not None:
                    state.entries[n] = replace(e, damaged=None)
                    actions.append(f"entry {e.id} is readable again: cleared its damaged mark")
            kind = self._embeddings_status(state)[1] if state.entries else None
            needs_embedder = False
            if reembed:
                emb = _resolve_embedder(embedder)
                vectors = self._embed_entries(state.entries, state.labels, emb, progress)
                old = state.dinov2
                self._apply_reembed(state, emb, vectors)
                actions.append(f"re-embedded {len(vectors)} entries with {emb.identity} (was {old})")
            elif kind == "extra":
                rows = self._embeddings_status(state)[0]
                self._write_embeddings(state, rows)  # type: ignore[arg-type]
                actions.append(f"trimmed extra rows from {EMBEDDINGS_FILE}")
            elif kind is not None:
                if embedder is None:
                    needs_embedder = True  # reported below as a remaining problem
                else:
                    emb = _resolve_embedder(embedder)
                    self.check_models(emb.identity)
                    primary = _retrieval_feature(state.dinov2)
                    vectors = self._embed_entries_features(state.entries, state.labels, emb, [primary],
                                                           progress)[primary]
                    dim = state.embedding_dim or (len(next(iter(vectors.values()))) if vectors else int(emb.dim))
                    self._write_embeddings(state, self._rows_for(state, vectors, dim))
                    state.embedding_dim = dim
                    actions.append(f"rebuilt {EMBEDDINGS_FILE} from the entry files with {state.dinov2}")
            broken = [f for f in state.features if state.entries and self._feature_rows_status(state, f)[1] is not None]
            if broken and not reembed:
                if embedder is None:
                    needs_embedder = True
                else:
                    emb = _resolve_embedder(embedder)
                    self.check_models(emb.identity)
                    rows = self._embed_entries_features(state.entries, state.labels, emb, broken, progress)
                    state.all_feature_rows = {f: self._rows_for(state, rows[f], _feature_dim(state, f) or 0)
                                              for f in broken}
                    actions += [f"rebuilt the {f} embeddings from the entry files" for f in broken]
            index_file = self.path / INDEX_FILE
            if index_file.exists() and not found.links and (found.index_problem or reembed or kind is not None):
                if self._remove_rebuildable(index_file):
                    actions.append(f"removed stale {INDEX_FILE} (the index is rebuilt in memory)")
            mem = self.path / MEMORIES_DIR
            for name in found.memory_caches:
                if self._remove_rebuildable(mem / name):
                    actions.append(f"deleted SAM 2 memory cache {MEMORIES_DIR}/{name} (rebuilt on next use)")
            state.sam2 = [s for s in state.sam2 if (mem / memory_cache_name(s)).exists()]
            self._commit(state)
            report = self._check(self._current(), embedder if _is_embedder(embedder) else None)
            report.actions = actions
            report.found_before_repair = found.problems + found.notes
            if needs_embedder:
                report.problems.append(
                    f"{EMBEDDINGS_FILE} needs rebuilding and no embedder was given: run "
                    f"`rseg bank verify {self.path} --repair` with the bank's DINOv2 model"
                )
            return report

    @staticmethod
    def _identities(state: _State) -> tuple[str, ...]:
        from .format import _feature_identity

        return (state.dinov2,) + tuple(_feature_identity(state.dinov2, f) for f in state.features)

    def _remove_rebuildable(self, p: Path) -> bool:
        """Delete a temp file, stale index or memory cache folder inside the bank, never via a link.

        Every component from the bank folder down is checked with lstat; a link anywhere on the
        way is left alone (verify reports it). rmtree itself does not follow links inside the
        folder where the platform allows (`shutil.rmtree.avoids_symlink_attacks`).
        """
        try:
            check_no_links(self.path, p)
            st = os.lstat(p)
        except OSError:
            return False
        try:
            if stat.S_ISDIR(st.st_mode):
                shutil.rmtree(p)
            else:
                os.unlink(p)
        except OSError:
            return False
        return True

    def _links(self) -> list[str]:
        """Paths (relative to the bank) of links inside the bank, found with lstat only."""
        found: list[str] = []
        for folder in (self.path, self.path / ENTRIES_DIR, self.path / MEMORIES_DIR):
            if folder != self.path and (is_link(folder) or not folder.is_dir()):
                continue
            try:
                children = sorted(folder.iterdir())
            except OSError:
                continue
            for p in children:
                if is_link(p):
                    found.append(p.relative_to(self.path).as_posix())
                elif folder.name == MEMORIES_DIR and folder != self.path and p.is_dir():
                    with contextlib.suppress(OSError):
                        found += [c.relative_to(self.path).as_posix() for c in sorted(p.iterdir()) if is_link(c)]
        return found

    def _check(self, state: _State, embedder: Embedder | None) -> VerifyReport:
        report = VerifyReport(self.path, entries_checked=len(state.entries))
        report.links = self._links()
        for rel in report.links:
            try:
                target = f" (to {os.readlink(self.path / rel)})"
            except OSError:
                target = ""
            report.problems.append(
                f"{rel} is a link{target}: RetrievalSeg never follows a link inside a bank (nothing "
                "outside it is read, written or deleted through it). Replace the link with the real "
                "file or folder"
            )
        for e in state.entries:
            try:
                self._load(e, state.labels)
                problem = None
            except BankCorruptError as err:
                problem = err
            where = f"entry {e.id} (case {e.case_id}, {AXIS_NAMES[e.axis]}={e.index}, {e.status})"
            if problem is None:
                if e.damaged is not None:
                    report.repairable += 1
                    report.problems.append(
                        f"{where} is marked damaged but its file is fine now: "
                        f"`rseg bank verify {self.path} --repair` clears the mark"
                    )
                continue
            if problem.missing:
                report.missing.append(e.id)
                reason = f"missing {e.file_name}"
            else:
                report.corrupt[e.id] = str(problem)
                reason = str(problem)
            if e.retired:
                report.notes.append(f"retired {where}: {reason}")
            elif e.damaged is not None:
                report.problems.append(
                    f"{where} is damaged ({reason}); it is not retrieved. Restore the file from a "
                    f"backup, or retire it with `rseg bank remove {self.path} {e.id}`"
                )
            else:
                report.repairable += 1  # repair marks it damaged (kept, never retrieved)
                report.problems.append(f"{where}: {reason}")
        _, kind, message = self._embeddings_status(state)
        if kind == "extra":
            report.notes.append(str(message))
        elif kind is not None:
            report.embeddings_problem = message
            report.repairable += 1
            report.problems.append(str(message))
        for feature in state.features if state.schema == SCHEMA_VERSION else ():
            _, fkind, fmessage = self._feature_rows_status(state, feature)
            if fkind is not None:
                report.embeddings_problem = report.embeddings_problem or fmessage
                report.repairable += 1
                report.problems.append(str(fmessage))
        if embedder is not None and embedder.identity not in self._identities(state):
            report.model_problem = (
                f"support bank was made with {state.dinov2}, the given embedder is "
                f"{embedder.identity}: re-embed it with {_reembed_hint(self.path, embedder.identity)}"
            )
            report.problems.append(report.model_problem)
        index_file = self.path / INDEX_FILE
        if index_file.exists() and not is_link(index_file):
            try:
                import faiss

                ntotal = faiss.read_index(str(index_file)).ntotal
                if ntotal != len(state.entries):
                    report.index_problem = (f"{INDEX_FILE} has {ntotal} rows, {_index_name(state)} lists "
                                           f"{len(state.entries)}")
            except Exception as e:  # noqa: BLE001
                report.index_problem = f"{INDEX_FILE} cannot be read ({e})"
            if report.index_problem:
                report.repairable += 0 if report.links else 1  # repair leaves it while a link is inside
                report.problems.append(report.index_problem + "; `verify --repair` removes it")
        ids = {e.id for e in state.entries}
        for folder in (self.path, self.path / ENTRIES_DIR, self.path / MEMORIES_DIR):
            if folder.is_dir() and not is_link(folder):
                for p in sorted(folder.iterdir()):
                    rel = p.relative_to(self.path).as_posix()
                    if p.name.startswith(TMP_PREFIX):
                        report.temp_files.append(rel)
                    elif folder.name == ENTRIES_DIR and p.suffix == ".npz" and p.stem not in ids:
                        report.orphan_files.append(rel)
        if report.temp_files:
            report.notes.append(
                f"{len(report.temp_files)} leftover temp file(s) from interrupted writes (ignored; "
                "verify --repair removes them)"
            )
        if report.orphan_files:
            report.notes.append(
                f"{len(report.orphan_files)} entry file(s) not listed in {_index_name(state)} (from interrupted "
                f"adds; never part of the bank; kept): {', '.join(report.orphan_files[:5])}"
            )
        mem = self.path / MEMORIES_DIR
        if mem.is_dir() and not is_link(mem):
            report.memory_caches = sorted(
                p.name for p in mem.iterdir() if p.is_dir() and not is_link(p) and not p.name.startswith(TMP_PREFIX)
            )
            self._check_memory_files(report)
        return report

    def _check_memory_files(self, report: VerifyReport) -> None:
        """Every cached memory must match its content hash, model identity and entry key."""
        from ..engine.memory_cache import FORMAT_VERSION, _split, inspect_memory_file, sanitize

        mem = self.path / MEMORIES_DIR
        stale = 0
        for name in report.memory_caches:
            folder = mem / name
            try:
                identity = json.loads(read_bytes(folder / "identity.json", self.path)).get("identity")
            except (OSError, ValueError, AttributeError):
                identity = None
            for f in sorted(folder.glob("*.safetensors")):
                if is_link(f):
                    continue  # reported as a link
                rel = f.relative_to(self.path).as_posix()
                try:
                    data = read_bytes(f, self.path)
                    meta = _split(data)[0].get("__metadata__") or {}
                except (OSError, ValueError, UnicodeDecodeError) as e:
                    why: str | None = f"unreadable ({e})"
                else:
                    if meta.get("format") != str(FORMAT_VERSION):
                        stale += 1  # an older RetrievalSeg's file: recomputed on use, never trusted
                        continue
                    why = inspect_memory_file(data, identity)
                    if why is None and sanitize(str(meta.get("key"))) != f.stem:
                        why = f"computed for entry {meta.get('key')!r}, but named {f.name}"
                if why is not None:
                    report.memory_problems.append(rel)
                    report.repairable += 1
                    report.problems.append(
                        f"memory cache file {rel}: {why}; it is not used (segment recomputes it). "
                        f"`rseg bank verify {self.path} --repair` deletes the caches (rebuilt on use)"
                    )
        if stale:
            report.notes.append(
                f"{stale} memory cache file(s) from an older RetrievalSeg without a content hash: "
                "recomputed on use (verify --repair deletes them)"
            )


# ----------------------------------------------------------------------------- helpers
def _is_embedder(obj: Any) -> bool:
    return obj is not None and hasattr(obj, "embed") and hasattr(obj, "identity")


def _resolve_embedder(source: EmbedderSource | None) -> Embedder:
    if source is None:
        raise ValueError("this repair needs an embedder")
    if _is_embedder(source):
        return source  # type: ignore[return-value]
    emb = source()  # type: ignore[operator]
    if not _is_embedder(emb):
        raise TypeError(f"the embedder factory returned {emb!r}, not an embedder")
    return emb
