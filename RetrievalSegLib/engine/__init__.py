"""Per-slice model work: preprocessing, DINOv2 retrieval features, SAM 2 support memories and the memory-conditioned query (the fidelity-critical code), the memory cache."""
