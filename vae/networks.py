"""Encoder and decoder networks: an MLP for vectors and a small conv net for images.

An encoder maps x (B, *input_shape) to features (B, F); heads on top give z or (mu, logvar).
A decoder maps z (..., B, latent) to the likelihood's parameters (..., B, D), flattened.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from vae.config import ModelConfig
from vae.conv_layout import conv_channels_for

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh, "elu": nn.ELU}


def mlp(sizes: list[int], activation: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(_ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


class MLPEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        sizes = [cfg.input_dim, *cfg.hidden]
        act = _ACTIVATIONS[cfg.activation]
        self.body = nn.Sequential(nn.Flatten(), mlp(sizes, cfg.activation), act())
        if not cfg.hidden:  # linear encoder: no hidden layer, no activation
            self.body = nn.Flatten()
        self.out_features = sizes[-1]

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class MLPDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.net = mlp([cfg.latent_dim, *reversed(cfg.hidden), cfg.input_dim], cfg.activation)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


def _conv_layout(cfg: ModelConfig) -> tuple[tuple[int, ...], tuple[int, int, int], int]:
    """(channels, the (C, H, W) grid the convs end on, the Linear layer's width)."""
    channels = conv_channels_for(cfg.conv_channels, cfg.input_shape)
    _, h, w = cfg.input_shape
    scale = 2 ** len(channels)
    return channels, (channels[-1], h // scale, w // scale), cfg.hidden[0] if cfg.hidden else 128


class ConvEncoder(nn.Module):
    """One stride-2 conv (kernel 4, padding 1) per conv_channels entry, each halving H and W,
    then a Linear layer on the small grid left."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        channels, grid, width = _conv_layout(cfg)
        act = _ACTIVATIONS[cfg.activation]
        layers: list[nn.Module] = []
        for c_in, c_out in zip((cfg.input_shape[0], *channels), channels, strict=False):
            layers += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), act()]
        # Keep this order: registered models' weights are named by these indices (body.0, ...).
        self.body = nn.Sequential(*layers, nn.Flatten(), nn.Linear(math.prod(grid), width), act())
        self.out_features = width

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class ConvDecoder(nn.Module):
    """The encoder mirrored: Linear layers up to its last grid, then one stride-2 transposed
    conv per conv_channels entry, in reverse, back to (C, H, W)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        channels, self.grid, width = _conv_layout(cfg)
        act = _ACTIVATIONS[cfg.activation]
        self.fc = nn.Sequential(
            nn.Linear(cfg.latent_dim, width), act(), nn.Linear(width, math.prod(self.grid)), act()
        )
        outs = (*reversed(channels[:-1]), cfg.input_shape[0])
        layers: list[nn.Module] = []
        for c_in, c_out in zip(reversed(channels), outs, strict=True):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1), act()]
        self.deconv = nn.Sequential(*layers[:-1])  # the last layer's output is the likelihood's

    def forward(self, z: Tensor) -> Tensor:
        lead = z.shape[:-1]
        h = self.fc(z.reshape(-1, z.shape[-1])).reshape(-1, *self.grid)
        return self.deconv(h).reshape(*lead, -1)


def build_encoder(cfg: ModelConfig) -> nn.Module:
    return ConvEncoder(cfg) if cfg.arch == "conv" else MLPEncoder(cfg)


def build_decoder(cfg: ModelConfig) -> nn.Module:
    return ConvDecoder(cfg) if cfg.arch == "conv" else MLPDecoder(cfg)
