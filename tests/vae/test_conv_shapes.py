"""The conv encoder/decoder fit 8x8, 28x28 and 64x64 images, grey and RGB, one stride-2 layer per
conv_channels entry; the two-layer nets of models already registered keep their weights."""

from __future__ import annotations

import json

import pytest
import torch

from vae import ConfigError, ModelConfig, build_model, load_model, save_model
from vae.conv_layout import default_conv_channels
from vae.networks import build_decoder, build_encoder

# encoder/decoder weights of ModelConfig(arch="conv", input_shape=(1, 8, 8), latent_dim=3) as
# the fixed two-layer nets named them: a saved model's safetensors must load into today's.
TWO_LAYER_8X8 = {
    "encoder.body.0.weight": (32, 1, 4, 4),
    "encoder.body.0.bias": (32,),
    "encoder.body.2.weight": (64, 32, 4, 4),
    "encoder.body.2.bias": (64,),
    "encoder.body.5.weight": (256, 256),
    "encoder.body.5.bias": (256,),
    "decoder.fc.0.weight": (256, 3),
    "decoder.fc.0.bias": (256,),
    "decoder.fc.2.weight": (256, 256),
    "decoder.fc.2.bias": (256,),
    "decoder.deconv.0.weight": (64, 32, 4, 4),
    "decoder.deconv.0.bias": (32,),
    "decoder.deconv.2.weight": (32, 1, 4, 4),
    "decoder.deconv.2.bias": (1,),
}
# The 64x64x3 automatic net: 4 halvings to a 4x4x64 grid, so each Linear on the grid has
# 1,024 x 256 weights; with the convs about 0.76M in all. The fixed two-layer net left a
# 16x16x64 grid (16,384 x 256 per side, 8.5M in all): 1M fails any return to a large grid.
MAX_PARAMETERS_64X64X3 = 1_000_000


def _conv(shape: tuple[int, int, int], channels: tuple[int, ...] = ()) -> ModelConfig:
    return ModelConfig(arch="conv", input_shape=shape, latent_dim=3, conv_channels=channels)


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (1, 64, 64), (3, 64, 64)])
@pytest.mark.parametrize("channels", [(), (32, 64)], ids=["automatic", "two_layers"])
def test_conv_vae_reconstructs_images_of_its_input_shape(shape, channels):
    torch.manual_seed(0)
    model = build_model(_conv(shape, channels))
    x = torch.rand(4, *shape)
    out = model(x)
    out.loss.backward()
    assert out.recon_x.shape == x.shape
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize(
    "shape,channels,grid",
    [
        ((1, 8, 8), (32,), 4),
        ((1, 28, 28), (32, 32), 7),
        ((1, 64, 64), (32, 32, 64, 64), 4),
        ((3, 64, 64), (32, 32, 64, 64), 4),
        ((3, 256, 256), (32, 32, 64, 64, 128, 128), 4),
        ((1, 512, 512), (32, 32, 64, 64, 128, 128), 8),  # capped at MAX_CONV_LAYERS
    ],
)
def test_automatic_depth_halves_down_to_a_small_grid(shape, channels, grid):
    assert default_conv_channels(shape) == channels
    encoder = build_encoder(_conv(shape))
    assert len([m for m in encoder.body if isinstance(m, torch.nn.Conv2d)]) == len(channels)
    linear = next(m for m in encoder.body if isinstance(m, torch.nn.Linear))
    assert linear.in_features == channels[-1] * grid * grid


def test_decoder_mirrors_the_encoder_layer_for_layer():
    cfg = _conv((3, 64, 64), (16, 32, 48))
    convs = [m for m in build_encoder(cfg).body if isinstance(m, torch.nn.Conv2d)]
    deconvs = [m for m in build_decoder(cfg).deconv if isinstance(m, torch.nn.ConvTranspose2d)]
    assert [(m.in_channels, m.out_channels) for m in convs] == [(3, 16), (16, 32), (32, 48)]
    assert [(m.in_channels, m.out_channels) for m in deconvs] == [(48, 32), (32, 16), (16, 3)]


def test_default_64x64_rgb_conv_vae_stays_under_a_million_weights():
    n = sum(p.numel() for p in build_model(_conv((3, 64, 64))).parameters())
    two_layer = sum(p.numel() for p in build_model(_conv((3, 64, 64), (32, 64))).parameters())
    assert n < MAX_PARAMETERS_64X64X3 < two_layer


@pytest.mark.parametrize(
    "shape,channels,words",
    [
        ((1, 6, 6), (32, 64), "divisible by 4, got 6x6"),
        ((3, 28, 28), (8, 16, 32), "divisible by 8, got 28x28"),
        ((1, 64, 48), (8,) * 5, "divisible by 32, got 64x48"),
        ((1, 64, 64), (8,) * 7, "1 to 6 positive ints"),
        ((1, 64, 64), (8, 0), "1 to 6 positive ints"),
        ((1, 4, 4), (), "cannot halve a 4x4 image"),
        ((1, 9, 9), (), "a 9x9 image has an odd side"),
    ],
)
def test_image_size_the_conv_layers_cannot_halve_is_a_one_line_error(shape, channels, words):
    with pytest.raises(ConfigError, match=words) as info:
        _conv(shape, channels)
    assert "\n" not in str(info.value)


def test_two_layer_model_saved_before_automatic_depth_loads_with_the_same_weights(tmp_path):
    """A registered model's config.json holds conv_channels [32, 64] and its weights the names
    above; it must load, strictly, into the same two-layer net."""
    cfg = _conv((1, 8, 8), (32, 64))
    model = build_model(cfg).eval()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: v for k, v in shapes.items() if k.startswith(("encoder.", "decoder."))} == (
        TWO_LAYER_8X8
    )
    save_model(model, tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["conv_channels"] == [32, 64]
    loaded = load_model(tmp_path / "m")
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(model.embed(x)[0], loaded.embed(x)[0])


def test_automatic_conv_model_saves_and_loads_with_identical_outputs(tmp_path):
    model = build_model(_conv((3, 64, 64))).eval()
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    x = torch.rand(2, 3, 64, 64)
    assert loaded.config.conv_channels == ()
    assert torch.equal(model.embed(x)[0], loaded.embed(x)[0])
