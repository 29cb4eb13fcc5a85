"""`vae-pipeline`: one console script, one subcommand per stage.

Every subcommand reads `--params params.yaml` plus `--set section.key=value` overrides, shows
progress on stderr, and with `--json` prints one final JSON line with its results on stdout.
Errors a user can fix print as one line on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from pipelines.cli_args import common_flags, path_arg, seed_arg
from pipelines.cli_output import human_text
from pipelines.cli_process import (
    EXIT_BUG,
    EXIT_USER_ERROR,
    crash_log,
    interrupted_line,
    on_sigterm,
    os_error_line,
    quiet_libraries,
    stdout_kept_for_the_result,
)
from pipelines.cli_sweep import add_sweep
from pipelines.commands import (
    cmd_embed,
    cmd_evaluate,
    cmd_generate,
    cmd_quickstart,
    cmd_register,
    cmd_retrain,
    cmd_serve,
    cmd_similar,
    cmd_stage,
    cmd_train,
)
from pipelines.params import Params
from pipelines.params_file import load_params
from pipelines.presets import preset_overrides
from pipelines.timeouts import set_library_deadlines
from vae.errors import VAEError

Handler = Callable[[argparse.Namespace, Params], dict[str, Any]]


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
    common_flags(p)
    p.add_argument(
        "--out",
        default="outputs/quickstart",
        type=path_arg,
        help="folder for the model (default: %(default)s; replaces only a model saved there)",
    )
    p.set_defaults(handler=cmd_quickstart)


def _add_stage(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "stage",
        help="write the data source as WebDataset shards (train/val/test) + manifest.json",
        description=(
            "Load data.source (digits | mnist | fashion_mnist | array | images), check it (NaN, "
            "inf, dtype, shapes, unreadable files), split it by a hash of each sample's key "
            "(val_fraction, test_fraction; adding samples never moves old ones) and write "
            "byte-identical, gzip-compressed WebDataset tar shards of about data.shard_bytes "
            "each, samples in their native type (uint8 images stay uint8), plus manifest.json "
            "(counts, SHA-256 per shard, shape, encoding, source version, normalisation), into "
            "data.shards_dir. The source is read in chunks: memory stays flat whatever its size. "
            "When the source only gained samples since the last staging (rows appended to an "
            "array, images whose names sort last), the existing shards are kept byte-identical "
            "and the new samples go into new shards, so 'dvc push' uploads only those; changed "
            "or removed samples rebuild every shard (said in one line), as does --rebuild. The "
            "old shards are replaced only when everything succeeded. Version the result with "
            "'dvc add data/shards' (dvc.yaml's stage stage does this) and 'dvc push'."
        ),
    )
    common_flags(p)
    p.add_argument(
        "--record",
        metavar="FILE",
        default=None,
        type=path_arg,
        help="also write a machine-independent JSON summary (counts, hashes) to FILE",
    )
    p.add_argument(
        "--rebuild",
        action="store_true",
        help="re-cut every shard instead of keeping those of samples staged before",
    )
    p.set_defaults(handler=cmd_stage)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="distributed training on Ray Train over the staged shards, tracked in MLflow",
        description=(
            "Train the model from params.yaml with Ray Train DDP workers (cluster.num_workers; "
            "at least 1; 'quickstart' trains in this process) over the shards in data.shards_dir. Checkpoints every "
            "epoch under cluster.storage_path/<run name>; re-running the same run name resumes "
            "from the latest checkpoint. Logs params, per-epoch metrics, system metrics, data "
            "version and git commit to MLflow (mlflow.tracking_uri, $MLFLOW_TRACKING_URI, or "
            "SQLite at ./mlflow.db). Exports the best-by-validation model to "
            "<outputs_dir>/train/model. Cluster: set cluster.address or $RAY_ADDRESS."
        ),
    )
    common_flags(p)
    p.set_defaults(handler=cmd_train)


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
    common_flags(p)
    p.set_defaults(handler=cmd_evaluate)


def _add_retrain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "retrain",
        help="the whole pipeline once as a Prefect flow: stage, version, train, evaluate, register",
        description=(
            "Run the Prefect flow 'retrain' once: stage the data source into shards, record "
            "them in DVC (data.dvc) and 'dvc push' them, train on Ray, evaluate, and register "
            "behind the promotion gate. Each step calls the same code as its own subcommand. "
            "The run's report (data version, metrics vs the champion, decision, links) is a "
            "Prefect artifact. Uses the Prefect server at $PREFECT_API_URL, else a temporary "
            "local one. Ends by printing where to look: the MLflow UI, the champion's model "
            "URIs and the figures folder."
        ),
    )
    common_flags(p)
    p.add_argument("--no-push", action="store_true", help="version the shards but skip 'dvc push'")
    p.set_defaults(handler=cmd_retrain)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="schedule the retrain flow on this machine (schedule.cron) and run it when due",
        description=(
            "Create the Prefect deployment 'retrain/<schedule.deployment>' with the cron "
            "schedule schedule.cron (in schedule.timezone) and the given --params/--set as its "
            "parameters, then run its flows in this process until stopped (Ctrl-C pauses the "
            "schedule). Needs a running Prefect server at $PREFECT_API_URL: "
            "'prefect server start --host 127.0.0.1' and "
            "'export PREFECT_API_URL=http://127.0.0.1:4200/api', or "
            "'python infra/local/stack.py up'. Trigger a run now with "
            "\"prefect deployment run 'retrain/retrain-nightly'\". On clusters use prefect.yaml "
            "and a work pool instead."
        ),
    )
    common_flags(p)
    p.add_argument("--no-push", action="store_true", help="scheduled runs skip 'dvc push'")
    p.set_defaults(handler=cmd_serve)


def _add_register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "register",
        help="register the trained encoder + decoder in MLflow; the gate picks their alias",
        description=(
            "Log <outputs_dir>/train/model's encoder and decoder as MLflow pytorch models (pt2 "
            "exported programs that load without this project, plus our safetensors weights) "
            "and register them as versions of <register.name>-encoder and -decoder, tagged "
            "with each other, the training run, data version, git commit and test metrics. "
            "Gate: champion and new model are scored on the same test examples (per-example "
            "-ELBO, register.mc_samples z samples); the pair gets alias 'champion' only if it "
            "beats the champion by register.margin nats/example (bootstrap CI upper bound with "
            "register.require_ci, else the mean), otherwise 'challenger'. All-or-nothing: on "
            "any failure no alias moves and the new versions are deleted. Concurrent "
            "registrations take turns under a lock. Writes <outputs_dir>/register/register.json."
        ),
    )
    common_flags(p)
    p.set_defaults(handler=cmd_register)


def _add_embed(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "embed",
        help="embed shards or an array file with the registered encoder (Ray Data) to Parquet",
        description=(
            "Pull the registered encoder (embed.model: champion by default; or a version "
            "number, an alias, or models:/<name>-encoder@alias|/version), run it with Ray Data "
            "actors over a staged shards folder (embed.split, default all) or a .npy/.npz "
            "array, and write one Parquet file (key, split, label, mu[, logvar]) in input "
            "order plus a JSON sidecar naming the model version and the data's SHA-256. Shards "
            "of another data version than the encoder was trained on are refused unless "
            "embed.allow_other_data is true. An existing output is replaced only if embed "
            "wrote it. Uses "
            "cluster.address / $RAY_ADDRESS for a cluster (shards on shared storage), else a "
            "local Ray."
        ),
    )
    common_flags(p)
    p.add_argument("--model", default=None, help="alias, version or models:/ URI")
    p.add_argument(
        "--source",
        default=None,
        type=path_arg,
        help="shards folder or .npy/.npz file (default: data.shards_dir)",
    )
    p.add_argument("--split", default=None, choices=["all", "train", "val", "test"])
    p.add_argument(
        "--out",
        default=None,
        type=path_arg,
        help=(
            "Parquet file (default: embed.output or <outputs_dir>/embed/embeddings.parquet); "
            "the sidecar is the same name with .json"
        ),
    )
    p.add_argument("--logvar", action="store_true", help="also write the posterior log-variance")
    p.set_defaults(handler=cmd_embed)


def _add_similar(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "similar",
        help="nearest neighbours of one sample among the written embeddings",
        description=(
            "Read the Parquet file written by 'embed' and print the -k samples whose posterior "
            "means are closest to KEY's (Euclidean or cosine), with their distances and labels. "
            "A table made by an older encoder than the registered champion is refused."
        ),
    )
    common_flags(p)
    p.add_argument("key", metavar="KEY", help="sample key, e.g. digits-00042")
    p.add_argument(
        "-k", type=int, default=10, help="neighbours to return, 1 to 10000 (default: %(default)s)"
    )
    p.add_argument("--metric", default="euclidean", choices=["euclidean", "cosine"])
    p.add_argument(
        "--embeddings",
        default=None,
        type=path_arg,
        help="Parquet file (default: embed.output or <outputs_dir>/embed/embeddings.parquet)",
    )
    p.add_argument(
        "--allow-old-encoder",
        action="store_true",
        help=(
            "use a table made by an older version of the encoder than the champion (refused "
            "by default: its neighbours answer for a model no longer in use)"
        ),
    )
    p.set_defaults(handler=cmd_similar)


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="sample images from the registered decoder into a PNG grid",
        description=(
            "Pull the registered decoder (champion by default), draw -n latent vectors from "
            "N(0, I) with --seed and save the decoder's mean images as a PNG grid."
        ),
    )
    common_flags(p)
    p.add_argument("-n", type=int, default=64, help="images, 1 to 4096 (default: %(default)s)")
    p.add_argument(
        "--out",
        default=None,
        type=path_arg,
        help=(
            "PNG file (default: <outputs_dir>/generate/samples.png); an existing file is "
            "replaced only if vae-pipeline wrote it"
        ),
    )
    p.add_argument("--model", default=None, help="alias, version or models:/ URI")
    p.add_argument(
        "--seed", type=seed_arg, default=0, help="0 to 2**32-1; the same seed, the same grid"
    )
    p.set_defaults(handler=cmd_generate)


PARSER_BUILDERS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_quickstart,
    _add_stage,
    _add_train,
    add_sweep,
    _add_evaluate,
    _add_retrain,
    _add_serve,
    _add_register,
    _add_embed,
    _add_similar,
    _add_generate,
]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vae-pipeline")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="vae-pipeline",
        description=(
            "Training pipeline for variational autoencoders. Every figure is per example, in "
            "nats, under the decoder likelihood named in the output."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in PARSER_BUILDERS:
        add(sub)
    return parser


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one `error:` line (and a JSON document with --json)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message}; see '{self.prog} --help'")


class UsageError(Exception):
    pass


def find_params(start: Path) -> Path | None:
    """params.yaml in start or the nearest parent holding one (as git finds .git)."""
    for folder in [start, *start.parents]:
        # exists, not is_file: a params.yaml that is a folder is an error to report, not a
        # reason to run on built-in defaults (or a parent project's file) without a word.
        if (folder / "params.yaml").exists():
            return folder / "params.yaml"
    return None


def _choose_params(args: argparse.Namespace) -> None:
    """--params as given; else the nearest params.yaml, so a command run from a subfolder
    works on its project instead of starting a second workspace there."""
    if args.params is None:
        found = find_params(Path.cwd())
        args.params = str(found) if found is not None else None
    if not args.quiet:
        where = args.params or f"none found in {Path.cwd()} or its parents: built-in defaults"
        print(f"params: {where}", file=sys.stderr)


def _run(args: argparse.Namespace) -> tuple[int, dict[str, Any]]:
    """The command's result, or (exit code, error document): every exception becomes one line."""
    try:
        _choose_params(args)
        set_library_deadlines()
        quiet_libraries(args.verbose)
        # Expanded in place: retrain and serve hand args.overrides on to the flow.
        args.overrides = [*preset_overrides(args.preset), *args.overrides]
        params = load_params(args.params, args.overrides)
        result = args.handler(args, params)
        if isinstance(result, dict) and args.params is not None:
            result.setdefault("params_file", str(Path(args.params).resolve()))
        return 0, result
    except VAEError as exc:  # PipelineError and every library error a user can fix
        return EXIT_USER_ERROR, {"error": str(exc)}
    except OSError as exc:  # a folder that is read-only, full or not a folder: the user's to fix
        return EXIT_USER_ERROR, {"error": os_error_line(exc)}
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        name = signal.Signals(signum).name
        return 128 + signum, {"error": interrupted_line(name, args.command), "signal": name}
    except Exception as exc:  # noqa: BLE001 - the boundary: a bug, reported as one line
        log = crash_log(exc)
        first = (str(exc).splitlines() or [""])[0][:200]
        where = f"with the log {log}" if log else "with the command you ran"
        return EXIT_BUG, {
            "error": f"unexpected {type(exc).__name__}: {first}; this is a bug in vae-pipeline, "
            f"please report it {where}",
            "log": str(log) if log else None,
        }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    as_json = "--json" in argv
    try:
        args = build_parser().parse_args(argv)
    except UsageError as exc:
        code, result = EXIT_USER_ERROR, {"error": str(exc)}
    else:
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, on_sigterm)
            if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # after pipelines.entry
                signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            with stdout_kept_for_the_result(as_json):
                code, result = _run(args)
        finally:
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, previous)
    if code != 0:
        # One line, whatever a library put in the message: scripts grep it, people read it.
        result["error"] = " ".join(str(result["error"]).split())
        result["exit_code"] = code
        print("error: " + result["error"], file=sys.stderr)
    try:
        if as_json:
            print(json.dumps(result, default=str), flush=True)
        elif code == 0:
            print(human_text(result), flush=True)
    except BrokenPipeError:
        # The reader went away (`| head`): not an error of ours, and no traceback at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return code


if __name__ == "__main__":
    sys.exit(main())
