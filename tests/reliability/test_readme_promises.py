"""The README and docs/ are a promise: every command line in their shell blocks is run, or
parsed by the real parser, in a test. COMMAND_TESTS maps each command to those tests; lines of a
kind one parametrized test covers (every `vae-pipeline ...` line, every benchmark line) need no
entry. Prose is not mapped, so rewording a page changes no test. Reads files; starts nothing."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.helpers.params import REPO

SHELL = {"bash", "sh", "shell", "console"}
README_MAX_LINES = 250
_COMMANDS = "tests/reliability/test_readme_commands.py"
PARSES_WITH_THE_CLI = (
    f"{_COMMANDS}::test_every_vae_pipeline_command_in_the_readme_parses_with_the_real_cli"
)
BENCHMARK_FLAGS = f"{_COMMANDS}::test_every_benchmark_the_readme_runs_accepts_the_flags_it_shows"
DATA_BLOCK = f"{_COMMANDS}::test_readme_data_block_versions_commits_pushes_and_pulls_back_byte_identical_shards"
DEPLOYMENT = "tests/orchestration/test_deployment_worker.py::test_two_workers_two_deployments_one_champion_and_downstream_follows_it"
MULTIHOST_WORKER = "tests/infra/test_multihost.py::test_scheduled_retrain_runs_through_a_prefect_worker_on_the_cluster"
DVC_S3_REMOTE = "tests/data/test_object_store.py::test_dvc_remote_on_the_object_store_push_then_a_clean_clone_pulls"
FRESH_CLONE = "tests/data/test_dvc.py::test_a_fresh_clone_says_every_stage_must_run_then_repro_stages_what_data_dvc_records"
EMBEDDED_RETRAIN = "tests/orchestration/test_cli_retrain.py::test_retrain_command_runs_on_the_embedded_default_and_prints_where_to_look"
DVC_EXPERIMENTS = "tests/orchestration/test_dvc_experiments.py::test_dvc_experiments_run_queue_show_and_apply_with_one_mlflow_store"

# Command (as `doc_command_lines` gives it: no comment, single spaces) -> the tests that run it.
COMMAND_TESTS: dict[str, list[str]] = {
    "make pipeline": [f"{_COMMANDS}::test_make_pipeline_sets_up_the_venv_then_runs_retrain_on_the_embedded_default", EMBEDDED_RETRAIN],
    "make test": [f"{_COMMANDS}::test_make_test_runs_ruff_the_import_contracts_and_the_whole_suite_as_ci_does"],
    "make setup TORCH_SPEC=": [f"{_COMMANDS}::test_make_setup_with_an_empty_torch_spec_keeps_the_torch_already_installed"],
    "make mutation": ["tests/code/test_mutation_score.py::test_make_mutation_installs_mutmut_runs_it_and_prints_the_score"],
    "source .venv/bin/activate": [f"{_COMMANDS}::test_source_venv_activate_puts_the_console_script_on_path"],
    "vae-pipeline --help": [f"{_COMMANDS}::test_top_level_help_lists_every_subcommand", "tests/code/test_cli.py::test_console_script_help_lists_the_subcommands"],
    "vae-pipeline quickstart --set model.kind=beta_vae --set model.beta=4 --json": [f"{_COMMANDS}::test_readme_quickstart_command_trains_the_beta_vae_it_asks_for"],
    "vae-pipeline similar digits-00042 -k 10 [--metric cosine]": [f"{_COMMANDS}::test_readme_similar_command_prints_k_neighbours_closest_first_with_labels"],
    "vae-pipeline embed [--model 3|champion|models:/...] [--source file.npz] [--split test] [--logvar]": ["tests/registry/test_embed.py::test_embed_writes_every_staged_sample_with_keys_and_a_sidecar", "tests/registry/test_embed.py::test_embed_of_an_array_file_keeps_row_keys_labels_and_logvar"],
    "vae-pipeline generate -n 64 --out samples.png": ["tests/registry/test_embed.py::test_generate_writes_a_png_grid_from_the_champion_decoder"],
    "vae-pipeline sweep --set model.kind=beta_vae --grid model.beta=1,4,8 --grid model.latent_dim=8,16 --json": ["tests/training/test_sweep.py::test_a_grid_sweep_runs_child_runs_under_one_parent_and_registers_the_best"],
    "vae-pipeline retrain": [EMBEDDED_RETRAIN],
    "vae-pipeline retrain --no-push --set train.epochs=5": [EMBEDDED_RETRAIN],
    "vae-pipeline serve": ["tests/orchestration/test_served_deployment.py::test_served_deployment_runs_the_retrain_flow_to_completion"],
    "vae-pipeline stage --set data.shards_dir=s3://my-bucket/digits": ["tests/data/test_object_store.py::test_stage_to_s3_reads_back_like_local_and_appends_only_new_objects"],
    "vae-pipeline train --set data.shards_dir=s3://my-bucket/digits": ["tests/data/test_object_store.py::test_train_evaluate_register_and_embed_read_shards_from_s3"],
    "dvc repro": [FRESH_CLONE, DEPLOYMENT],
    "dvc repro stage": [FRESH_CLONE, DATA_BLOCK, "tests/data/test_stage.py::test_committed_data_dvc_records_the_regenerated_digits_shards"],
    'git add data.dvc dvc.lock data/stage.json && git commit -m "data: new version"': [DATA_BLOCK],
    "dvc exp run -S train.epochs=20": [DVC_EXPERIMENTS],
    "dvc exp run -S train.epochs=20 -S model.latent_dim=16": [DVC_EXPERIMENTS],
    "dvc exp run --queue -S train.lr=0.003 -n lr-3e-3": [DVC_EXPERIMENTS],
    "dvc queue start": [DVC_EXPERIMENTS],
    "dvc queue logs --follow lr-3e-3": [DVC_EXPERIMENTS],
    "dvc exp show": [DVC_EXPERIMENTS],
    "dvc exp apply lr-3e-3": [DVC_EXPERIMENTS],
    "dvc repro --force --single-item register": [DVC_EXPERIMENTS],
    "dvc push": [DATA_BLOCK, "tests/data/test_dvc.py::test_dvc_push_then_pull_restores_byte_identical_shards"],
    "dvc pull data.dvc": [DATA_BLOCK],
    "export AWS_ENDPOINT_URL=http://127.0.0.1:9000 AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=...": ["tests/data/test_object_store.py::test_train_evaluate_register_and_embed_read_shards_from_s3"],
    "dvc remote add -d storage s3://my-bucket/vae-pipeline": [DVC_S3_REMOTE],
    "dvc remote modify --local storage endpointurl http://127.0.0.1:9000": [DVC_S3_REMOTE],
    "dvc remote modify --local storage access_key_id ...": [DVC_S3_REMOTE],
    "export PREFECT_API_URL=http://<prefect-server>:4200/api": [DEPLOYMENT],
    "prefect work-pool create vae-process-pool --type process": [MULTIHOST_WORKER],
    "prefect --no-prompt deploy --all": [MULTIHOST_WORKER, DEPLOYMENT],
    "prefect worker start --pool vae-process-pool": [MULTIHOST_WORKER],
    # both start the run by the API call `prefect deployment run` makes
    "prefect deployment run 'retrain/retrain-nightly'": [MULTIHOST_WORKER, "tests/orchestration/test_served_deployment.py::test_served_deployment_runs_the_retrain_flow_to_completion"],
    "python infra/local/stack.py up && source .stack/env.sh": ["tests/infra/test_local_stack.py::test_up_starts_all_services_and_prints_urls_and_env_lines"],
    "python infra/local/stack.py down": ["tests/infra/test_local_stack.py::test_down_stops_every_started_process_and_frees_the_ports"],
    # the no-CUDA path; the GPU path needs a GPU
    ".venv/bin/python benchmarks/gpu_check.py": ["tests/code/test_gpu_check.py::test_gpu_check_without_cuda_prints_one_json_document_and_exits_0"],
}  # fmt: skip

# The only commands no test runs, each for a reason CI cannot meet.
NOT_RUN_IN_CI = {
    "python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 --index-url <pytorch CUDA index>":
        "PyTorch's CUDA wheel index (the network) and a GPU",
}  # fmt: skip


def _normalise(command: str) -> str:
    """One command without its trailing comment, single spaces."""
    command = re.sub(r"(^|\s)#(\s.*)?$", "", command.strip())
    return " ".join(command.split())


def doc_pages() -> list[Path]:
    """The pages whose shell blocks are promises: README.md and every page under docs/."""
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def readme_command_lines(text: str | None = None) -> list[str]:
    """Every command line in README.md's (or text's) shell code blocks, and `$ ` lines in any
    block."""
    text = (REPO / "README.md").read_text() if text is None else text
    commands, fence = [], None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("```"):
            fence = stripped[3:].strip().lower() if fence is None else None
            continue
        if fence is None:
            continue
        if stripped.startswith("$ "):
            stripped = stripped[2:]
        elif fence not in SHELL:
            continue
        command = _normalise(stripped)
        if command:
            commands.append(command)
    return commands


def doc_command_lines() -> list[str]:
    """Every command line of every page doc_pages names, in page order."""
    return [c for page in doc_pages() for c in readme_command_lines(page.read_text())]


def covering_tests(command: str) -> list[str]:
    """The tests that run or parse command: its COMMAND_TESTS entry plus those of its kind."""
    tests = list(COMMAND_TESTS.get(command, []))
    parts = [p.strip() for p in re.split(r"&&|\|\||;", command)]
    if all(p.startswith("vae-pipeline") for p in parts):
        tests.append(PARSES_WITH_THE_CLI)
    if command.startswith(".venv/bin/python benchmarks/"):
        tests.append(BENCHMARK_FLAGS)
    return tests


def _defined_tests() -> dict[str, set[str]]:
    defined = {}
    for path in REPO.glob("tests/**/test_*.py"):
        tree = ast.parse(path.read_text())
        defined[str(path.relative_to(REPO))] = {
            n.name for n in tree.body if isinstance(n, ast.FunctionDef)
        }
    return defined


def test_readme_is_at_most_250_lines():
    """The README is for users: what, the two commands, the mental model, where next. Depth
    goes to docs/."""
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"


def test_the_parser_finds_the_commands_of_each_kind_of_block():
    text = "```bash\nmake test   # all\n# a comment\n```\n```\n$ vae-pipeline --help\nout\n```\n"
    assert readme_command_lines(text) == ["make test", "vae-pipeline --help"]
    commands = doc_command_lines()
    assert len(commands) >= 30 and "dvc repro stage" in commands


def test_every_command_in_the_readme_and_docs_is_run_by_a_test():
    missing = [c for c in doc_command_lines() if c not in NOT_RUN_IN_CI and not covering_tests(c)]
    assert not missing, f"commands in README.md or docs/ that no test runs: {missing}"


def test_every_test_a_command_maps_to_exists():
    defined = _defined_tests()
    for command in set(doc_command_lines()) - set(NOT_RUN_IN_CI):
        for node in covering_tests(command):
            path, test = node.split("::")
            assert test in defined.get(path, set()), f"{command!r}: {node} does not exist"


def test_no_entry_is_left_for_a_command_no_page_shows():
    shown = set(doc_command_lines())
    stale = sorted((set(COMMAND_TESTS) | set(NOT_RUN_IN_CI)) - shown)
    assert not stale, f"entries for commands no page shows any more: {stale}"
    assert not set(COMMAND_TESTS) & set(NOT_RUN_IN_CI)
