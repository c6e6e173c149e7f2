"""Data: the embedded synthetic dataset, shard writing and reading."""
