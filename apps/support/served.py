"""Graphs as LangGraph server loads them (see langgraph.json): compiled without a checkpointer."""

from keelgraph.apps.support.desk import make_graph

support = make_graph(checkpointer=None)
"""The order-support assistant; the server supplies persistence. It acts for the signed-in user's
customer (`customer_lookup`: a `customer_id` claim in the token, else the shop's `customer_users`
table, see `link_user`); pass `customer_of=` to map your users another way."""
