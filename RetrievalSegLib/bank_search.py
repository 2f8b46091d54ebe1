"""Support bank search: the nearest usable entries to a query, with case policies."""
from __future__ import annotations

from typing import Any

import numpy as np

from .bank_format import CASE_POLICIES, BankModelMismatchError, _nonfinite_ids, _State, same_subject
from .bank_storage import BankStore


class BankSearch(BankStore):
    """Nearest-neighbour search over the bank's embeddings."""

    # ---------------------------------------------------------------- search
    def search(
        self,
        query_embeddings: np.ndarray,
        k: int,
        case_id: str | None = None,
        case_policy: str = "exclude",
    ) -> list[list[tuple[str, float]]]:
        """Top-k (entry id, cosine) per query over usable entries, with a policy for `case_id`.

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
        state, rows = self._state_and_rows()
        if state.embedding_dim is not None and q.shape[1] != state.embedding_dim:
            raise BankModelMismatchError(
                f"query embeddings have {q.shape[1]} values, the support bank at {self.path} holds "
                f"{state.embedding_dim}-d embeddings from {state.dinov2}; use the same DINOv2 model"
            )
        if not any(e.usable for e in state.entries):
            raise ValueError(
                f"k={k} supports requested but the support bank at {self.path} has no usable "
                f"entries; add annotated slices with `rseg bank add {self.path} IMAGE LABELS --case ID`"
            )
        index, usable, cases = self._index(state, rows)
        if case_id is None:
            in_case = np.zeros(len(usable), dtype=bool)
        elif case_policy == "exclude":  # the whole subject: its other frames/series too
            in_case = np.array([same_subject(c, case_id) for c in cases], dtype=bool)
        else:
            in_case = cases == case_id
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
        results: list[list[tuple[str, float]]] = []
        ids = [e.id for e in (state.entries[i] for i in usable)]
        exclude_case = set(np.flatnonzero(in_case).tolist())
        exclude_other = set(np.flatnonzero(~in_case).tolist())
        for row in q:
            pairs: list[tuple[int, float]] = []
            if case_policy == "prefer" and n_case:
                k1 = min(k, n_case)
                s, i = index.search(row[None], k1, exclude=exclude_other)
                pairs += list(zip(i[0].tolist(), s[0].tolist()))
                if k > k1:
                    s, i = index.search(row[None], k - k1, exclude=exclude_case)
                    pairs += list(zip(i[0].tolist(), s[0].tolist()))
            else:
                excl = exclude_case if case_policy == "exclude" else None
                s, i = index.search(row[None], k, exclude=excl)
                pairs = list(zip(i[0].tolist(), s[0].tolist()))
            results.append([(ids[j], float(sc)) for j, sc in pairs])
        return results

    def _index(self, state: _State, rows: np.ndarray) -> tuple[Any, np.ndarray, np.ndarray]:
        key = (self._key, state.embeddings_sha256)
        if self._index_cache is not None and self._index_cache[0] == key:
            return self._index_cache[1:]  # type: ignore[return-value]
        from .retrieval import InnerProductIndex

        finite = np.isfinite(rows).all(axis=1) if rows.size else np.ones(len(state.entries), dtype=bool)
        usable = np.array([n for n, e in enumerate(state.entries) if e.usable and finite[n]], dtype=np.int64)
        dim = state.embedding_dim or (rows.shape[1] if rows.ndim == 2 else 0)
        index = InnerProductIndex(rows[usable] if len(usable) else np.zeros((0, dim), np.float32))
        cases = np.array([state.entries[n].case_id for n in usable], dtype=object)
        self._index_cache = (key, index, usable, cases)
        return index, usable, cases
