"""The support bank: annotated slices with their embeddings in a SQLite index; add, retire, search, verify, export/import, upgrade, memory-cache folders."""
