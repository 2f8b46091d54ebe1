"""Many volumes: the manifest, shards, resume rule, local worker processes or Ray actors."""
