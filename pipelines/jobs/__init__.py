"""Jobs on a registered model: embed a dataset, find similar examples, generate samples."""
