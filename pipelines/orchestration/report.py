"""The retrain flow's run report as Markdown: data version, metrics vs the champion, decision, links.

A pure function of the flow's summary dict, so it is tested without Prefect and the same text
is what the Prefect UI shows as the run's artifact.
"""

from __future__ import annotations

import math
from typing import Any

# Test-split metrics in report order; all in nats per example except active_units (a count).
METRICS = ("neg_elbo", "recon_nll", "kl", "iw_nll", "active_units")


def _num(value: Any, fmt: str = ".3f") -> str:
    if value is None or isinstance(value, bool):
        return "–"
    if isinstance(value, int):
        return str(value)
    try:
        x = float(value)
    except (TypeError, ValueError):
        return str(value)
    return format(x, fmt) if math.isfinite(x) else str(x)


def _code(value: Any) -> str:
    return f"`{value}`" if value not in (None, "") else "–"


def _data_section(data: dict) -> list[str]:
    if data.get("versioned"):
        dvc = f"{_code(data.get('dvc_md5'))} in `{data.get('dvc_file')}`"
    else:
        dvc = f"not versioned: {data.get('skipped_reason') or 'versioning did not run'}"
    rows = [
        ("source", data.get("source")),
        ("samples", data.get("summary")),
        ("DVC md5", dvc),
        ("manifest sha256", _code(data.get("manifest_sha256"))),
        ("pushed to DVC remote", data.get("push_note") or "–"),
    ]
    return ["## Data version", "", "| | |", "|---|---|"] + [
        f"| {k} | {v if v is not None else '–'} |" for k, v in rows
    ]


def _metrics_section(metrics: dict, champion: dict | None, gate: dict) -> list[str]:
    old = (champion or {}).get("metrics") or {}
    lik = metrics.get("decoder") or metrics.get("likelihood", "?")
    lines = [
        f"## Test metrics ({lik} likelihood, nats per example; lower is better)",
        "",
        "| metric | new | champion | new − champion |",
        "|---|---:|---:|---:|",
    ]
    if gate.get("mean_diff") is not None:
        ci = f"[{_num(gate.get('ci_low'), '+.4f')}, {_num(gate.get('ci_high'), '+.4f')}]"
        lines.append(
            f"| -ELBO, paired gate ({gate.get('n_examples')} examples, "
            f"{_num(100 * float(gate.get('confidence') or 0), '.0f')}% CI {ci}) "
            f"| {_num(gate.get('new_neg_elbo'))} | {_num(gate.get('champion_neg_elbo'))} "
            f"| {_num(gate.get('mean_diff'), '+.4f')} |"
        )
    for key in METRICS:
        new, was = metrics.get(key), old.get(key)
        diff = "–"
        if new is not None and was is not None:
            diff = _num(float(new) - float(was), "+.3f")
        lines.append(f"| {key} | {_num(new)} | {_num(was)} | {diff} |")
    if champion:
        lines += [
            "",
            f"Champion: version {champion.get('version')} as logged at its registration, on the "
            f"test split of its own data (`{champion.get('data_dvc_md5') or '?'}`); only the "
            "paired gate row scores both models on the same examples.",
        ]
    else:
        lines += ["", "No champion before this run."]
    return lines


def _decision_section(register: dict | None) -> list[str]:
    if not register:
        return ["## Promotion decision", "", "Not reached: the model was not registered."]
    return [
        "## Promotion decision",
        "",
        f"**{register.get('decision')}**: {register.get('reason')}",
    ]


def _champion_now(summary: dict) -> str:
    alias = (summary.get("where") or {}).get("champion_encoder")
    version = ((summary.get("register") or {}).get("champion") or {}).get("encoder")
    return f"{_code(alias)} = version {version}" if version else _code(alias)


def _embed_cell(embed: dict | None) -> str:
    if not embed:
        return "–"
    if "skipped" in embed:
        return f"not written: {embed['skipped']}"
    return f"{_code(embed.get('output'))} by {_code(embed.get('model_uri'))}"


def _dvc_lock_cell(record: dict | None) -> str:
    if not record:
        return "–"
    return (
        "updated (`dvc status` is clean)"
        if record.get("recorded")
        else (f"not updated: {record.get('reason')}")
    )


def _links_section(summary: dict) -> list[str]:
    train = summary.get("train") or {}
    register = summary.get("register") or {}
    flow_run = summary.get("flow_run") or {}
    run = f"{flow_run.get('name') or '–'} ({_code(flow_run.get('id'))})"
    if flow_run.get("url"):
        run = f"[{flow_run.get('name')}]({flow_run['url']}) ({_code(flow_run.get('id'))})"
    rows = [
        ("Prefect flow run", run),
        ("MLflow run id", _code(train.get("mlflow_run_id"))),
        ("MLflow tracking URI", _code(train.get("tracking_uri"))),
        ("training run name", _code(train.get("run_name"))),
        ("new encoder", _code(register.get("encoder_uri"))),
        ("new decoder", _code(register.get("decoder_uri"))),
        ("champion now", _champion_now(summary)),
        ("embeddings", _embed_cell(summary.get("embed"))),
        ("dvc.lock", _dvc_lock_cell(summary.get("dvc_lock"))),
        ("run guarded by", summary.get("lock") or "–"),
        ("figures", _code((summary.get("where") or {}).get("figures"))),
    ]
    return ["## Links", "", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]


def render_report(summary: dict) -> str:
    """Markdown for one retrain run, complete or failed (then it says where it stopped)."""
    status = summary.get("status", "unknown")
    lines = [f"# Retrain: {status}", ""]
    if summary.get("failed_step"):
        lines += [
            f"**Failed at `{summary['failed_step']}`**: {summary.get('error')}",
            "",
            "Earlier steps' results are kept (shards, data.dvc, checkpoints, registry); the "
            "champion was not changed by this run unless the decision below says so.",
            "",
        ]
    lines += _data_section(summary.get("data") or {}) + [""]
    lines += _metrics_section(
        summary.get("metrics") or {},
        summary.get("champion_before"),
        (summary.get("register") or {}).get("gate") or {},
    )
    lines += [""] + _decision_section(summary.get("register")) + [""]
    lines += _links_section(summary)
    return "\n".join(lines) + "\n"
