"""The model worker process (python -m RetrievalSegLib.worker), its client and protocol."""
