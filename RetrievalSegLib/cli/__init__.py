"""The rseg command line (python -m RetrievalSegLib.cli) and the demo."""
