"""The order-support desk: keelgraph's main job, served by `langgraph.json` and run by `keelgraph demo`."""
