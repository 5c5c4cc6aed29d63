"""Opening bank files: local and remote (fsspec), which file a handle holds, fork safety, and the per-process cache of read handles with the picklable recipes (LazyFile) Dask tasks open."""
