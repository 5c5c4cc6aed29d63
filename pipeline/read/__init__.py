"""Reading for Dask: arrays over datasets (arrays), and sources' values by row for bags and bank.map (records)."""
