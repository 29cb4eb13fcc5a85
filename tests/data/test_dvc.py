"""DVC for real, in a temporary git repo laid out like ours: repro, status, push, pull."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.data.staging import StageJob, stage_shards
from tests.helpers.files import file_hashes
from tests.helpers.params import REPO, params_in
from tests.helpers.repos import git_dvc_env, make_repo
from tests.reliability.test_readme_promises import readme_command_lines

pytestmark = pytest.mark.slow

# The stage stage's code deps (folders and files of pipelines/ and vae/), as dvc.yaml lists them.
STAGE_CODE = [
    dep
    for dep in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["stage"]["deps"]
    if dep.split("/")[0] in ("pipelines", "vae")
]


def sh(repo: Path, env: dict, *cmd: str) -> str:
    """Run one command (DVC commands one at a time: two in one repo fight over its lock); its
    stdout and stderr (DVC says what it skipped on either)."""
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def dvc_md5(repo: Path) -> str:
    return yaml.safe_load((repo / "data.dvc").read_text())["outs"][0]["md5"]


@pytest.fixture
def dvc_repo(tmp_path) -> tuple[Path, dict]:
    """Our dvc.yaml, data.dvc, params.yaml, .dvc/config, .dvcignore and stage code in a fresh
    git repo."""
    repo = make_repo(tmp_path)
    shutil.copy(REPO / ".dvcignore", repo / ".dvcignore")
    for dep in STAGE_CODE:
        (repo / dep).parent.mkdir(parents=True, exist_ok=True)
        if (REPO / dep).is_dir():
            shutil.copytree(REPO / dep, repo / dep, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(REPO / dep, repo / dep)
    return repo, git_dvc_env()


@pytest.fixture
def fresh_clone(tmp_path) -> tuple[Path, dict]:
    """What `git clone` of this checkout gives: every file git tracks (as it is in the working
    tree, so uncommitted edits are tested too), committed in a new git repo; nothing else."""
    clone = tmp_path / "clone"
    env = git_dvc_env()
    tracked = sh(REPO, env, "git", "ls-files", "-z").split("\0")
    for name in filter(None, tracked):
        if (REPO / name).is_file():  # not a file deleted in the working tree
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, clone / name)
    for cmd in (
        ["init", "-q"],
        ["config", "user.email", "t@example.com"],
        ["config", "user.name", "t"],
        ["add", "-A"],
        ["commit", "-qm", "clone"],
    ):
        sh(clone, env, "git", *cmd)
    # --local: .dvc/config.local, which DVC's own .dvc/.gitignore keeps out of git
    sh(clone, env, "dvc", "config", "--local", "core.site_cache_dir", str(tmp_path / "site"))
    return clone, env


def test_a_fresh_clone_says_every_stage_must_run_then_repro_stages_what_data_dvc_records(
    fresh_clone,
):
    """A fresh clone has no dvc.lock: `dvc status` lists the four stages (nothing has run there)
    and data.dvc's shards as not in the cache. The README's first data command regenerates the
    shards data.dvc records, with no ERROR or WARNING, and git then shows only the new,
    untracked dvc.lock. The stage is skipped until its params change."""
    repo, env = fresh_clone
    assert not (repo / "dvc.lock").exists(), "dvc.lock is not committed"
    status = json.loads(sh(repo, env, "dvc", "status", "--json"))
    assert set(status) == {"data.dvc", "stage", "train", "evaluate", "register"}, status
    assert status["data.dvc"] == [{"changed outs": {"data/shards": "not in cache"}}]

    committed = dvc_md5(repo)
    first = next(c for c in readme_command_lines() if c.startswith("dvc "))
    assert first == "dvc repro stage", "the README's first data command"
    out = sh(repo, env, "bash", "-c", first)
    assert "Running stage 'stage'" in out and "ERROR" not in out and "WARNING" not in out, out
    assert dvc_md5(repo) == committed  # regenerated without any remote: byte-identical
    assert sh(repo, env, "git", "status", "--porcelain").splitlines() == ["?? dvc.lock"]
    assert "up to date" in sh(repo, env, "dvc", "status", "stage", "data.dvc")
    assert "didn't change, skipping" in sh(repo, env, "dvc", "repro", "stage")

    params = repo / "params.yaml"
    params.write_text(params.read_text().replace("shard_size: null", "shard_size: 64"))
    assert "Running stage 'stage'" in sh(repo, env, "dvc", "repro", "stage")
    assert dvc_md5(repo) != committed
    assert "up to date" in sh(repo, env, "dvc", "status", "stage", "data.dvc")


def test_dvc_push_then_pull_restores_byte_identical_shards(dvc_repo):
    repo, env = dvc_repo
    shards = repo / "data" / "shards"
    stage_shards(StageJob.from_params(params_in(repo, f"data.shards_dir={shards}")), progress=False)
    before = file_hashes(shards)
    sh(repo, env, "dvc", "add", "data/shards")  # updates the root data.dvc that tracks it
    assert not (repo / "data" / "shards.dvc").exists()
    sh(repo, env, "dvc", "push", "data.dvc")  # to the default remote from our .dvc/config
    assert any((repo / ".dvc-remote").rglob("*"))

    shutil.rmtree(shards)
    shutil.rmtree(repo / ".dvc" / "cache")
    sh(repo, env, "dvc", "pull", "data.dvc")
    assert file_hashes(shards) == before
    assert "up to date" in sh(repo, env, "dvc", "status", "data.dvc")


def test_shard_truncated_after_staging_shows_as_modified_is_named_and_checks_out_whole(dvc_repo):
    from pipelines.data.shards.loader import make_loader
    from pipelines.data.shards.reader import verify_shards
    from pipelines.errors import PipelineError

    repo, env = dvc_repo
    shards = repo / "data" / "shards"
    stage_shards(StageJob.from_params(params_in(repo, f"data.shards_dir={shards}")), progress=False)
    before = file_hashes(shards)
    sh(repo, env, "dvc", "add", "data/shards")
    shard = sorted(shards.glob("train-*.tar.gz"))[1]
    shard.write_bytes(shard.read_bytes()[:5000])

    status = sh(repo, env, "dvc", "status", "data.dvc")
    assert "modified:" in status and "data/shards" in status, status
    with pytest.raises(PipelineError, match=rf"{shard.name} is truncated at byte 5000"):
        verify_shards(shards, ["train"])
    with pytest.raises(PipelineError, match=rf"{shard.name} is truncated"):
        list(make_loader(shards, "train", 64, shuffle=False))

    # The data version lost nothing: DVC's cache gives the recorded shard back, byte for byte.
    sh(repo, env, "dvc", "checkout", "--force", "data.dvc")
    assert file_hashes(shards) == before
    assert "up to date" in sh(repo, env, "dvc", "status", "data.dvc")


def _remote_bytes(repo: Path) -> int:
    return sum(p.stat().st_size for p in (repo / ".dvc-remote").rglob("*") if p.is_file())


def _images(n: int, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    x = np.zeros((n, 28, 28), np.uint8)
    for i, (r, c) in enumerate(rng.integers(0, 20, (n, 2))):
        x[i, r : r + 8, c : c + 8] = rng.integers(128, 256, (8, 8))
    return x


def test_appending_samples_keeps_old_shards_and_dvc_push_sends_only_the_new_ones(dvc_repo):
    """10% more rows at the end of the array: every old shard stays byte-identical, the new
    samples land in new shards, and the second `dvc push` uploads at most 20% of the data.
    Changing an old sample rebuilds everything (said in one line); --rebuild is deterministic."""
    import numpy as np

    repo, env = dvc_repo
    raw, shards = repo / "raw", repo / "data" / "shards"
    raw.mkdir()
    x = _images(6600, seed=0)
    np.save(raw / "x.npy", x[:6000])
    stage = [
        sys.executable, "-m", "pipelines.cli", "stage", "--json", "--quiet",
        "--set", "data.source=array", "--set", "data.path=raw/x.npy",
        "--set", "data.shard_bytes=150000",
    ]  # fmt: skip
    sh(repo, env, *stage)
    before = file_hashes(shards)
    sh(repo, env, "dvc", "add", "data/shards")
    sh(repo, env, "dvc", "push", "data.dvc")
    pushed = _remote_bytes(repo)

    np.save(raw / "x.npy", x)  # 600 rows appended
    grown = json.loads(sh(repo, env, *stage))
    after = file_hashes(shards)
    assert grown["appended"] and sum(grown["samples"].values()) == 6600
    unchanged = [name for name, digest in before.items() if after.get(name) == digest]
    assert set(unchanged) == set(before) - {"manifest.json"}, "every old shard kept"
    assert len(unchanged) / (len(after) - 1) >= 0.85, (len(unchanged), len(after))
    sh(repo, env, "dvc", "add", "data/shards")
    sh(repo, env, "dvc", "push", "data.dvc")
    data_bytes = sum(p.stat().st_size for p in shards.iterdir())
    assert _remote_bytes(repo) - pushed <= 0.2 * data_bytes

    x[5] = 255 - x[5]  # an old sample changed: nothing can be kept
    np.save(raw / "x.npy", x)
    proc = subprocess.run(
        stage, cwd=repo, env=env, capture_output=True, text=True, timeout=300
    )  # even with --quiet: the warning says why the whole dataset is re-uploaded
    assert proc.returncode == 0, proc.stderr
    warned = [line for line in proc.stderr.splitlines() if "rebuilding every shard" in line]
    assert len(warned) == 1, proc.stderr
    assert not json.loads(proc.stdout)["appended"]

    rebuilt = json.loads(sh(repo, env, *stage, "--rebuild"))
    shutil.rmtree(shards)
    fresh = json.loads(sh(repo, env, *stage))
    assert rebuilt["dvc_md5"] == fresh["dvc_md5"], "a full rebuild is byte-deterministic"


def test_dvc_metrics_show_lists_the_test_scores_and_plots_show_draws_offline(dvc_repo):
    """`dvc metrics show` is what users compare runs by: the headline test figures only; counts,
    per-dimension lists, names and the promotion reason live in the stages' other outputs.
    `dvc plots show` writes a page that carries the Vega libraries itself: no script from the
    network (DVC's own page loads them from a CDN)."""
    repo, env = dvc_repo
    evaluate = repo / "outputs" / "evaluate"
    evaluate.mkdir(parents=True)
    (evaluate / "scores.json").write_text(json.dumps(
        {"neg_elbo": 20.1, "recon_nll": 15.0, "kl": 5.1, "iw_nll": 19.5, "active_units": 8}
    ))  # fmt: skip
    (evaluate / "metrics.json").write_text(json.dumps({"likelihood": "gaussian", "kl": 5.1}))
    (repo / "outputs" / "register").mkdir()
    (repo / "outputs" / "register" / "register.json").write_text(
        json.dumps({"decision": "challenger", "reason": "a long reason " * 10})
    )
    (repo / "data").mkdir(exist_ok=True)
    (repo / "data" / "stage.json").write_text(json.dumps({"samples": {"train": 1}}))
    shown = json.loads(sh(repo, env, "dvc", "metrics", "show", "--json"))
    (files,) = [d["data"] for d in shown.values()]
    assert list(files) == ["outputs/evaluate/scores.json"]
    values = files["outputs/evaluate/scores.json"]["data"]
    assert set(values) == {"neg_elbo", "recon_nll", "kl", "iw_nll", "active_units"}
    assert all(isinstance(v, (int, float)) for v in values.values())

    curve = repo / "outputs" / "train" / "learning_curve.csv"
    curve.parent.mkdir(parents=True)
    curve.write_text("epoch,train_neg_elbo,val_neg_elbo\n0,31.5,30.5\n1,26.0,25.2\n")
    sh(repo, env, "dvc", "plots", "show", "outputs/train/learning_curve.csv")
    page = (repo / "dvc_plots" / "index.html").read_text()
    scripts = re.findall(r"<script\b[^>]*>", page)
    assert scripts and not [tag for tag in scripts if "src" in tag], scripts
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page), "nothing fetched"
    assert 'var e="5.20.2"' in page and "vegaEmbed('#" in page and "val_neg_elbo" in page


def test_the_repos_dvc_config_turns_dvc_analytics_off():
    """Asked of DVC itself, in this repository: no usage reports from a clone's dvc commands."""
    repo = Path(__file__).resolve().parents[2]
    dvc = Path(sys.executable).parent / "dvc"
    out = subprocess.run(
        [str(dvc), "config", "core.analytics"], cwd=repo, capture_output=True, text=True,
        timeout=120, check=True, env={k: v for k, v in os.environ.items() if "DVC" not in k},
    )  # fmt: skip
    assert out.stdout.strip() == "false"
