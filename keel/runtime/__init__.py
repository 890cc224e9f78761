"""The model runtime: chat model factory, failover chain, response cache and observability."""
