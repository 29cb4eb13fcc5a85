"""Data: sources, staging into WebDataset shards, the shard loader, hashing, DVC and lineage."""
