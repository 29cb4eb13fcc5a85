"""Evaluation: test-split metrics in nats and the figures."""
