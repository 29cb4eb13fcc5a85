"""Every numeric setting's edge, written out by hand (the specification, not read back from the
schema): the first value outside is refused in one line naming the key, the edge itself loads.
Negative counts, rates, sizes and fractions are never a setting."""

from __future__ import annotations

import pytest

from pipelines.errors import ParamsError
from pipelines.params import load_params

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
