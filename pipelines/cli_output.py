"""What a command prints for a person (without --json): metrics first, in nats per example and
naming the likelihood, then paths and URIs; yes/no, never Python's True/None."""

from __future__ import annotations

from typing import Any


def _plain(value: Any) -> str:
    """A value as a person reads it: yes/no, not Python's True/False."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def human_text(result: dict[str, Any]) -> str:
    """A readable summary: metrics first, then paths and URIs."""
    lines = []
    metrics = result.get("metrics")
    if isinstance(metrics, dict):
        lik = metrics.get("decoder") or metrics.get("likelihood", "?")
        lines.append(f"held-out metrics ({lik} likelihood, nats per example):")
        for key in ("neg_elbo", "recon_nll", "kl", "iw_nll", "active_units", "n_examples"):
            if metrics.get(key) is not None:
                val = metrics[key]
                lines.append(
                    f"  {key:<13} {val:.3f}" if isinstance(val, float) else f"  {key:<13} {val}"
                )
    for key, val in result.items():
        if val is None:  # nothing to say ("reused: None" told a reader nothing)
            continue
        if key != "metrics" and not isinstance(val, (dict, list)):
            lines.append(f"{key}: {_plain(val)}")
        elif isinstance(val, list) and val and all(isinstance(row, dict) for row in val):
            # Tables such as similar's neighbours: one row per line.
            lines.append(f"{key}:")
            lines += ["  " + "  ".join(f"{k}={v}" for k, v in row.items()) for row in val]
    return "\n".join(lines)
