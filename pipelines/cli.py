"""`vae-pipeline`: one console script, one subcommand per stage.

Every subcommand reads `--params params.yaml` plus `--set section.key=value` overrides, shows
progress on stderr, and with `--json` prints one final JSON line with its results on stdout.
Errors a user can fix print as one line on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from pipelines.errors import PipelineError
from pipelines.params import Params, load_params
from vae.errors import VAEError

Handler = Callable[[argparse.Namespace, Params], dict[str, Any]]
EXIT_USER_ERROR = 2


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--params",
        default="params.yaml",
        metavar="FILE",
        help="parameters file (default: %(default)s; built-in defaults if it is absent)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one parameter, e.g. --set train.epochs=5 (repeatable; value is YAML)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one final JSON line with the results on stdout"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


# -- subcommands ------------------------------------------------------------------------------


def cmd_quickstart(args: argparse.Namespace, params: Params) -> dict[str, Any]:
    from pipelines.quickstart import run_quickstart

    out = params.resolve(args.out)
    return run_quickstart(params, out, progress=not args.quiet).to_dict()


def _add_quickstart(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quickstart",
        help="train + evaluate in-process on the configured source (no Ray, no services)",
        description=(
            "Train a model from params.yaml in this process on the data source held in memory, "
            "with a fixed 80/20 train/test split, and print held-out metrics in nats per example: "
            "-ELBO, reconstruction NLL, KL, importance-weighted NLL (k=evaluate.iw_k), "
            "active units. The quickest check of a model config."
        ),
    )
    _common(p)
    p.add_argument("--out", default="outputs/quickstart", help="where the model is saved")
    p.set_defaults(handler=cmd_quickstart)


def cmd_stage(args: argparse.Namespace, params: Params) -> dict[str, Any]:
    from pipelines.stage import stage_shards, write_record

    result = stage_shards(params, progress=not args.quiet)
    if args.record:
        write_record(result, params.resolve(args.record), params)
    return result.to_dict()


def _add_stage(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "stage",
        help="write the data source as WebDataset shards (train/val/test) + manifest.json",
        description=(
            "Load data.source (digits | mnist | fashion_mnist | array | images), check it (NaN, "
            "inf, dtype, shapes, unreadable files), split it by a hash of each sample's key "
            "(val_fraction, test_fraction; adding samples never moves old ones) and write "
            "byte-identical WebDataset tar shards of at most data.shard_size samples per split, "
            "plus manifest.json (counts, SHA-256 per shard, shape, source version, "
            "normalisation), into data.shards_dir. The old shards are replaced only when "
            "everything succeeded. Version the result with 'dvc add data/shards' (dvc.yaml's "
            "stage stage does this) and 'dvc push'."
        ),
    )
    _common(p)
    p.add_argument(
        "--record",
        metavar="FILE",
        default=None,
        help="also write a machine-independent JSON summary (counts, hashes) to FILE",
    )
    p.set_defaults(handler=cmd_stage)


def cmd_train(args: argparse.Namespace, params: Params) -> dict[str, Any]:
    from pipelines.train import train_model

    return train_model(params, progress=not args.quiet).to_dict()


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="distributed training on Ray Train over the staged shards, tracked in MLflow",
        description=(
            "Train the model from params.yaml with Ray Train DDP workers (train.num_workers; "
            "0 runs in this process) over the shards in data.shards_dir. Checkpoints every "
            "epoch under train.storage_path/<run name>; re-running the same run name resumes "
            "from the latest checkpoint. Logs params, per-epoch metrics, system metrics, data "
            "version and git commit to MLflow (mlflow.tracking_uri, $MLFLOW_TRACKING_URI, or "
            "SQLite at ./mlflow.db). Exports the best-by-validation model to "
            "<outputs_dir>/train/model. Cluster: set train.ray_address or $RAY_ADDRESS."
        ),
    )
    _common(p)
    p.set_defaults(handler=cmd_train)


def cmd_evaluate(args: argparse.Namespace, params: Params) -> dict[str, Any]:
    from pipelines.evaluate import evaluate_model

    return evaluate_model(params, progress=not args.quiet).to_dict()


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="held-out metrics and figures for the trained model",
        description=(
            "Evaluate <outputs_dir>/train/model on the test split: -ELBO, reconstruction NLL, "
            "KL, importance-weighted NLL (evaluate.iw_k samples), active units and KL per "
            "latent dimension, all in nats per example under the decoder likelihood. Writes "
            "<outputs_dir>/evaluate/metrics.json and PNG figures (reconstructions, prior "
            "samples, latent space, learning curves) and logs them to the training's MLflow run."
        ),
    )
    _common(p)
    p.set_defaults(handler=cmd_evaluate)


PARSER_BUILDERS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_quickstart,
    _add_stage,
    _add_train,
    _add_evaluate,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vae-pipeline",
        description=(
            "Training pipeline for variational autoencoders. Every figure is per example, in "
            "nats, under the decoder likelihood named in the output."
        ),
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in PARSER_BUILDERS:
        add(sub)
    return parser


# -- output -----------------------------------------------------------------------------------


def _human(result: dict[str, Any]) -> str:
    """A readable summary: metrics first, then paths and URIs."""
    lines = []
    metrics = result.get("metrics")
    if isinstance(metrics, dict):
        lik = metrics.get("likelihood", "?")
        lines.append(f"held-out metrics ({lik} likelihood, nats per example):")
        for key in ("neg_elbo", "recon_nll", "kl", "iw_nll", "active_units", "n_examples"):
            if metrics.get(key) is not None:
                val = metrics[key]
                lines.append(
                    f"  {key:<13} {val:.3f}" if isinstance(val, float) else f"  {key:<13} {val}"
                )
    for key, val in result.items():
        if key != "metrics" and not isinstance(val, (dict, list)):
            lines.append(f"{key}: {val}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        params = load_params(args.params, args.overrides)
        result = args.handler(args, params)
    except (VAEError, PipelineError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(result, default=str))
    else:
        print(_human(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
