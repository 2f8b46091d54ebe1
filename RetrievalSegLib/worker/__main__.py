"""python -m RetrievalSegLib.worker: runs RetrievalSegLib.worker.server.main."""
from .server import main

raise SystemExit(main())
