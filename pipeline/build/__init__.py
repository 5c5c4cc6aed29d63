"""A build: its options resolved once (options), partitions and the plan (plan), decode tasks, the graph and its writer chain (graph, chain), the single writer, the summary and the upload."""
