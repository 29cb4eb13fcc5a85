"""Encoder and decoder networks: an MLP for vectors and a small conv net for images.

An encoder maps x (B, *input_shape) to features (B, F); heads on top give z or (mu, logvar).
A decoder maps z (..., B, latent) to the likelihood's parameters (..., B, D), flattened.
"""

from __future__ import annotations

from torch import Tensor, nn

from vae.config import ModelConfig

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


class ConvEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        c, h, w = cfg.input_shape
        c1, c2 = cfg.conv_channels
        act = _ACTIVATIONS[cfg.activation]
        width = cfg.hidden[0] if cfg.hidden else 128
        self.body = nn.Sequential(
            nn.Conv2d(c, c1, 4, stride=2, padding=1),
            act(),
            nn.Conv2d(c1, c2, 4, stride=2, padding=1),
            act(),
            nn.Flatten(),
            nn.Linear(c2 * (h // 4) * (w // 4), width),
            act(),
        )
        self.out_features = width

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class ConvDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        c, h, w = cfg.input_shape
        c1, c2 = cfg.conv_channels
        act = _ACTIVATIONS[cfg.activation]
        width = cfg.hidden[0] if cfg.hidden else 128
        self.grid = (c2, h // 4, w // 4)
        self.fc = nn.Sequential(
            nn.Linear(cfg.latent_dim, width),
            act(),
            nn.Linear(width, c2 * (h // 4) * (w // 4)),
            act(),
        )
        self.deconv = nn.Sequential(
            nn.ConvTranspose2d(c2, c1, 4, stride=2, padding=1),
            act(),
            nn.ConvTranspose2d(c1, c, 4, stride=2, padding=1),
        )

    def forward(self, z: Tensor) -> Tensor:
        lead = z.shape[:-1]
        h = self.fc(z.reshape(-1, z.shape[-1])).reshape(-1, *self.grid)
        return self.deconv(h).reshape(*lead, -1)


def build_encoder(cfg: ModelConfig) -> nn.Module:
    return ConvEncoder(cfg) if cfg.arch == "conv" else MLPEncoder(cfg)


def build_decoder(cfg: ModelConfig) -> nn.Module:
    return ConvDecoder(cfg) if cfg.arch == "conv" else MLPDecoder(cfg)
