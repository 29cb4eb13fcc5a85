"""What the model and evaluation accept as data: batch shapes, dtypes, and the forms a loader
yields (tensors, (x, ...) tuples, {'x': ...} dicts), with the whole refusal a user reads."""

from __future__ import annotations

import pytest
import torch

from vae import DataError, ModelConfig, build_model, iter_batches


def _image_model():
    return build_model(ModelConfig(input_shape=(1, 8, 8), latent_dim=2, hidden=(4,)), seed=0)


@pytest.mark.parametrize(
    ("shape", "got"),
    [
        ((4, 1, 7, 7), "(1, 7, 7)"),
        ((4, 63), "(63,)"),
        ((64,), "(64,)"),
        ((4, 2, 8, 8), "(2, 8, 8)"),
    ],
)
def test_a_batch_of_the_wrong_shape_is_refused_with_the_shape_to_pass(shape, got):
    with pytest.raises(DataError) as info:
        _image_model().prepare_input(torch.rand(*shape))
    assert str(info.value) == (
        f"data has example shape {got} but the model expects (1, 8, 8) (64 values); pass "
        "batches of shape (B, 1, 8, 8) or set model.input_shape to match the data"
    )


@pytest.mark.parametrize("shape", [(3, 64), (3, 1, 8, 8), (3, 8, 8), (3, 4, 16)])
def test_any_batch_with_the_models_number_of_values_per_example_takes_its_shape(shape):
    x = torch.rand(*shape)
    prepared = _image_model().prepare_input(x)
    assert prepared.shape == (3, 1, 8, 8)
    assert torch.equal(prepared.flatten(1), x.flatten(1))


def test_integer_pixels_are_read_as_floats_with_the_same_values():
    x = torch.randint(0, 2, (3, 64))
    prepared = _image_model().prepare_input(x)
    assert prepared.dtype == torch.float32
    assert torch.equal(prepared.flatten(1), x.float())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_refused(bad):
    x = torch.rand(3, 64)
    x[2, 5] = bad
    with pytest.raises(DataError) as info:
        _image_model().prepare_input(x)
    assert str(info.value) == "data contains NaN or infinite values; clean or re-stage the data"


def test_a_tensor_is_cut_into_batches_of_the_given_size_or_kept_whole():
    x = torch.arange(10).unsqueeze(1)
    assert [b.squeeze(1).tolist() for b in iter_batches(x, 4)] == [
        [0, 1, 2, 3],
        [4, 5, 6, 7],
        [8, 9],
    ]
    (whole,) = iter_batches(x)
    assert torch.equal(whole, x)
    assert list(iter_batches(x[:0])) == []


def test_loader_items_may_be_tensors_tuples_lists_or_dicts_holding_x_first():
    a, b, c, d = (torch.full((2, 3), float(i)) for i in range(4))
    label = torch.zeros(2)
    items = [a, (b, label), [c, label], {"y": label, "x": d}]
    got = list(iter_batches(iter(items)))
    assert len(got) == 4
    assert all(torch.equal(g, w) for g, w in zip(got, (a, b, c, d), strict=True))
