"""One training step, checked against the same step written out by hand: the loss with the
epoch's KL weight, clipping of the gradient norm, mixed precision and the loss scaler, the
finiteness check a distributed caller supplies, and the per-example mean an epoch returns."""

from __future__ import annotations

import copy

import pytest
import torch

from vae import DataError, ModelConfig, NonFiniteLossError, TrainConfig, build_model
from vae.train import StepRuntime, train_one_epoch


def _model():
    return build_model(ModelConfig(input_shape=(4,), latent_dim=2, hidden=(8,)), seed=0)


def _by_hand(model, batches, kl_weight, lr, clip, autocast=None):
    """SGD steps written out: loss under the KL weight, backward, norm clipping, p -= lr * g."""
    model.train()
    for x in batches:
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            loss = model(x, kl_weight=kl_weight).loss
        grads = torch.autograd.grad(loss, list(model.parameters()))
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
        scale = min(1.0, clip / (float(norm) + 1e-6)) if clip is not None else 1.0
        with torch.no_grad():
            for p, g in zip(model.parameters(), grads, strict=True):
                p -= lr * scale * g


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _assert_same(model, reference):
    """Equal up to float32 rounding, which threaded reductions may order differently."""
    for got, want in zip(_params(model), _params(reference), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def _differ(a: list, b: list) -> bool:
    return any(not torch.allclose(x, y) for x, y in zip(a, b, strict=True))


def _run_both(batches, kl_weight=0.5, lr=0.1, clip=None, runtime=None, autocast=None):
    model = _model()
    reference = copy.deepcopy(model)
    torch.manual_seed(7)
    _by_hand(reference, batches, kl_weight, lr, clip, autocast)
    torch.manual_seed(7)
    result = train_one_epoch(
        model, torch.optim.SGD(model.parameters(), lr=lr), batches, epoch=0,
        kl_weight=kl_weight, cfg=TrainConfig(grad_clip_norm=clip), runtime=runtime,
    )  # fmt: skip
    return model, reference, result


@pytest.mark.parametrize("clip", [None, 1e-2, 1e3])
def test_a_step_is_the_loss_gradient_under_the_kl_weight_clipped_to_the_configured_norm(clip):
    batches = [torch.rand(8, 4) * 5, torch.rand(5, 4) * 5]
    model, reference, _ = _run_both(batches, clip=clip)
    _assert_same(model, reference)
    if clip == 1e-2:  # the clip was active: an unclipped step lands elsewhere
        unclipped, _, _ = _run_both(batches, clip=None)
        assert _differ(_params(model), _params(unclipped))


def test_the_kl_weight_given_is_the_one_trained_on():
    batches = [torch.rand(8, 4)]
    half, _, (loss_half, _) = _run_both(batches, kl_weight=0.5)
    full, _, (loss_full, _) = _run_both(batches, kl_weight=1.0)
    assert loss_half < loss_full
    assert _differ(_params(half), _params(full))


def test_a_loss_scaler_changes_nothing_but_the_arithmetic_of_the_backward_pass():
    """fp16 training on CUDA scales the loss; gradients are unscaled before clipping, so the
    clipped step is the plain one. The scaler runs on CPU too, which makes this testable here."""
    batches = [torch.rand(8, 4) * 5, torch.rand(6, 4) * 5]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=1)
    scaled, reference, _ = _run_both(batches, clip=1e-2, runtime=StepRuntime(scaler=scaler))
    _assert_same(scaled, reference)
    assert scaler.get_scale() == 2.0**14, "updated after each of the two steps"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_precision_runs_the_forward_pass_under_autocast_and_only_when_asked(dtype):
    batches = [torch.rand(8, 4)]
    half, reference, (loss, _) = _run_both(
        batches, runtime=StepRuntime(autocast_dtype=dtype), autocast=dtype
    )
    _assert_same(half, reference)
    fp32, _, (loss32, _) = _run_both(batches)
    assert loss != loss32, "half-precision arithmetic gives another loss than fp32"
    assert _differ(_params(half), _params(fp32))


def test_the_epoch_returns_the_per_example_mean_of_the_batch_losses_and_the_example_count():
    model = _model()
    batches = [torch.rand(8, 4), torch.rand(2, 4)]
    seen = []
    original = model.forward

    def forward(x, **kw):
        out = original(x, **kw)
        seen.append((float(out.loss.detach()), x.shape[0]))
        return out

    model.forward = forward
    mean, count = train_one_epoch(
        model, torch.optim.SGD(model.parameters(), lr=0.0), batches, 0, 1.0
    )
    assert count == 10
    assert mean == pytest.approx(sum(loss * n for loss, n in seen) / 10, rel=1e-6)
    assert mean != pytest.approx(sum(loss for loss, _ in seen) / 2, rel=1e-6)


def test_an_epoch_without_batches_is_a_data_error_naming_the_epoch():
    model = _model()
    with pytest.raises(DataError, match=r"^epoch 4 saw no training batches; check the training"):
        train_one_epoch(model, torch.optim.SGD(model.parameters(), lr=0.1), [], 4, 1.0)


def test_a_loss_another_rank_calls_non_finite_stops_this_rank_at_the_same_step():
    """all_finite is the distributed caller's: a finite local loss still stops when it says so,
    and it sees the loss detached from the graph."""
    model = _model()
    before = _params(model)
    asked = []

    def all_finite(loss):
        asked.append(loss)
        return len(asked) < 2  # the second step's loss is bad on some other rank

    batches = [torch.rand(8, 4), torch.rand(8, 4)]
    with pytest.raises(
        NonFiniteLossError,
        match=r"^loss became [0-9.]+ at epoch 2, step 1; lower the learning rate, enable grad "
        r"clipping, or check the data for extreme values$",
    ):
        train_one_epoch(
            model, torch.optim.SGD(model.parameters(), lr=0.1), batches, 2, 1.0,
            runtime=StepRuntime(all_finite=all_finite),
        )  # fmt: skip
    assert all(not loss.requires_grad and loss.shape == (1,) for loss in asked)  # one part
    assert _differ(_params(model), before), "step 0 was taken"


def test_without_a_config_there_is_no_clipping():
    batches = [torch.rand(8, 4) * 100]
    model = _model()
    reference = copy.deepcopy(model)
    torch.manual_seed(7)
    _by_hand(reference, batches, 1.0, 0.1, clip=None)
    torch.manual_seed(7)
    train_one_epoch(model, torch.optim.SGD(model.parameters(), lr=0.1), batches, 0, 1.0)
    _assert_same(model, reference)
