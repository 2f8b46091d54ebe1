"""Support bank search: the nearest usable entries to a query, with case policies."""
from __future__ import annotations

import numpy as np

from .format import CASE_POLICIES, SUBJECT_SEPARATORS, BankModelMismatchError, _nonfinite_ids, _State
from .storage import BankStore


class BankSearch(BankStore):
    """Nearest-neighbour search over the bank's embeddings."""

    # ---------------------------------------------------------------- search
    def search(
        self,
        query_embeddings: np.ndarray,
        k: int,
        case_id: str | None = None,
        case_policy: str = "exclude",
        embedder_identity: str | None = None,
    ) -> list[list[tuple[str, float]]]:
        """Top-k (entry id, cosine) per query over usable entries, with a policy for `case_id`.

        `embedder_identity` (the query embeddings' embedder) picks the stored retrieval feature to
        search: the primary one when None; BankModelMismatchError when the bank holds none of it.

        "exclude": never return entries of the subject `case_id` names (honest evaluation):
        entries whose case id is `case_id` or shares it as a prefix up to a separator
        (`same_subject`: `patient005` excludes `patient005_frame01` and the reverse, not
        `patient0050`); "prefer": entries of exactly `case_id` first (by score), then the others;
        "ignore": plain top-k.
        """
        if case_policy not in CASE_POLICIES:
            raise ValueError(f"case_policy must be one of {CASE_POLICIES}, got {case_policy!r}")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        q = np.atleast_2d(np.asarray(query_embeddings, dtype=np.float32))
        if q.ndim != 2 or not np.isfinite(q).all():
            raise ValueError(f"query embeddings must be finite [Q, dim], got shape {q.shape}")
        state, rows = self._state_and_rows(embedder_identity)
        dim = state.embedding_dim if self._stored_feature(state, embedder_identity) is None else rows.shape[1]
        if state.embedding_dim is not None and q.shape[1] != dim:
            raise BankModelMismatchError(
                f"query embeddings have {q.shape[1]} values, the support bank at {self.path} holds "
                f"{dim}-d embeddings from {embedder_identity or state.dinov2}; use the same DINOv2 model"
            )
        ix = self._index(state, rows, embedder_identity)
        if not len(ix.usable) and not any(e.usable for e in state.entries):
            raise ValueError(
                f"k={k} supports requested but the support bank at {self.path} has no usable "
                f"entries; add annotated slices with `rseg bank add {self.path} IMAGE LABELS --case ID`"
            )
        in_case, n_case = self._check_available(state, rows, ix, k, case_id, case_policy)
        q = np.ascontiguousarray(q)
        if case_policy == "prefer" and n_case:
            k1 = min(k, n_case)
            s, i = ix.search(q, k1, keep=in_case)
            if k > k1:
                s2, i2 = ix.search(q, k - k1, keep=~in_case)
                s, i = np.concatenate([s, s2], axis=1), np.concatenate([i, i2], axis=1)
        else:
            s, i = ix.search(q, k, keep=~in_case if case_policy == "exclude" and n_case else None)
        ids = ix.ids
        return [[(ids[j], float(sc)) for j, sc in zip(ri.tolist(), rs.tolist())] for rs, ri in zip(s, i)]

    def check_k(self, k: int, case_id: str | None = None, case_policy: str = "exclude") -> None:
        """ValueError unless `search` can return k supports under this case policy (checked before
        any model loads, so that `rseg segment --k` larger than the bank is a usage error)."""
        if case_policy not in CASE_POLICIES:
            raise ValueError(f"case_policy must be one of {CASE_POLICIES}, got {case_policy!r}")
        state, rows = self._state_and_rows()
        self._check_available(state, rows, self._index(state, rows), k, case_id, case_policy)

    def _check_available(self, state: _State, rows: np.ndarray, ix: "_RevisionIndex", k: int,
                         case_id: str | None, case_policy: str) -> tuple[np.ndarray, int]:
        """The case mask and its size; ValueError saying why when fewer than k entries are usable."""
        usable = ix.usable
        in_case = ix.case_mask(case_id, case_policy)
        n_case = int(in_case.sum())
        available = len(usable) - (n_case if case_policy == "exclude" else 0)
        if k > available:
            retired = sum(1 for e in state.entries if e.retired)
            damaged = sum(1 for e in state.entries if e.active and e.damaged is not None)
            nonfinite = sum(1 for i in _nonfinite_ids(state, rows) if not self._find(state, i)[1].retired)
            why = []
            if case_policy == "exclude" and n_case:
                why.append(f"{n_case} of case {case_id!r} excluded")
            if retired:
                why.append(f"{retired} retired")
            if damaged:
                why.append(f"{damaged} damaged")
            if nonfinite:
                why.append(
                    f"{nonfinite} with non-finite embeddings: `rseg bank verify {self.path} --repair` recomputes them"
                )
            raise ValueError(
                f"k={k} supports requested but the support bank at {self.path} has only "
                f"{available} usable entries" + (f" ({', '.join(why)})" if why else "")
                + "; lower k or add annotated slices"
            )
        return in_case, n_case

    def _index(self, state: _State, rows: np.ndarray, identity: str | None = None) -> "_RevisionIndex":
        """The faiss index and case tables of this revision and feature (built once per revision)."""
        key = (self._key, state.embeddings_sha256, self._stored_feature(state, identity))
        cache = self._index_cache if isinstance(self._index_cache, dict) else {}
        if cache.get("key") == key[:2] and key[2] in cache:
            return cache[key[2]]  # type: ignore[no-any-return]
        ix = _RevisionIndex(state, rows)
        if cache.get("key") != key[:2]:
            cache = {"key": key[:2]}
        cache[key[2]] = ix
        self._index_cache = cache
        return ix


class _RevisionIndex:
    """Exact inner-product index over the usable entries of one bank revision, with the case
    tables that turn a case policy into a mask without a per-entry Python loop: each usable
    entry carries the code of its case id; a query's subject is matched against the sorted
    unique case ids (bisect on `subject + separator` prefixes, and the query's own prefixes cut
    at a separator), and the mask is `np.isin(codes, matched)`. Exclusion is a faiss
    `IDSelectorBitmap`, so excluded entries are never scored, let alone returned."""

    def __init__(self, state: _State, rows: np.ndarray) -> None:
        import faiss

        finite = np.isfinite(rows).all(axis=1) if rows.size else np.ones(len(state.entries), dtype=bool)
        self.usable = np.array([n for n, e in enumerate(state.entries) if e.usable and finite[n]], dtype=np.int64)
        # the rows' own width: a further feature's may differ from the primary's (cls+mean is twice as wide)
        dim = rows.shape[1] if rows.ndim == 2 and rows.shape[1] else (state.embedding_dim or 0)
        self.index = faiss.IndexFlatIP(dim)
        if len(self.usable):
            self.index.add(np.ascontiguousarray(rows[self.usable], dtype=np.float32))
        self.ids = [state.entries[n].id for n in self.usable]
        cases = [state.entries[n].case_id for n in self.usable]
        self.sorted_cases = sorted(set(cases))
        self.code_of = {c: i for i, c in enumerate(self.sorted_cases)}
        self.codes = np.array([self.code_of[c] for c in cases], dtype=np.int64)
        self._masks: dict[tuple[str, bool], np.ndarray] = {}

    def subject_codes(self, subject: str) -> list[int]:
        """Codes of the case ids `same_subject` matches with `subject` (bisect, no scan)."""
        import bisect

        found = {self.code_of[subject]} if subject in self.code_of else set()
        for sep in SUBJECT_SEPARATORS:  # longer ids: subject + separator + anything
            prefix = subject + sep
            lo = bisect.bisect_left(self.sorted_cases, prefix)
            hi = bisect.bisect_left(self.sorted_cases, prefix + "\U0010ffff")
            found.update(self.code_of[c] for c in self.sorted_cases[lo:hi])
        for n, ch in enumerate(subject):  # shorter ids: subject cut before a separator
            if n and ch in SUBJECT_SEPARATORS and subject[:n] in self.code_of:
                found.add(self.code_of[subject[:n]])
        return sorted(found)

    def case_mask(self, case_id: str | None, policy: str) -> np.ndarray:
        """Usable entries of `case_id`: its whole subject for "exclude", the exact id otherwise."""
        if case_id is None or policy == "ignore":
            return np.zeros(len(self.usable), dtype=bool)
        key = (str(case_id), policy == "exclude")
        mask = self._masks.get(key)
        if mask is None:
            if policy == "exclude":
                matched = self.subject_codes(str(case_id))
            else:
                matched = [self.code_of[case_id]] if case_id in self.code_of else []
            mask = np.isin(self.codes, np.array(matched, dtype=np.int64))
            mask.setflags(write=False)
            if len(self._masks) > 256:
                self._masks.clear()
            self._masks[key] = mask
        return mask

    def search(self, q: np.ndarray, k: int, keep: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, positions) [Q, k], best first, among the entries `keep` marks (all if None)."""
        import faiss

        if keep is None:
            return self.index.search(q, k)
        bitmap = np.packbits(keep, bitorder="little")
        params = faiss.SearchParameters(sel=faiss.IDSelectorBitmap(len(keep), faiss.swig_ptr(bitmap)))
        return self.index.search(q, k, params=params)
