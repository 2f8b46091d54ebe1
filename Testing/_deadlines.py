"""Deadlines that scale with the machine, so one slow test on a loaded machine fails alone.

A test's wait for a model job is a bound on a hang, not a performance check: on a 2-core machine
with a load average of 10 the same job takes several times longer. `scaled(s)` multiplies by
$RSEG_TEST_TIME_FACTOR when set, else by the load per core (1 on an idle machine, never less).
"""
from __future__ import annotations

import os


def time_factor() -> float:
    """$RSEG_TEST_TIME_FACTOR, else max(1, 1-minute load average / cores)."""
    text = os.environ.get("RSEG_TEST_TIME_FACTOR")
    if text:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"RSEG_TEST_TIME_FACTOR must be a number, got {text!r}") from None
        if not value > 0:
            raise ValueError(f"RSEG_TEST_TIME_FACTOR must be > 0, got {text!r}")
        return value
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average (Windows)
        return 1.0
    return max(1.0, load / (os.cpu_count() or 1))


def scaled(seconds: float) -> float:
    """`seconds` times the machine's time factor (read at each call: the load changes)."""
    return seconds * time_factor()
