"""python -m RetrievalSegLib.cli: runs RetrievalSegLib.cli.main.main."""
from .main import main

raise SystemExit(main())
