"""The paper's evaluation protocol: study folders, per-case Dice and HD95, summaries."""
