"""What each vae-pipeline subcommand runs: the stage function its command calls (imported only
when that command runs), and its result as the dict the CLI prints."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from pipelines.cli_process import (
    quiet_prefect,
)
from pipelines.errors import PipelineError
from pipelines.params import Params


def cmd_quickstart(args: argparse.Namespace, params: Params) -> dict[str, Any]:
    from pipelines.guards import check_writable
    from pipelines.training.quickstart import QuickstartJob, run_quickstart
    from vae.io import check_model_dir_replaceable

    out = params.resolve(args.out)
    check_model_dir_replaceable(out / "model")  # before training, not after it
    check_writable(out, "--out")
    job = QuickstartJob.from_params(params)
    return run_quickstart(job, out, progress=not args.quiet).to_dict()


def cmd_stage(args: argparse.Namespace, params: Params) -> dict[str, Any]:
    from pipelines.data.staging import StageJob, is_record, stage_shards, write_record
    from pipelines.guards import check_output_file

    record = params.resolve(args.record) if args.record else None
    if record is not None:  # checked before staging: a bad path must not cost a whole run
        check_output_file(record, "--record", (".json",), is_record)
    job = StageJob.from_params(params)
    result = stage_shards(job, progress=not args.quiet, rebuild=args.rebuild)
    if record is not None:
        write_record(result, record, params.data.shards_dir)
    return result.to_dict()


def cmd_train(args: argparse.Namespace, params: Params) -> dict[str, Any]:
    from pipelines.training.driver import train_model
    from pipelines.training.job import TrainJob

    return train_model(TrainJob.from_params(params), progress=not args.quiet).to_dict()


def cmd_evaluate(args: argparse.Namespace, params: Params) -> dict[str, Any]:
    from pipelines.evaluation.evaluate import EvaluateJob, evaluate_model

    return evaluate_model(EvaluateJob.from_params(params), progress=not args.quiet).to_dict()


def cmd_sweep(args: argparse.Namespace, params: Params) -> dict[str, Any]:
    from pipelines.evaluation.evaluate import EvaluateJob
    from pipelines.orchestration.sweep import run_sweep
    from pipelines.orchestration.sweep_job import SweepJob, trial_jobs
    from pipelines.registry.register import RegisterJob
    from pipelines.training.sweep_plan import SweepSpec, parse_duration

    spec = SweepSpec.from_flags(args.grid, args.sample, args.trials)
    budget = parse_duration(args.time_budget) if args.time_budget is not None else None
    plans = spec.plan(seed=params.train.seed)
    trials = trial_jobs(args.params, args.overrides, spec, plans)
    job = SweepJob(
        spec, tuple(tuple(p) for p in plans), tuple(trials), EvaluateJob.from_params(params),
        RegisterJob.from_params(params), budget, args.evaluate_all,
    )  # fmt: skip
    return run_sweep(job, progress=not args.quiet).to_dict()


def _project_params(args: argparse.Namespace) -> str:
    """retrain and serve run a project's pipeline: built-in defaults would stage, train and
    schedule in whatever folder they were started from."""
    if args.params is None:
        raise PipelineError(
            f"no params.yaml in {Path.cwd()} or its parents; run '{args.command}' inside a "
            "project (its params.yaml says where data, runs and outputs go) or pass --params"
        )
    return args.params


def _check_push_remote(args: argparse.Namespace, params: Params) -> None:
    """An S3 DVC remote without the s3 extra, or whose server does not answer: one line
    before Prefect's server starts, not after staging (the flow checks again, for runs a
    deployment starts)."""
    from pipelines.data.versioning.dvc import check_push_remote, find_repo

    if not args.no_push and (repo := find_repo(params.root)):
        check_push_remote(repo)


def cmd_retrain(args: argparse.Namespace, params: Params) -> dict[str, Any]:
    # Prefect's temporary local server gets 20 s to start by default, too little on a busy
    # 2-core machine; set before Prefect reads its settings (the user's value wins).
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    params_file = _project_params(args)
    _check_push_remote(args, params)  # before Prefect's import (seconds) and server
    from pipelines.orchestration import prefect_api

    url = prefect_api.prefect_server()
    if url:  # a server that is down, silent or not Prefect: one line now, not a traceback later
        prefect_api.check_prefect_server(url)
    from pipelines.orchestration.flows import retrain_flow

    quiet_prefect()
    return retrain_flow(
        params_file=params_file,
        overrides=args.overrides,
        push=not args.no_push,
        progress=not args.quiet,
    )


def cmd_serve(args: argparse.Namespace, params: Params) -> dict[str, Any]:
    params_file = _project_params(args)
    _check_push_remote(args, params)
    from pipelines.orchestration.scheduling import serve_retrain

    quiet_prefect()
    serve_retrain(params_file, args.overrides, push=not args.no_push)
    return {"served": params.schedule.deployment, "stopped": True}


def cmd_register(args: argparse.Namespace, params: Params) -> dict[str, Any]:
    from pipelines.registry.register import RegisterJob, register_model

    return register_model(RegisterJob.from_params(params), progress=not args.quiet).to_dict()


def cmd_embed(args: argparse.Namespace, params: Params) -> dict[str, Any]:
    from pipelines.jobs.embed import EmbedJob, embed

    return embed(
        EmbedJob.from_params(params),
        model_uri=args.model,
        source=args.source,
        output=args.out,
        include_logvar=True if args.logvar else None,
        split=args.split,
        progress=not args.quiet,
    ).to_dict()


def cmd_similar(args: argparse.Namespace, params: Params) -> dict[str, Any]:
    from pipelines.jobs.similar import check_follows_champion, similar
    from pipelines.paths import layout
    from pipelines.registry.models import registry_of

    path = layout(params).embeddings_path(args.embeddings)
    result = similar(path, args.key, k=args.k, metric=args.metric)
    result.encoder = check_follows_champion(
        registry_of(params), path, allow_old=args.allow_old_encoder
    )
    return result.to_dict()


def cmd_generate(args: argparse.Namespace, params: Params) -> dict[str, Any]:
    from pipelines.jobs.generate import generate
    from pipelines.paths import layout
    from pipelines.registry.models import registry_of

    return generate(
        registry_of(params), layout(params), n=args.n, out=args.out, model_uri=args.model,
        seed=args.seed,
    ).to_dict()  # fmt: skip
