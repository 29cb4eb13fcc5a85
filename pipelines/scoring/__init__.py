"""Scoring a model on staged shards, a piece of a shard per task: what evaluate and the gate share."""
