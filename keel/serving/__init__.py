"""Serving: authentication for LangGraph server, `keelgraph serve`, persistence factories for `langgraph.json`."""
