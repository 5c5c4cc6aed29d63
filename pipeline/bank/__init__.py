"""The public face of a bank: ``TypedFile`` and what it is made of (handle, catalog, writes,
proxies, building, ``map``, serving)."""
