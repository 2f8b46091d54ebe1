"""python -m RetrievalSegLib.worker: runs RetrievalSegLib.worker.server.server."""
from .server import main

raise SystemExit(main())
