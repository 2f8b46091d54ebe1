"""Pictures of a run: `rseg report RESULT` (and `--report` on segment, evaluate, segment-cohort).

A report is one self-contained `report.html` (images embedded, no network) plus the PNGs it
shows, made only from what a run wrote: label maps and their provenance sidecars, metrics files,
cohort summaries, and the support bank for the support thumbnails. No model runs.

Modules: `runs` reads a run's files; `palette` (colour-blind-safe colours), `overlay` (slice
pictures at their physical aspect) and `plots` (matplotlib, Agg canvas) draw; `segment_page`,
`evaluate_page`, `cohort_page` build each kind's page; `page` renders the packaged Jinja2
template (autoescaped) and writes the files; `write` puts it together; `cli` is the command;
`bench` times it (`make bench-report`).
"""
