"""The pipeline around the `vae` library: stages, flows and the `vae-pipeline` CLI."""
