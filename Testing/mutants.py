"""`make mutants`: apply each semantic mutant of Testing/mutants.txt to a copy, run its tests.

A mutant is killed when its tests fail (pytest exit code 1) with the change applied; it survives
when they pass. The run first checks the tests pass on the unmutated copy (else nothing means
anything), and reports, then fails on, any mutant that survived, whose text is missing or
ambiguous in the package, or whose tests errored (collection error, timeout, no test run).

    python Testing/mutants.py [--only NAME,...] [--timeout S] [--list FILE]

A find text is searched in RetrievalSegLib/; one that starts with `PATH::` (a .py file relative to
the repository, e.g. `RetrievalSeg/RetrievalSeg.py::`) is searched in that file only.

Not part of `make test`; about 10 minutes on a 2-core machine. The copy is made with
`git ls-files` (tracked and untracked, not ignored), so the working tree's edits are what is tested.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "RetrievalSegLib"


@dataclass
class Mutant:
    name: str
    find: str
    replace: str
    tests: list[str]
    line: int
    path: str | None = None  # a file outside the package (the `PATH::` prefix), else None


#: `PATH::text`: the text is looked for in that file (relative to the repository) only.
_PATH_PREFIX = re.compile(r"^([\w.-]+(?:/[\w.-]+)*\.py)::")


def _unescape(field: str) -> str:
    out, i = [], 0
    while i < len(field):
        c = field[i]
        if c == "\\" and i + 1 < len(field) and field[i + 1] in "nt\\":
            out.append({"n": "\n", "t": "\t", "\\": "\\"}[field[i + 1]])
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def parse(path: Path) -> list[Mutant]:
    mutants, names = [], set()
    for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        fields = raw.split("\t")
        if len(fields) != 4:
            raise SystemExit(f"{path}:{n}: expected 4 tab-separated fields, got {len(fields)}")
        name, find, replace, tests = fields
        if name in names:
            raise SystemExit(f"{path}:{n}: duplicate mutant name {name!r}")
        names.add(name)
        where = _PATH_PREFIX.match(find)
        if where:
            find = find[where.end():]
        find, replace = _unescape(find), _unescape(replace)
        if not find or find == replace or not tests.split():
            raise SystemExit(f"{path}:{n}: {name}: empty text, no change, or no tests")
        mutants.append(Mutant(name, find, replace, tests.split(), n, where.group(1) if where else None))
    return mutants


def locate(root: Path, m: Mutant) -> tuple[Path | None, str]:
    """The one package file holding `m.find`, or (None, why not)."""
    hits = []
    files = [root / m.path] if m.path else sorted((root / PACKAGE).rglob("*.py"))
    for f in files:
        if not f.is_file():
            continue
        count = f.read_text(encoding="utf-8").count(m.find)
        if count:
            hits.append((f, count))
    if not hits:
        return None, "MISSING: its code no longer exists; replace this mutant"
    if len(hits) > 1 or hits[0][1] > 1:
        where = ", ".join(f"{f.relative_to(root)} x{c}" for f, c in hits)
        return None, f"AMBIGUOUS: found {where}; make the text unique"
    return hits[0][0], ""


def copy_repo(dest: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout.split(b"\0")
    for rel in files:
        if not rel:
            continue
        src = REPO / os.fsdecode(rel)
        if not src.is_file() or src.is_symlink():
            continue
        dst = dest / os.fsdecode(rel)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)


def run_tests(root: Path, tests: list[str], timeout: float) -> tuple[int, float, str]:
    env = dict(os.environ, RSEG_OFFLINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONDONTWRITEBYTECODE="1")
    env.setdefault("RSEG_CACHE_DIR", str(root / ".mutant-cache"))
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "", *tests]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, time.perf_counter() - t0, "timeout"
    tail = (p.stdout + p.stderr).strip().splitlines()
    return p.returncode, time.perf_counter() - t0, tail[-1] if tail else ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--list", type=Path, default=REPO / "Testing" / "mutants.txt")
    ap.add_argument("--only", default="", help="comma-separated mutant names")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per test run")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated run")
    a = ap.parse_args(argv)
    mutants = parse(a.list)
    if a.only:
        wanted = set(a.only.split(","))
        unknown = wanted - {m.name for m in mutants}
        if unknown:
            raise SystemExit(f"unknown mutants: {sorted(unknown)}")
        mutants = [m for m in mutants if m.name in wanted]
    t_start = time.perf_counter()
    rows: list[tuple[str, str, float, str]] = []
    with tempfile.TemporaryDirectory(prefix="rseg-mutants-") as tmp:
        root = Path(tmp)
        copy_repo(root)
        located = [(m, *locate(root, m)) for m in mutants]
        if not a.no_baseline:
            tests = sorted({t for m, f, _ in located if f is not None for t in m.tests})
            rc, secs, tail = run_tests(root, tests, a.timeout * 3)
            print(f"baseline: {len(tests)} test ids on the unmutated copy: exit {rc} in {secs:.0f} s ({tail})",
                  flush=True)
            if rc != 0:
                print("mutants: the tests fail without any mutation; fix them first", file=sys.stderr)
                return 1
        for m, f, why in located:
            if f is None:
                rows.append((m.name, why.split(":")[0], 0.0, why))
                print(f"{m.name}: {why}", flush=True)
                continue
            original = f.read_text(encoding="utf-8")
            f.write_text(original.replace(m.find, m.replace), encoding="utf-8")
            try:
                rc, secs, tail = run_tests(root, m.tests, a.timeout)
            finally:
                f.write_text(original, encoding="utf-8")
            status = {1: "killed", 0: "SURVIVED"}.get(rc, "ERROR")
            rows.append((m.name, status, secs, f"{f.relative_to(root)}: {tail}"))
            print(f"{m.name}: {status} in {secs:.0f} s ({tail})", flush=True)
    width = max(len(r[0]) for r in rows) if rows else 10
    print(f"\n{'mutant':<{width}}  status    seconds")
    for name, status, secs, _ in rows:
        print(f"{name:<{width}}  {status:<8}  {secs:7.0f}")
    killed = sum(r[1] == "killed" for r in rows)
    print(f"\n{killed} of {len(rows)} mutants killed in {time.perf_counter() - t_start:.0f} s")
    return 0 if killed == len(rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
