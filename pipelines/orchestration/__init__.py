"""Orchestration: the Prefect retrain flow and its run report."""
