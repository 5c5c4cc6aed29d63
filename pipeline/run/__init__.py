"""Where a build runs: the runner and its progress bar, the embedded local cluster, Slurm through dask-jobqueue."""
