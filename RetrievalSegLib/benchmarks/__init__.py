"""make bench, bench-volume, bench-bank, bench-cohort, bench-report."""
