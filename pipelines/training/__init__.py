"""Training: the Ray Train driver, the per-worker loop and the in-process quickstart."""
