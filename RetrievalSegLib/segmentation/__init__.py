"""Segmenting a volume: slice planning, retrieval and SAM 2 per slice, the extent stop, suggestions of slices to annotate, provenance of every output."""
