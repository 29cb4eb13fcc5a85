"""The `sweep` subcommand's flags (the command table, cli.py, adds it with the others)."""

from __future__ import annotations

import argparse

from pipelines.cli_args import common_flags
from pipelines.commands import cmd_sweep


def add_sweep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep",
        help="grid or random search over model/train settings as Ray Tune trials; the best "
        "goes through evaluate and the gate",
        description=(
            "Train one model per trial, each a 'train' run with its own overrides, as Ray Tune "
            "trials across the cluster (as many side by side as its CPUs fit; one at a time on "
            "the embedded SQLite MLflow store), on the shards already staged. Each trial is an "
            "MLflow child run under one parent run named for the sweep. The trial with the "
            "lowest validation -ELBO is then exported to <outputs_dir>/train/model, evaluated "
            "and registered behind the promotion gate, like any retrain. Re-running the same "
            "sweep reuses finished trials and resumes the others. See docs/sweeps.md."
        ),
    )
    common_flags(p)
    p.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="SECTION.KEY=V1,V2",
        help="try every value (repeatable: every combination), e.g. --grid model.beta=1,4,8; "
        "values are YAML like --set's, lists in brackets: model.hidden=[64],[128,64]",
    )
    p.add_argument(
        "--sample",
        action="append",
        default=[],
        metavar="SECTION.KEY=V1,V2",
        help="random search: each trial picks one of the values (seeded by train.seed; no "
        "combination twice), e.g. --sample train.lr=0.0003,0.001,0.003",
    )
    p.add_argument(
        "--trials",
        type=int,
        default=None,
        metavar="N",
        help="at most N trials (default: every --grid combination; with --sample, 10); with "
        "--sample each grid combination gets N / combinations random picks",
    )
    p.add_argument(
        "--time-budget",
        default=None,
        metavar="DURATION",
        help="stop every trial still running after this long (90, 90s, 30m, 2h); the best "
        "finished trial goes on",
    )
    p.add_argument(
        "--evaluate-all",
        action="store_true",
        help="also evaluate every other finished trial on the test split into its own MLflow "
        "run (test metrics, MIG where the data has factors) and folder",
    )
    p.set_defaults(handler=cmd_sweep)
