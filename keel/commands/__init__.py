"""Commands: the `keelgraph` CLI and `keelgraph eval`."""
