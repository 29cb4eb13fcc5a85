"""How params.yaml and `--set` overrides are read and checked: every numeric setting's edge,
written out by hand (the specification, not read back from the schema: the first value outside
is refused in one line naming the key, the edge itself loads; negative counts, rates, sizes and
fractions are never a setting), what each refusal says (one line naming the key or line and what
to do), what overrides build, and where relative paths end up. Fast: no subprocesses, no data,
models sized on the meta device only."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipelines.errors import ParamsError, PipelineError
from pipelines.params import MAX_MODEL_PARAMETERS, ModelParams, Params
from pipelines.params_file import _short, apply_override, load_params, read_params_file

# (key, refused, accepted): the accepted value is the edge where there is one
EDGES = [
    ("data.size", 0, 1),
    ("data.size", 737_281, 737_280),
    ("data.image_size", [0, 8], [1, 8]),
    ("data.image_size", [8, -8], [8, 4096]),
    ("data.shard_bytes", 999, 1_000),
    ("data.shard_size", 0, 1),
    ("data.val_fraction", -0.01, 0.0),
    ("data.val_fraction", 1.0, 0.5),
    ("data.test_fraction", -0.2, 0.0),
    ("data.min_shards_per_split", 0, 1),
    ("data.shuffle_buffer", 0, 1),
    ("model.latent_dim", 0, 1),
    ("model.latent_dim", -4, 2),
    ("model.hidden", [64, -1], [64, 1]),
    ("model.conv_channels", [0], [1]),
    ("model.sigma", 0.0, 1e-6),
    ("model.sigma", -0.1, 0.1),
    ("model.sigma_min", 0.0, 1e-6),
    ("model.beta", -0.5, 0.0),
    ("model.mc_samples", 0, 1),
    ("model.mc_samples", 100_001, 100_000),
    ("model.free_bits", -0.1, 0.0),
    ("model.noise.gaussian_std", -0.1, 0.0),
    ("model.noise.mask_prob", -0.1, 0.0),
    ("model.noise.mask_prob", 1.0, 0.99),
    ("train.epochs", 0, 1),
    ("train.epochs", -3, 2),
    ("train.batch_size", 0, 1),
    ("train.lr", 0.0, 1e-9),
    ("train.lr", -1e-3, 1e-3),
    ("train.weight_decay", -1e-4, 0.0),
    ("train.kl_warmup_epochs", -1, 0),
    ("train.grad_clip_norm", 0.0, 1e-3),
    ("train.early_stopping_patience", 0, 1),
    ("train.min_delta", -0.1, 0.0),
    ("cluster.num_workers", 0, 1),
    ("cluster.cpus_per_worker", 0, 0.5),
    ("cluster.loader_workers", -1, 0),
    ("cluster.max_failures", -1, 0),
    ("evaluate.iw_k", -1, 0),
    ("evaluate.batch_size", 0, 1),
    ("register.margin", -0.1, 0.0),
    ("register.bootstrap_samples", 9, 10),
    ("register.confidence", 0.0, 0.5),
    ("register.confidence", 1.0, 0.99),
    ("register.mc_samples", 0, 1),
    ("register.lock_timeout_s", 0, 0.1),
    ("embed.batch_size", 0, 1),
    ("embed.concurrency", 0, 1),
    ("embed.cpus_per_actor", 0, 0.25),
    ("retention.keep_runs", 0, 1),
    ("retention.keep_challengers", -1, 0),
    ("retention.min_age_hours", -1, 0),
]


def _set(key: str, value) -> str:
    return f"{key}={value}"


@pytest.mark.parametrize(("key", "refused", "accepted"), EDGES, ids=lambda v: str(v))
def test_a_value_past_the_edge_is_refused_naming_the_key_and_the_edge_loads(
    key, refused, accepted, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ParamsError, match=rf"^params: {key}(\.\d+)?: ") as e:
        load_params(None, [_set(key, refused)])
    assert "\n" not in str(e.value)
    params = load_params(None, [_set(key, accepted)])
    section, *rest = key.split(".")
    node = getattr(params, {"register": "registry"}.get(section, section))  # an alias
    for name in rest:
        node = getattr(node, name)
    assert (list(node) if isinstance(node, tuple) else node) == accepted


def write(folder: Path, text: str, name: str = "params.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


# --- apply_override ---------------------------------------------------------------------------


def test_override_creates_missing_sections_and_parses_the_value_as_yaml():
    tree: dict = {}
    apply_override(tree, "model.hidden=[64, 32]")
    apply_override(tree, "data.binarize=true")
    assert tree == {"model": {"hidden": [64, 32]}, "data": {"binarize": True}}


def test_nested_override_keeps_the_section_siblings():
    tree = {"model": {"latent_dim": 2, "noise": {"gaussian_std": 0.1}}}
    apply_override(tree, "model.noise.mask_prob=0.5")
    assert tree == {"model": {"latent_dim": 2, "noise": {"gaussian_std": 0.1, "mask_prob": 0.5}}}


def test_override_value_may_itself_contain_equals_signs():
    tree: dict = {}
    apply_override(tree, "mlflow.tracking_uri=sqlite:///a.db?mode=ro&x=1")
    assert tree == {"mlflow": {"tracking_uri": "sqlite:///a.db?mode=ro&x=1"}}


def test_override_without_equals_sign_is_refused_with_the_expected_form():
    with pytest.raises(
        ParamsError, match=r"^override 'data\.size' must look like section\.key=value$"
    ):
        apply_override({}, "data.size")


def test_override_with_an_empty_key_is_refused():
    with pytest.raises(ParamsError, match=r"^override 'data\.\.size=1' has an empty key$"):
        apply_override({}, "data..size=1")


def test_override_through_a_plain_value_names_the_key_that_is_not_a_section():
    tree = {"data": {"size": 3}}
    with pytest.raises(ParamsError, match=r"^override 'data\.size\.x=1': size is not a section$"):
        apply_override(tree, "data.size.x=1")
    assert tree == {"data": {"size": 3}}


def test_override_with_unclosed_bracket_names_the_yaml_problem():
    with pytest.raises(
        ParamsError,
        match=r"^override 'model\.hidden=\[1, 2': value is not valid YAML \(line 1, column 6: "
        r"expected ',' or '\]', but got '<stream end>'\); quote strings, close brackets$",
    ):
        apply_override({}, "model.hidden=[1, 2")


def test_override_with_a_control_character_names_the_yaml_error_kind():
    # The YAML reader's error carries no `problem`: its kind is what the message can say.
    with pytest.raises(
        ParamsError,
        match=r"^override 'data\.path=\\x07': value is not valid YAML \(ReaderError\); "
        r"quote strings, close brackets$",
    ):
        apply_override({}, "data.path=\x07")


# --- read_params_file: the strict YAML loader -------------------------------------------------


def test_params_file_sections_are_returned_as_written(tmp_path):
    path = write(tmp_path, "data:\n  size: 5\nmodel:\n  hidden: [16]\n")
    assert read_params_file(path) == {"data": {"size": 5}, "model": {"hidden": [16]}}


def test_empty_params_file_reads_as_no_sections(tmp_path):
    assert read_params_file(write(tmp_path, "")) == {}
    assert load_params(write(tmp_path, "# only a comment\n")).data.size is None


def test_repeated_key_is_refused_naming_its_line_and_the_file(tmp_path):
    path = write(tmp_path, "data:\n  size: 1\n  size: 2\n")
    with pytest.raises(
        ParamsError,
        match=rf"^{re.escape(str(path))}: line 3: 'size' appears twice in one section, "
        r"and only one would be used; merge them$",
    ):
        read_params_file(path)


def test_repeated_section_is_refused(tmp_path):
    path = write(tmp_path, "data:\n  size: 1\nmodel: {}\ndata:\n  binarize: true\n")
    with pytest.raises(ParamsError, match=r": line 4: 'data' appears twice in one section"):
        read_params_file(path)


def test_yaml_merge_key_is_refused_naming_its_line(tmp_path):
    """PyYAML's own refusal named a constructor tag; ours names the line and the way out."""
    path = write(tmp_path, "train: &t\n  epochs: 3\nevaluate:\n  iw_k: 5\n  <<: *t\n")
    with pytest.raises(
        ParamsError,
        match=rf"^{re.escape(str(path))}: line 5: '<<' merge keys are not read in params "
        r"files; write the settings out in the section, or use --set / --preset for variations$",
    ):
        read_params_file(path)


def test_non_string_key_is_refused_naming_its_line(tmp_path):
    path = write(tmp_path, "data:\n  1: x\n")
    with pytest.raises(
        ParamsError,
        match=rf"^{re.escape(str(path))}: line 2: key 1 is not a name; params keys are words "
        r"such as data or shard_size$",
    ):
        read_params_file(path)


def test_sequence_key_is_shown_whole_in_the_refusal(tmp_path):
    path = write(tmp_path, "{[1, 2]: x}\n")
    with pytest.raises(ParamsError, match=r": line 1: key \[1, 2\] is not a name;"):
        read_params_file(path)


def test_invalid_yaml_is_refused_in_one_line_naming_the_file(tmp_path):
    path = write(tmp_path, "data: [1\n")
    with pytest.raises(ParamsError) as info:
        read_params_file(path)
    # Where, as an editor shows it, and what: PyYAML's first line said neither.
    assert re.fullmatch(
        rf"{re.escape(str(path))} is not valid YAML: line 2, column 1: expected ',' or '\]', "
        r"but got '<stream end>'",
        str(info.value),
    )


def test_unreadable_params_file_is_refused_naming_it(tmp_path):
    with pytest.raises(
        ParamsError, match=rf"^cannot read params file {re.escape(str(tmp_path))}: .*directory"
    ):
        read_params_file(tmp_path)


def test_params_file_that_is_a_list_is_refused(tmp_path):
    path = write(tmp_path, "- data\n- model\n")
    with pytest.raises(
        ParamsError,
        match=rf"^{re.escape(str(path))} must hold a mapping of sections "
        r"\(data, model, train, \.\.\.\)$",
    ):
        read_params_file(path)


# --- load_params -------------------------------------------------------------------------------


def test_default_params_file_is_params_yaml_in_the_current_folder(tmp_path, monkeypatch):
    write(tmp_path, "evaluate:\n  seed: 7\n")
    monkeypatch.chdir(tmp_path)
    params = load_params()
    assert params.evaluate.seed == 7
    assert params.root == tmp_path.resolve()


def test_missing_params_file_is_refused_saying_what_to_pass(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(
        ParamsError,
        match=rf"^params file {re.escape(str(path))} not found; pass --params with an existing "
        r"file$",
    ):
        load_params(path)


def test_root_is_the_params_file_folder_not_the_current_one(tmp_path):
    sub = tmp_path / "project"
    sub.mkdir()
    params = load_params(write(sub, "outputs_dir: out\n"))
    assert params.root == sub.resolve()
    assert params.resolve(params.outputs_dir) == sub.resolve() / "out"
    assert params.resolve("data/shards") == sub.resolve() / "data" / "shards"


def test_overrides_apply_on_top_of_the_file(tmp_path):
    path = write(tmp_path, "model:\n  latent_dim: 3\n  hidden: [16]\n")
    params = load_params(path, ["model.hidden=[8, 4]", "model.noise.mask_prob=0.25"])
    assert params.model.latent_dim == 3
    assert params.model.hidden == (8, 4)
    assert params.model.noise.mask_prob == 0.25


def test_invalid_value_is_refused_naming_the_key_and_the_value_given():
    with pytest.raises(
        ParamsError,
        match=r"^params: train\.epochs: Input should be greater than 0 \(got -1\); "
        r"fix params\.yaml or --set$",
    ):
        load_params(None, ["train.epochs=-1"])


def test_long_invalid_value_is_shortened_in_the_refusal():
    name = "my model " + "x" * 200
    with pytest.raises(ParamsError) as info:
        load_params(None, [f"register.name={name}"])
    shown = "'my model " + "x" * 67 + "..."  # 80 characters of its repr
    assert str(info.value).endswith(f"(got {shown}); fix params.yaml or --set")


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("train.num_workers", "cluster.num_workers"),
        ("train.use_gpu", "cluster.use_gpu"),
        ("train.ray_address", "cluster.address"),
    ],
)
def test_moved_train_key_is_refused_naming_its_new_place(old, new):
    with pytest.raises(
        ParamsError,
        match=rf"^params: {re.escape(old)} is now {re.escape(new)} \(Ray settings have their own "
        rf"section, cluster:\); move it there in params\.yaml or --set {re.escape(new)}=\.\.\.$",
    ):
        load_params(None, [f"{old}=2"])


def test_moved_key_in_the_params_file_is_refused(tmp_path):
    path = write(tmp_path, "train:\n  epochs: 3\n  num_workers: 2\n")
    with pytest.raises(
        ParamsError, match=r"^params: train\.num_workers is now cluster\.num_workers"
    ):
        load_params(path)


@pytest.mark.parametrize(
    ("override", "where"),
    [
        (r'data.path="a\0b"', "data.path"),
        (r'outputs_dir="out\0"', "outputs_dir"),
        (r'model.noise.mask_prob="\0"', "model.noise.mask_prob"),
        (r'data.image_size=[8, "\0"]', "data.image_size"),
    ],
)
def test_nul_byte_is_refused_naming_the_full_key(override, where):
    with pytest.raises(
        ParamsError, match=rf"^params: {re.escape(where)} holds a NUL byte; remove it$"
    ):
        load_params(None, [override])


def test_nul_byte_in_the_params_file_is_refused(tmp_path):
    path = write(tmp_path, 'cluster:\n  storage_path: "runs\\0x"\n')
    with pytest.raises(ParamsError, match=r"^params: cluster\.storage_path holds a NUL byte"):
        load_params(path)


def test_outputs_dir_at_the_workspace_is_refused_naming_the_setting(tmp_path):
    path = write(tmp_path, "outputs_dir: .\n")
    root = tmp_path.resolve()
    with pytest.raises(
        PipelineError,
        match=rf"^outputs_dir is {re.escape(str(root))}, the workspace {re.escape(str(root))} "
        r"or one of its parents;",
    ):
        load_params(path)


def test_local_storage_path_at_a_parent_of_the_workspace_is_refused(tmp_path):
    sub = tmp_path / "project"
    sub.mkdir()
    path = write(sub, "cluster:\n  storage_path: ..\n")
    with pytest.raises(
        PipelineError, match=rf"^cluster\.storage_path is {re.escape(str(tmp_path.resolve()))}, "
    ):
        load_params(path)


def test_remote_storage_path_is_not_checked_as_a_local_folder(tmp_path):
    # As a local path, s3://bucket/.dvc/runs would name a repository's .dvc folder.
    params = load_params(None, ["cluster.storage_path=s3://bucket/.dvc/runs"])
    assert params.cluster.storage_path == "s3://bucket/.dvc/runs"


# --- Params.resolve, _short ---------------------------------------------------------------------


def test_resolve_keeps_absolute_paths_as_written(tmp_path):
    params = Params(root=tmp_path)
    assert params.resolve("/data/../shards") == Path("/data/../shards")
    assert params.resolve(tmp_path / "a") == tmp_path / "a"


def test_resolve_makes_relative_paths_absolute_under_root(tmp_path):
    params = Params(root=tmp_path)
    assert params.resolve("a/../b") == tmp_path.resolve() / "b"
    assert params.resolve("a").is_absolute()


def test_short_keeps_a_repr_of_80_characters_and_cuts_longer_ones_to_80():
    assert _short("x" * 78) == "'" + "x" * 78 + "'"  # repr: 80 characters
    assert _short("x" * 79) == "'" + "x" * 76 + "..."  # repr: 81 characters
    assert len(_short("x" * 500)) == 80
    assert _short(-1) == "-1"
    assert _short(None) == "None"


# --- ModelParams.to_config ------------------------------------------------------------------------


def test_model_config_carries_the_params_and_the_input_shape():
    config = ModelParams(kind="beta_vae", latent_dim=3, hidden=[16, 8], beta=0.5).to_config([12])
    assert config.input_shape == (12,)
    assert (config.latent_dim, config.hidden, config.beta) == (3, (16, 8), 0.5)


def test_model_of_exactly_the_weight_limit_is_accepted_and_one_row_more_refused():
    # An autoencoder 19017 -> 26289 -> 1 -> 26289 -> 19017 has exactly 1,000,000,000 weights;
    # one more input dimension adds 2 * 26289 + 1 = 52,579.
    model = ModelParams(kind="ae", hidden=[26289], latent_dim=1)
    assert model.to_config((19017,)).input_shape == (19017,)
    assert MAX_MODEL_PARAMETERS == 1_000_000_000
    with pytest.raises(
        ParamsError,
        match=r"^model: 1,000,052,579 weights for input \(19018,\) \(model\.hidden \[26289\], "
        r"model\.latent_dim 1\), over the 1,000,000,000 this pipeline trains; "
        r"make model\.hidden smaller$",
    ):
        model.to_config((19018,))


# -- issue 31's probes: what once crashed, hung or ran on defaults without a word ---------------


def _bomb(levels: int) -> str:
    """The 'billion laughs': each level's list names the previous level's ten times."""
    lines = ["x:", "  l0: &l0 [a, a, a, a, a, a, a, a, a, a]"]
    for i in range(1, levels):
        lines.append(f"  l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    "overrides,says",
    [
        (["root=/tmp"], "root is not a setting"),
        (["model.hidden=&a [*a]"], "refers to itself"),
        (["train.seed=99999999999999999999999"], "too large"),
        (["embed.batch_size=99999999999999999999999"], "too large"),
        (["train.seed=-1"], "train.seed"),
        (["evaluate.seed=4294967296"], "evaluate.seed"),
        (["register.seed=4294967296"], "register.seed"),
        (["data.shards_dir=foo://b/x"], "unknown URL scheme 'foo'"),
        (["data.shards_dir=s3://"], "names no bucket"),
        (["cluster.storage_path=zz://q"], "unknown URL scheme 'zz'"),
        (["embed.output=s3:///"], "names no bucket"),
    ],
)
def test_probes_that_crashed_are_refused_in_one_line(overrides, says):
    with pytest.raises(ParamsError) as err:
        load_params(None, overrides)
    assert says in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_edges_of_the_new_limits_load():
    p = load_params(None, ["train.seed=4294967295", "evaluate.seed=0", "data.size=1000"])
    assert p.train.seed == 2**32 - 1
    shared = load_params(None, ["model.hidden=[8, 8]", "data.shards_dir=s3://bucket/prefix"])
    assert shared.data.shards_dir == "s3://bucket/prefix"


def test_a_missing_fsspec_backend_names_the_package():
    import importlib.util

    if importlib.util.find_spec("gcsfs") is not None:  # installed: the URL is simply taken
        assert load_params(None, ["data.shards_dir=gs://bucket/x"]).data.shards_dir
        return
    with pytest.raises(ParamsError) as err:
        load_params(None, ["data.shards_dir=gs://bucket/x"])
    assert "gcsfs" in str(err.value) and "pip install" in str(err.value)


def test_nested_aliases_are_capped_in_seconds_and_small_ones_still_read(tmp_path):
    import time

    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(_bomb(9))  # 10**9 values once expanded
    started = time.monotonic()
    with pytest.raises(ParamsError) as err:
        read_params_file(bomb)
    assert time.monotonic() - started < 5
    assert "expand to more than" in str(err.value) and "\n" not in str(err.value)
    small = tmp_path / "small.yaml"
    small.write_text("model:\n  hidden: &h [16, 16]\n")
    assert read_params_file(small) == {"model": {"hidden": [16, 16]}}


def test_a_tab_is_named_with_its_line_and_column(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("model:\n\tlatent_dim: 3\n")
    with pytest.raises(ParamsError) as err:
        read_params_file(path)
    assert "line 2, column 1" in str(err.value) and "never tabs" in str(err.value)


def test_a_params_path_that_is_a_folder_is_an_error_never_the_defaults(tmp_path, monkeypatch):
    from pipelines.cli import find_params

    (tmp_path / "params.yaml").mkdir()
    with pytest.raises(ParamsError, match="is a directory, not a file"):
        load_params(tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    # Found by default too: not skipped for a parent's params.yaml or the built-in defaults.
    assert find_params(tmp_path) == tmp_path / "params.yaml"
