"""Scoring a model on staged shards, one shard per task: what evaluate and the gate share."""
