"""The argument types and the flags every vae-pipeline subcommand takes (--params, --set,
--preset, --quiet, --verbose, --json)."""

from __future__ import annotations

import argparse

from pipelines.presets import presets_help


def path_arg(text: str) -> str:
    """A path on the command line: refused in one line if no file system could hold it."""
    if "\x00" in text:
        raise argparse.ArgumentTypeError("a path cannot hold a NUL byte")
    return text


def seed_arg(text: str) -> int:
    """A seed on the command line: an integer torch and numpy can both take."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"{text} is not a seed from 0 to {2**32 - 1}")
    return value


def common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--params",
        default=None,
        type=path_arg,
        metavar="FILE",
        help=(
            "parameters file (default: params.yaml in this folder or the nearest parent that "
            "has one, as git finds .git; built-in defaults if there is none)"
        ),
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
        "--preset",
        default=None,
        metavar="NAME",
        help=(
            "apply a named set of overrides before --set (which wins): "
            f"{presets_help()} (pipelines/presets.py)"
        ),
    )
    parser.add_argument(
        "--json", action="store_true", help="print one final JSON line with the results on stdout"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="also show Ray workers' output and Ray's, MLflow's and Prefect's logs "
        "(by default they go to log files only)",
    )
