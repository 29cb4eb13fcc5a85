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


PARSER_BUILDERS: list[Callable[[argparse._SubParsersAction], None]] = [_add_quickstart]


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
