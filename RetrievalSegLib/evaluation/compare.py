"""`rseg evaluate --compare`: every combination of some settings on the same cases and bank, and
paired statistics of each against the reference configuration.

- A configuration is one value per compared option (argparse dest -> value); the reference is the
  command's own values (the defaults unless given), always run, first, in OUT itself (a plain
  `rseg evaluate` folder); each other configuration runs in `OUT/compare/<slug>/`. Every folder
  keeps evaluate's per-case records, so `--resume` works per configuration and case.
- `compare.csv` / `compare.json` in OUT: per case, label and configuration Dice and HD95; per
  configuration and label mean, sample sd (ddof=1) and median; per non-reference configuration and
  label the **paired** differences (configuration - reference, over the cases both scored) with a
  95% percentile bootstrap CI of their mean (`BOOTSTRAP_RESAMPLES` resamples of the cases, fixed
  seed) and the two-sided Wilcoxon signed-rank p-value (`scipy.stats.wilcoxon`), with n and a note
  when n is too small to conclude. Random-weight results are marked in both files.
- Sharing: the caller builds the models once per model identity; `MemoEmbedder` makes the DINOv2
  pass over a case's slices happen once per embedder, giving every compared retrieval feature in
  that one pass (`embed_features`; the bank gets the compared features' embeddings the same way),
  and one engine keeps one SAM 2 memory cache for every configuration that shares it.
"""
from __future__ import annotations

import hashlib
import itertools
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

COMPARE_FORMAT = "rseg-evaluate-compare"
COMPARE_DIR = "compare"
BOOTSTRAP_RESAMPLES = 10000
BOOTSTRAP_SEED = 0
CI_LEVEL = 0.95
#: Below this many pairs the two-sided Wilcoxon signed-rank test cannot reach p < 0.05 (its smallest
#: exact p-value is 2 / 2^n: 0.0625 at n = 5).
MIN_PAIRS = 6
METRICS = (("dice", "dice"), ("hd95_mm", "hd95"))
CSV_FIELDS = ["configuration", "reference", "case", "label", "name", "dice", "hd95_mm", "hd95_undefined",
              "random_weights"]


def _plain(v: Any) -> Any:
    """A JSON value for an option's value (paths and other objects as text)."""
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    return str(v)


@dataclass(frozen=True)
class Configuration:
    """One combination of the compared options' values."""

    values: tuple[tuple[str, Any], ...]  # (argparse dest, value), in the order of --compare
    reference: bool

    @property
    def name(self) -> str:
        return ", ".join(f"{d.replace('_', '-')}={_plain(v)}" for d, v in self.values)

    @property
    def folder(self) -> str:
        """OUT-relative folder of its results: '.' for the reference, else compare/<slug>."""
        if self.reference:
            return "."
        slug = "_".join(f"{d}-{_plain(v)}" for d, v in self.values)
        return f"{COMPARE_DIR}/{re.sub(r'[^A-Za-z0-9._+-]', '-', slug)}"


def configurations(grid: Sequence[tuple[str, Sequence[Any]]], reference: dict[str, Any]) -> list[Configuration]:
    """Every combination of `grid`'s values; the reference (`reference`'s values) first, added if absent."""
    dests = [d for d, _ in grid]
    ref = tuple((d, reference[d]) for d in dests)
    out = [Configuration(ref, True)]
    for combo in itertools.product(*[list(dict.fromkeys(vals)) for _, vals in grid]):
        values = tuple(zip(dests, combo))
        if values != ref:
            out.append(Configuration(values, False))
    return out


# ----------------------------------------------------------------------------- statistics
def describe(values: Sequence[float]) -> dict[str, Any]:
    """n, mean, sample sd (ddof=1; null below 2 values) and median."""
    a = np.asarray(values, dtype=float)
    n = int(a.size)
    return {"n": n, "mean": float(a.mean()) if n else None,
            "sd": float(a.std(ddof=1)) if n > 1 else None,
            "median": float(np.median(a)) if n else None}


def bootstrap_ci(diffs: Sequence[float], *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                 level: float = CI_LEVEL) -> tuple[float, float] | None:
    """Percentile bootstrap CI of the mean of paired differences (cases resampled with replacement)."""
    d = np.asarray(diffs, dtype=float)
    if d.size < 2:
        return None
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(resamples, d.size))].mean(axis=1)
    lo, hi = np.percentile(means, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(lo), float(hi)


def wilcoxon_p(diffs: Sequence[float]) -> float | None:
    """Two-sided Wilcoxon signed-rank p-value of paired differences (scipy); None if all are 0 or none."""
    from scipy.stats import wilcoxon

    d = np.asarray(diffs, dtype=float)
    if d.size == 0 or not np.any(d != 0):
        return None
    return float(wilcoxon(d, alternative="two-sided").pvalue)


def paired(reference: dict[str, float | None], other: dict[str, float | None]) -> dict[str, Any]:
    """Paired differences (other - reference) over the cases where both have a value."""
    cases = [c for c in reference if c in other and reference[c] is not None and other[c] is not None]
    d = np.array([float(other[c]) - float(reference[c]) for c in cases], dtype=float)
    ci = bootstrap_ci(d)
    p = wilcoxon_p(d)
    s: dict[str, Any] = {"n": len(cases), "unpaired_cases": len(set(reference) | set(other)) - len(cases),
                         "mean_difference": float(d.mean()) if d.size else None,
                         "median_difference": float(np.median(d)) if d.size else None,
                         "ci95_low": None if ci is None else ci[0], "ci95_high": None if ci is None else ci[1],
                         "wilcoxon_p": p}
    notes = []
    if len(cases) < MIN_PAIRS:
        notes.append(f"n={len(cases)} < {MIN_PAIRS} paired cases: too few to conclude anything (the Wilcoxon "
                     f"test cannot reach p < 0.05 below {MIN_PAIRS} pairs)")
    if ci is None:
        s["ci95_undefined"] = "fewer than 2 paired cases"
    if p is None:
        s["wilcoxon_p_undefined"] = "no paired cases" if not len(cases) else "every difference is 0"
    if notes:
        s["note"] = "; ".join(notes)
    return s


# ----------------------------------------------------------------------------- the document
def _by_case(rows: Sequence[dict[str, Any]], label: int, field: str) -> dict[str, float | None]:
    return {r["case"]: r.get(field) for r in rows if int(r["label"]) == label}


def compare_doc(configs: Sequence[Configuration], results: dict[str, dict[str, Any]], *,
                complete: bool) -> dict[str, Any]:
    """compare.json's content from each configuration's evaluate result (keyed by configuration name)."""
    ref = configs[0]
    assert ref.reference
    random_weights = any(bool(r.get("random_weights")) for r in results.values())
    labels: dict[str, str] = {}
    for r in results.values():
        labels.update(r.get("labels") or {})
    rows = []
    for c in configs:
        for r in (results.get(c.name) or {}).get("rows", []):
            rows.append({"configuration": c.name, "reference": c.reference, "case": r["case"],
                         "label": int(r["label"]), "name": r["name"], "dice": r["dice"], "hd95_mm": r["hd95_mm"],
                         "hd95_undefined": r.get("hd95_undefined"), "random_weights": bool(r.get("random_weights"))})
    summary: dict[str, Any] = {}
    differences: dict[str, Any] = {}
    ref_rows = (results.get(ref.name) or {}).get("rows", [])
    for c in configs:
        mine = (results.get(c.name) or {}).get("rows", [])
        if c.name not in results:
            continue
        summary[c.name] = {name: {key: describe([r[field] for r in mine if int(r["label"]) == int(v)
                                                  and r.get(field) is not None])
                                  for field, key in METRICS}
                           for v, name in labels.items()}
        if not c.reference and ref.name in results:
            differences[c.name] = {name: {key: paired(_by_case(ref_rows, int(v), field), _by_case(mine, int(v), field))
                                          for field, key in METRICS}
                                   for v, name in labels.items()}
    doc = {
        "format": COMPARE_FORMAT, "complete": complete, "random_weights": random_weights,
        "reference": ref.name,
        "options": [d.replace("_", "-") for d, _ in ref.values],
        "configurations": [{"name": c.name, "reference": c.reference, "folder": c.folder,
                            "values": {d.replace("_", "-"): _plain(v) for d, v in c.values},
                            "finished": c.name in results and bool(results[c.name].get("complete"))}
                           for c in configs],
        "labels": labels,
        "cases": list(dict.fromkeys(r["case"] for r in ref_rows)),
        "statistics": {"differences": "configuration - reference, per case, over the cases both scored",
                       "ci95": f"percentile bootstrap of the mean difference, {BOOTSTRAP_RESAMPLES} resamples of "
                               f"the cases, seed {BOOTSTRAP_SEED}",
                       "wilcoxon": "scipy.stats.wilcoxon, two-sided, zero differences dropped (zero_method 'wilcox')",
                       "sd": "sample standard deviation (ddof=1)"},
        "summary": summary, "differences": differences, "rows": rows,
    }
    if random_weights:
        doc["warning"] = ("RANDOM WEIGHTS: these results come from models with random weights (--random-weights); "
                          "they are meaningless as a measure of RetrievalSeg")
    return doc


def write_compare(out: Path, doc: dict[str, Any]) -> None:
    """compare.csv and compare.json in `out`, each written atomically."""
    from .evaluate import write_table

    write_table(out, "compare", CSV_FIELDS, doc)


def _f(x: Any, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def format_compare(doc: dict[str, Any]) -> str:
    """The printed table: per configuration and label mean Dice; differences with CI and p."""
    lines = [doc["warning"]] if doc.get("warning") else []
    lines.append(f"reference: {doc['reference']}")
    lines.append(f"{'configuration':<32} {'label':<10} {'Dice mean':>9} {'dDice':>8} {'95% CI':>19} {'p':>7} "
                 f"{'dHD95':>8} {'p':>7} {'n':>3}")
    for c in doc["configurations"]:
        for name, s in (doc["summary"].get(c["name"]) or {}).items():
            d = (doc["differences"].get(c["name"]) or {}).get(name)
            if d is None:
                tail = f"{'(reference)':>8}"
            else:
                dd, dh = d["dice"], d["hd95"]
                ci = f"[{_f(dd['ci95_low'], '+.3f')}, {_f(dd['ci95_high'], '+.3f')}]"
                tail = (f"{_f(dd['mean_difference'], '+.4f'):>8} {ci:>19} {_f(dd['wilcoxon_p'], '.3f'):>7} "
                        f"{_f(dh['mean_difference'], '+.2f'):>8} {_f(dh['wilcoxon_p'], '.3f'):>7} {dd['n']:>3}")
            lines.append(f"{c['name'][:32]:<32} {name[:10]:<10} {_f(s['dice']['mean'], '.4f'):>9} {tail}")
    notes = sorted({d["dice"]["note"] for per in doc["differences"].values() for d in per.values()
                    if d["dice"].get("note")})
    lines += [f"note: {n}" for n in notes]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- running
class MemoEmbedder:
    """A slice embedder that embeds the same slices once: every configuration sharing it reuses
    the DINOv2 pass over a case (the slices and their window do not change between configurations).

    With `features` (`--compare retrieval-feature=...`), that one pass gives every compared retrieval
    feature (`embed_features`), and `for_feature(f)` is the embedder of feature f over the same memo."""

    def __init__(self, inner, features: Sequence[str] = ()) -> None:
        from ..bank.format import _retrieval_feature

        self.inner = inner
        self.feature = _retrieval_feature(inner.identity)
        self.features = list(dict.fromkeys([self.feature, *features]))
        self._memo: dict[str, dict[str, np.ndarray]] = {}
        self.passes = 0

    def __getattr__(self, name: str) -> Any:  # identity, dim, ...: the wrapped embedder's
        return getattr(self.inner, name)

    def rows(self, images: Sequence[np.ndarray], feature: str, *args: Any, **kwargs: Any) -> np.ndarray:
        """`feature`'s rows of `images` (a copy), from the memo or from one pass for every feature."""
        if feature not in self.features:
            raise ValueError(f"retrieval feature {feature!r} is not one of this comparison's {self.features}")
        h = hashlib.sha256(repr((args, sorted(kwargs.items()))).encode())
        for im in images:
            a = np.ascontiguousarray(im)
            h.update(f"{a.dtype}{a.shape}".encode())
            h.update(a.tobytes())
        key = h.hexdigest()
        if key not in self._memo:
            self.passes += 1
            if len(self.features) == 1:
                self._memo[key] = {self.feature: np.asarray(self.inner.embed(images, *args, **kwargs))}
            else:
                out = self.inner.embed_features(images, self.features, *args, **kwargs)
                self._memo[key] = {f: np.asarray(out[f]) for f in self.features}
        return self._memo[key][feature].copy()

    def embed(self, images: Sequence[np.ndarray], *args: Any, **kwargs: Any) -> np.ndarray:
        return self.rows(images, self.feature, *args, **kwargs)

    def for_feature(self, feature: str) -> Any:
        """The embedder of `feature` (itself for its own), sharing this memo and its one pass."""
        return self if feature == self.feature else _FeatureView(self, feature)


class _FeatureView:
    """`MemoEmbedder.for_feature`: identity, dim and embed of one compared retrieval feature."""

    def __init__(self, memo: MemoEmbedder, feature: str) -> None:
        from ..bank.format import feature_dim

        if feature not in memo.features:
            raise ValueError(f"retrieval feature {feature!r} is not one of this comparison's {memo.features}")
        self.memo, self.feature = memo, feature
        self.identity = memo.inner.identity_of(feature)
        self.dim = feature_dim(memo.inner.dim, memo.feature, feature)

    def embed(self, images: Sequence[np.ndarray], *args: Any, **kwargs: Any) -> np.ndarray:
        return self.memo.rows(images, self.feature, *args, **kwargs)

    def embed_features(self, images: Sequence[np.ndarray], features: Sequence[str], *args: Any,
                       **kwargs: Any) -> dict[str, np.ndarray]:
        return {f: self.memo.rows(images, f, *args, **kwargs) for f in features}


def run_compare(configs: Sequence[Configuration], run_one: Callable[[Configuration, Path, str], dict[str, Any]],
                out: Path) -> dict[str, Any]:
    """Run every configuration (reference first) with `run_one(config, folder, progress label)`;
    compare.csv / compare.json are rewritten after each configuration and at the end."""
    out = Path(out)
    results: dict[str, dict[str, Any]] = {}
    for n, c in enumerate(configs):
        folder = out if c.reference else out / c.folder
        results[c.name] = run_one(c, folder, f"config {n + 1}/{len(configs)} ({c.name}) ")
        write_compare(out, compare_doc(configs, results, complete=False))
    doc = compare_doc(configs, results, complete=True)
    write_compare(out, doc)
    return doc
