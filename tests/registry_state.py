"""What the MLflow model registry holds, as one comparable value: tests take it before and
after a fault to show that nothing was registered, moved or lost."""

from __future__ import annotations


def registry_snapshot(tracking_uri: str) -> dict[str, object]:
    """Registered models -> their aliases and versions (number, status, source)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    out: dict[str, object] = {}
    for rm in client.search_registered_models():
        versions = client.search_model_versions(f"name='{rm.name}'")
        out[rm.name] = {
            "aliases": dict(sorted(rm.aliases.items())),
            "versions": sorted((v.version, v.status, v.source) for v in versions),
        }
    return out
