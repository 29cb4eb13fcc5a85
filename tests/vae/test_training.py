"""The training loop: it learns, it is reproducible, and it fails loudly."""

from __future__ import annotations

import json

import pytest
import torch

from vae import (
    ModelConfig,
    NonFiniteLossError,
    TrainConfig,
    TrainingState,
    build_model,
    evaluate,
    fit,
    train_one_epoch,
)
from vae.train import kl_weight_for_epoch


def _small_vae() -> ModelConfig:
    return ModelConfig(input_shape=(1, 8, 8), latent_dim=4, hidden=(64,))


def test_training_on_digits_lowers_held_out_neg_elbo(digits_split):
    train, val, test = digits_split
    torch.manual_seed(0)
    model = build_model(_small_vae())
    before = evaluate(model, test).neg_elbo
    result = fit(model, train, val, TrainConfig(epochs=8, batch_size=64))
    after = evaluate(model, test).neg_elbo
    assert after < before - 100, f"-ELBO went from {before:.1f} to {after:.1f}"
    assert result.best_epoch >= 0
    assert result.history[-1].val_neg_elbo < result.history[0].val_neg_elbo


def test_same_seed_gives_bit_identical_metrics_on_cpu(digits_split):
    train, val, test = digits_split

    def run() -> tuple[list[float], dict]:
        model = build_model(_small_vae(), seed=7)
        res = fit(model, train[:400], val, TrainConfig(epochs=3, batch_size=50, seed=7))
        return [r.val_neg_elbo for r in res.history], evaluate(model, test, iw_k=20).to_dict()

    assert run() == run()


def test_different_seeds_give_different_models(digits_split):
    train, val, _ = digits_split
    losses = []
    for seed in (1, 2):
        res = fit(build_model(_small_vae()), train[:300], val, TrainConfig(epochs=1, seed=seed))
        losses.append(res.history[0].val_neg_elbo)
    assert losses[0] != losses[1]


def test_model_keeps_the_best_validation_weights(digits_split):
    train, val, _ = digits_split
    model = build_model(_small_vae())
    res = fit(model, train, val, TrainConfig(epochs=6, batch_size=64))
    ev = evaluate(model, val, seed=0)
    best = min(r.val_neg_elbo for r in res.history)
    assert res.best_val_neg_elbo == best
    # The reloaded best weights score the best epoch's value up to MC sampling noise.
    assert abs(ev.neg_elbo - best) < 0.05 * abs(best) + 2, (ev.neg_elbo, best)


def _decisions(state: TrainingState, val_losses: list[float]) -> list[tuple]:
    """(epoch, KL weight, improved, should_stop) for each epoch the state lets run."""
    out = []
    for epoch, val in zip(state.remaining_epochs(), val_losses, strict=False):
        weight = state.kl_weight(epoch)
        out.append((epoch, weight, state.update(val), state.should_stop))
    return out


def test_early_stopping_stops_after_patience_epochs_without_progress():
    state = TrainingState(TrainConfig(epochs=10, early_stopping_patience=2))
    assert state.update(10.0)
    assert not state.update(10.5)
    assert not state.should_stop
    assert not state.update(11.0)
    assert state.should_stop and state.finished
    assert (state.best_epoch, state.best_val_neg_elbo) == (0, 10.0)


def test_improvement_smaller_than_min_delta_counts_as_no_progress():
    state = TrainingState(TrainConfig(epochs=10, early_stopping_patience=1, min_delta=0.5))
    assert state.update(10.0)
    assert not state.update(9.6)
    assert state.should_stop and state.best_val_neg_elbo == 10.0


def test_warmup_epochs_are_never_best_and_do_not_use_up_patience():
    cfg = TrainConfig(epochs=10, kl_warmup_epochs=3, early_stopping_patience=1)
    decisions = _decisions(TrainingState(cfg, beta=2.0), [5.0, 4.0, 9.0, 8.0, 8.5, 1.0])
    assert [d[1] for d in decisions] == [2 / 3, 4 / 3, 2.0, 2.0, 2.0]
    assert [d[2] for d in decisions] == [False, False, True, True, False]
    assert [d[3] for d in decisions] == [False, False, False, False, True]


def test_training_state_stops_at_the_configured_number_of_epochs():
    state = TrainingState(TrainConfig(epochs=3, early_stopping_patience=None))
    assert [e for e, *_ in _decisions(state, [float(v) for v in range(10, 0, -1)])] == [0, 1, 2]
    assert state.finished and not state.should_stop


@pytest.mark.parametrize("pause_after", range(9))
def test_state_resumed_from_its_dict_mid_run_decides_like_an_uninterrupted_run(pause_after):
    cfg = TrainConfig(epochs=12, kl_warmup_epochs=2, early_stopping_patience=3, min_delta=0.1)
    vals = [9.0, 8.0, 7.0, 6.95, 6.5, 6.6, 6.45, 6.7, 6.8, 6.9, 5.0, 4.0]
    uninterrupted = _decisions(TrainingState(cfg, beta=1.5), vals)
    first = TrainingState(cfg, beta=1.5)
    before = _decisions(first, vals[:pause_after])
    saved = json.loads(json.dumps(first.to_dict(), allow_nan=False))  # strict JSON
    resumed = TrainingState.from_dict(saved, cfg, beta=1.5)
    assert resumed == first
    after = _decisions(resumed, vals[resumed.epoch :])
    assert before + after == uninterrupted
    # 6.95 and 6.45 miss min_delta: the run stops 3 epochs after its best epoch, 4.
    assert uninterrupted[-1] == (7, 1.5, False, True)


def test_resumed_state_runs_the_extra_epochs_a_larger_config_allows():
    done = TrainingState(TrainConfig(epochs=2, early_stopping_patience=None))
    _decisions(done, [3.0, 2.0])
    assert done.finished
    more = TrainingState.from_dict(done.to_dict(), TrainConfig(epochs=4))
    assert next(more.remaining_epochs()) == 2 and more.best_epoch == 1


def test_epoch_loop_that_skips_update_fails_instead_of_repeating_the_epoch():
    state = TrainingState(TrainConfig(epochs=3))
    with pytest.raises(
        RuntimeError,
        match=r"^epoch 0 ended without TrainingState.update\(val_neg_elbo\); call it once at the "
        r"end of every epoch$",
    ):
        for _ in state.remaining_epochs():
            pass


def test_fit_stops_early_patience_epochs_after_the_last_improvement(digits_split):
    train, val, _ = digits_split
    # A min_delta no epoch can beat: only the first full-weight epoch (1) counts as progress.
    cfg = TrainConfig(epochs=10, kl_warmup_epochs=2, early_stopping_patience=2, min_delta=1e9)
    res = fit(build_model(_small_vae()), train[:200], val, cfg)
    assert [r.epoch for r in res.history] == [0, 1, 2, 3]
    assert [r.kl_weight for r in res.history] == [0.5, 1.0, 1.0, 1.0]
    assert res.stopped_early and res.best_epoch == 1
    assert res.best_val_neg_elbo == res.history[1].val_neg_elbo


def test_kl_warmup_rises_linearly_to_beta():
    weights = [kl_weight_for_epoch(e, beta=2.0, warmup_epochs=4) for e in range(6)]
    assert weights == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]
    assert kl_weight_for_epoch(0, beta=1.0, warmup_epochs=0) == 1.0
    state = TrainingState(TrainConfig(kl_warmup_epochs=4), beta=2.0)
    assert [state.kl_weight(e) for e in range(6)] == weights


def test_nan_loss_stops_training_naming_epoch_and_step():
    model = build_model(ModelConfig(input_shape=(4,), latent_dim=2, hidden=(8,)))
    with torch.no_grad():
        model.decoder.net[-1].bias.fill_(float("nan"))
    opt = torch.optim.Adam(model.parameters())
    batches = [torch.rand(8, 4)]
    with pytest.raises(NonFiniteLossError, match="epoch 3, step 0"):
        train_one_epoch(model, opt, batches, epoch=3, kl_weight=1.0)


def test_gradient_clipping_bounds_the_update_norm():
    torch.manual_seed(0)
    model = build_model(ModelConfig(input_shape=(4,), latent_dim=2, hidden=(8,)))
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    train_one_epoch(model, opt, [torch.rand(8, 4) * 100], 0, 1.0, TrainConfig(grad_clip_norm=1e-3))
    step = torch.sqrt(
        sum(((p - b) ** 2).sum() for p, b in zip(model.parameters(), before, strict=True))
    )
    assert step <= 1e-3 * 1.0001


def test_seeding_fixes_pythons_numpys_and_torchs_random_numbers():
    import random

    import numpy as np

    from vae.train import seed_everything

    draws = []
    for _ in range(2):
        seed_everything(123)
        draws.append((random.random(), float(np.random.rand()), float(torch.rand(1))))
    assert draws[0] == draws[1]
    random.seed(123)
    np.random.seed(123)
    assert draws[0][:2] == (random.random(), float(np.random.rand()))


def test_the_optimizer_uses_the_configured_learning_rate_and_weight_decay():
    from vae import ModelConfig, TrainConfig, build_model
    from vae.train import make_optimizer

    model = build_model(ModelConfig(input_shape=(6,), latent_dim=2, hidden=(4,)))
    opt = make_optimizer(model, TrainConfig(lr=0.0123, weight_decay=0.0456))
    (group,) = opt.param_groups
    assert (group["lr"], group["weight_decay"]) == (0.0123, 0.0456)


def test_shuffled_batches_cover_every_row_once_in_the_generators_order():
    from vae.train import shuffled_batches

    x = torch.arange(10).unsqueeze(1)
    state = torch.random.get_rng_state()
    batches = list(shuffled_batches(x, 4, torch.Generator().manual_seed(7)))
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is not used
    assert [len(b) for b in batches] == [4, 4, 2]
    order = torch.cat(batches).squeeze(1)
    assert torch.equal(order, torch.randperm(10, generator=torch.Generator().manual_seed(7)))
    again = torch.cat(list(shuffled_batches(x, 4, torch.Generator().manual_seed(7)))).squeeze(1)
    other = torch.cat(list(shuffled_batches(x, 4, torch.Generator().manual_seed(8)))).squeeze(1)
    assert torch.equal(again, order) and not torch.equal(other, order)


def test_fit_refuses_empty_data_but_trains_on_a_single_example():
    from vae import DataError, ModelConfig, TrainConfig, build_model, fit

    model = build_model(ModelConfig(input_shape=(6,), latent_dim=2, hidden=(4,)), seed=0)
    cfg = TrainConfig(epochs=1, batch_size=4)
    one = torch.rand(1, 6)
    for train_x, val_x in ((one[:0], one), (one, one[:0])):
        with pytest.raises(
            DataError, match=r"^training and validation data must both be non-empty$"
        ):
            fit(model, train_x, val_x, cfg)
    assert len(fit(model, one, one, cfg).history) == 1


def test_fit_restores_exactly_the_best_epochs_weights_and_reports_every_epoch(digits_split):
    """A learning rate high enough that validation gets worse after a best epoch in the middle:
    the model ends holding that epoch's weights bit for bit, not the last epoch's."""
    import copy

    train, val, _ = digits_split
    model = build_model(_small_vae(), seed=0)
    seen, weights = [], []

    def on_epoch_end(record):
        seen.append(record)
        weights.append(copy.deepcopy(model.state_dict()))

    cfg = TrainConfig(epochs=6, batch_size=8, lr=0.05, early_stopping_patience=None)
    res = fit(model, train[:200], val, cfg, on_epoch_end=on_epoch_end)
    assert seen == res.history and len(seen) == 6
    assert 0 < res.best_epoch < 5, "the setting must put the best epoch in the middle"
    assert res.best_val_neg_elbo == min(r.val_neg_elbo for r in res.history)
    assert res.best_val_neg_elbo == res.history[res.best_epoch].val_neg_elbo
    assert not res.stopped_early
    final = model.state_dict()
    assert all(torch.equal(final[k], v) for k, v in weights[res.best_epoch].items())
    assert not all(torch.equal(final[k], v) for k, v in weights[-1].items())
    assert all(torch.equal(res.best_state[k], v) for k, v in weights[res.best_epoch].items())


def test_fit_warms_the_kl_up_to_the_models_beta():
    model = build_model(
        ModelConfig(input_shape=(6,), latent_dim=2, hidden=(4,), kind="beta_vae", beta=4.0), seed=0
    )
    cfg = TrainConfig(epochs=3, batch_size=4, kl_warmup_epochs=2)
    res = fit(model, torch.rand(8, 6), torch.rand(4, 6), cfg)
    assert [r.kl_weight for r in res.history] == [2.0, 4.0, 4.0]


def test_fit_shuffles_with_a_generator_seeded_from_the_config(monkeypatch):
    import vae.train

    seeds = []
    original = vae.train.shuffled_batches

    def spy(x, batch_size, generator):
        seeds.append(generator.initial_seed())
        return original(x, batch_size, generator)

    monkeypatch.setattr(vae.train, "shuffled_batches", spy)
    model = build_model(ModelConfig(input_shape=(6,), latent_dim=2, hidden=(4,)), seed=0)
    fit(model, torch.rand(8, 6), torch.rand(4, 6), TrainConfig(epochs=2, batch_size=4, seed=1234))
    assert seeds == [1234, 1234]


def test_fit_validates_in_batches_of_the_configured_size(monkeypatch):
    import vae.train

    sizes = []
    original = vae.train.validate

    def spy(model, batches):
        batches = list(batches)
        sizes.append([len(b) for b in batches])
        return original(model, batches)

    monkeypatch.setattr(vae.train, "validate", spy)
    model = build_model(ModelConfig(input_shape=(6,), latent_dim=2, hidden=(4,)), seed=0)
    fit(model, torch.rand(8, 6), torch.rand(10, 6), TrainConfig(epochs=1, batch_size=4))
    assert sizes == [[4, 4, 2]]


class _ConfiglessModel(torch.nn.Module):
    """Any module whose forward takes kl_weight and returns loss, recon_loss and kl can be fit
    (no config: beta 1). It notes the KL weight and loss of every training step, and its loss
    turns NaN from the given training step on."""

    def __init__(self, nan_from_step: int | None = None) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.steps: list[tuple[float, float]] = []
        self.nan_from_step = nan_from_step

    def forward(self, x, kl_weight=None):
        from types import SimpleNamespace

        recon = ((x.flatten(1) - self.w) ** 2).sum(-1)
        kl = torch.ones(x.shape[0])
        loss = (recon + kl_weight * kl).mean()
        if self.training:
            if self.nan_from_step is not None and len(self.steps) >= self.nan_from_step:
                loss = loss * float("nan")
            self.steps.append((kl_weight, loss.item()))
        return SimpleNamespace(loss=loss, recon_loss=recon, kl=kl)


def test_fit_trains_a_model_without_a_config_warming_up_to_beta_one():
    model = _ConfiglessModel()
    cfg = TrainConfig(epochs=3, batch_size=4, kl_warmup_epochs=2)
    res = fit(model, torch.rand(8, 2), torch.rand(4, 2), cfg)
    assert [r.kl_weight for r in res.history] == [0.5, 1.0, 1.0]
    assert [w for w, _ in model.steps] == [0.5, 0.5, 1.0, 1.0, 1.0, 1.0], "two steps an epoch"
    for epoch, record in enumerate(res.history):  # equal batches: the mean of their losses
        losses = [loss for _, loss in model.steps[2 * epoch : 2 * epoch + 2]]
        assert record.train_loss == pytest.approx(sum(losses) / 2, rel=1e-6)


def test_fit_names_the_epoch_where_the_loss_became_nan():
    model = _ConfiglessModel(nan_from_step=3)  # epoch 1's second step
    with pytest.raises(NonFiniteLossError, match=r"^loss became nan at epoch 1, step 1; "):
        fit(model, torch.rand(8, 2), torch.rand(4, 2), TrainConfig(epochs=3, batch_size=4))


def test_an_equal_validation_value_is_no_improvement():
    state = TrainingState(TrainConfig(epochs=5, early_stopping_patience=2))
    assert [state.update(v) for v in (5.0, 5.0, 5.0)] == [True, False, False]
    assert state.best_epoch == 0 and state.should_stop
