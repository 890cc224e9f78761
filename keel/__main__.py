"""`python -m keelgraph`."""

from keelgraph.commands.cli import main

raise SystemExit(main())
