"""Applications built on keelgraph, kept out of the library's layers."""

if __name__ != "keelgraph.apps":  # run from the repository root, the folder would import as a second package
    raise ImportError(
        f"import keelgraph.apps, not {__name__}: the apps/ folder is part of the keelgraph package "
        "(install it with `bash .ci/setup` or `pip install -e .`), and a second copy under another "
        "name would define its own classes that keelgraph's code does not catch"
    )
