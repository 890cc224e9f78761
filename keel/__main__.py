"""`python -m keelgraph`."""

from keelgraph.cli import main

raise SystemExit(main())
