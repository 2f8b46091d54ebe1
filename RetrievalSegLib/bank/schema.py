"""bank.db is data, never code: connections are hardened and the schema is checked before the first query.

Whoever can write a bank's `bank.db` (a colleague's copy, a shared drive, a download) can store SQL
in it: a trigger runs on our next write, a view named like one of our tables runs on our next read
(an endless recursive one hangs every command), an index or a default on an expression runs
functions. SQLite runs schema SQL when a statement touches it, never when it merely reads the
schema, so the rule is: read `sqlite_master` first and refuse the file unless its objects (type,
name, table, SQL with whitespace normalised) are exactly the ones `db`'s CREATE statements
make, nothing more and nothing less. The expected set is derived by running those same statements
on an empty in-memory database, so a later change to the schema cannot fall out of step with the
check (a changed schema must then bump the schema version: older readers refuse it).

Besides the check, each connection gets SQLite's own advice for untrusted database files
(https://www.sqlite.org/security.html): `PRAGMA trusted_schema = OFF` (schema SQL may only call
innocuous functions), `cell_size_check`, no memory-mapped I/O, and smaller limits (a string or
blob over 16 MiB, or an attached database, is an error, not a read); with Python >= 3.12 also
`SQLITE_DBCONFIG_DEFENSIVE` on and triggers and views off for the connection (`setconfig`).
None of these read the schema or the data, so nothing in the file can act before the check.
"""
from __future__ import annotations

import contextlib
import re
import sqlite3
from functools import lru_cache
from pathlib import Path
from typing import Iterator

from .format import BankCorruptError

#: Largest string or blob a bank connection reads: embedding rows are a few KiB, names shorter.
MAX_VALUE_BYTES = 16 * 2**20
_LIMITS = (("SQLITE_LIMIT_LENGTH", MAX_VALUE_BYTES), ("SQLITE_LIMIT_SQL_LENGTH", 100_000),
           ("SQLITE_LIMIT_COLUMN", 100), ("SQLITE_LIMIT_EXPR_DEPTH", 100), ("SQLITE_LIMIT_ATTACHED", 0),
           ("SQLITE_LIMIT_TRIGGER_DEPTH", 1))
#: Python >= 3.12 (`Connection.setconfig`): switched off for bank connections (the project uses none).
_CONFIG_OFF = ("SQLITE_DBCONFIG_ENABLE_TRIGGER", "SQLITE_DBCONFIG_ENABLE_VIEW", "SQLITE_DBCONFIG_TRUSTED_SCHEMA")
_SPACE = re.compile(r"\s+")


class BankConnection(sqlite3.Connection):
    """A connection to bank.db that remembers which schema it checked (`PRAGMA schema_version`)."""

    checked_cookie: int | None = None
    path: Path | None = None


def harden(con: sqlite3.Connection) -> None:
    """Settings that keep a hostile schema inert; none of them reads the database file."""
    con.execute("PRAGMA trusted_schema = OFF")
    con.execute("PRAGMA cell_size_check = ON")
    con.execute("PRAGMA mmap_size = 0")
    if hasattr(con, "setlimit"):  # Python >= 3.11
        for name, value in _LIMITS:
            category = getattr(sqlite3, name, None)
            if category is not None:
                con.setlimit(category, value)
    setconfig = getattr(con, "setconfig", None)  # Python >= 3.12
    if setconfig is not None:
        defensive = getattr(sqlite3, "SQLITE_DBCONFIG_DEFENSIVE", None)
        if defensive is not None:
            setconfig(defensive, True)
        for name in _CONFIG_OFF:
            op = getattr(sqlite3, name, None)
            if op is not None:
                setconfig(op, False)


def _normalised(sql: str | None) -> str | None:
    return None if sql is None else _SPACE.sub(" ", sql).strip()


def _objects(con: sqlite3.Connection) -> frozenset[tuple[str, str, str, str | None]]:
    rows = con.execute("SELECT type, name, tbl_name, sql FROM sqlite_master").fetchall()
    return frozenset((str(t), str(n), str(tb), _normalised(s)) for t, n, tb, s in rows)


@lru_cache(maxsize=4)
def expected_objects(schema_sql: str) -> frozenset[tuple[str, str, str, str | None]]:
    """(type, name, table, normalised SQL) of every object `schema_sql` creates (SQLite's own view)."""
    con = sqlite3.connect(":memory:")
    try:
        con.executescript(schema_sql)
        return _objects(con)
    finally:
        con.close()


def check_schema(con: sqlite3.Connection, f: Path, schema_sql: str | tuple[str, ...]) -> None:
    """Refuse (BankCorruptError naming `f` and each difference) a schema other than `schema_sql`'s.

    A tuple lists the schemas a bank may have (exactly one of them, object for object): db's
    tables, and the same plus the table made when a bank first holds a further retrieval feature.
    """
    found = _objects(con)
    options = (schema_sql,) if isinstance(schema_sql, str) else tuple(schema_sql)
    wants = [expected_objects(sql) for sql in options]
    if any(found == want for want in wants):
        return
    names = {(t, n) for t, n, _, _ in found}  # differences are named against the closest schema
    want = max(wants, key=lambda w: (len(names & {(t, n) for t, n, _, _ in w}), -len(w)))
    wanted = {(t, n) for t, n, _, _ in want}
    seen = {(t, n) for t, n, _, _ in found}
    what = [f"{t} {n!r} is defined differently from RetrievalSeg's ({sql or 'no SQL'})" if (t, n) in wanted
            else f"an extra {t} {n!r} ({sql or 'no SQL'})"
            for t, n, _, sql in sorted(found - want)]
    what += [f"no {t} {n!r}" for t, n, _, _ in sorted(want - found) if (t, n) not in seen]
    shown = "; ".join(w if len(w) < 300 else w[:300] + "...)" for w in what[:5])
    more = f" and {len(what) - 5} more" if len(what) > 5 else ""
    raise BankCorruptError(
        f"{f} is not a support bank index as RetrievalSeg writes it: {shown}{more}. A bank.db may hold "
        "only RetrievalSeg's own tables and indexes (SQL stored in the file could run when the bank is "
        "used), so it is not opened. Restore it from a backup or import an export of the bank (the entry "
        "files in entries/ are not affected)",
        f,
    )


def ensure_checked(con: sqlite3.Connection, f: Path, schema_sql: str | tuple[str, ...]) -> None:
    """Check the schema unless this connection already checked this very schema (cheap: one pragma).

    Call it inside the transaction whose statements it protects: then the schema cannot change
    between the check and them (for a writer, BEGIN IMMEDIATE holds the write lock).
    """
    cookie = con.execute("PRAGMA schema_version").fetchone()[0]
    if getattr(con, "checked_cookie", None) == cookie:
        return
    check_schema(con, f, schema_sql)
    if isinstance(con, BankConnection):
        con.checked_cookie = cookie


@contextlib.contextmanager
def checked_read(con: sqlite3.Connection, f: Path, schema_sql: str | tuple[str, ...]) -> Iterator[None]:
    """One read transaction whose schema is checked first (or the caller's transaction, checked)."""
    if con.in_transaction:
        ensure_checked(con, f, schema_sql)
        yield
        return
    con.execute("BEGIN")
    try:
        ensure_checked(con, f, schema_sql)
        yield
    finally:
        con.execute("COMMIT")
