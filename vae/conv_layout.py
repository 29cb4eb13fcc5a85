"""How deep the conv encoder goes: one stride-2 conv per `conv_channels` entry, each halving H
and W, so the depth decides the grid the Linear layer sees. Pure Python: the config validates
with it and the networks build with it.
"""

from __future__ import annotations

MAX_CONV_LAYERS = 6
# Saved models with conv_channels [] are rebuilt with this rule when loaded: changing it
# would stop them loading (tests/vae/test_conv_shapes.py pins it).
# Channels of layer i in the automatic layout: 32, 32, 64, 64, 128, 128 (doubling every second
# halving keeps the feature map's size from collapsing as fast as its area does).
_BASE_CHANNELS = 32


def default_conv_channels(input_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Conv channels for images of (C, H, W): halve while both sides are even and the smaller
    is over 4, so the Linear layer sees a small grid (64x64 -> 4x4 in 4 layers, 28x28 -> 7x7 in
    2, 8x8 -> 4x4 in 1). Empty when the image cannot be halved at all (e.g. 4x4 or 5x5)."""
    _, h, w = input_shape
    channels: list[int] = []
    while h % 2 == 0 and w % 2 == 0 and min(h, w) > 4 and len(channels) < MAX_CONV_LAYERS:
        channels.append(_BASE_CHANNELS * 2 ** (len(channels) // 2))
        h, w = h // 2, w // 2
    return tuple(channels)


def conv_channels_for(
    conv_channels: tuple[int, ...], input_shape: tuple[int, ...]
) -> tuple[int, ...]:
    """The channels a conv net is built with: the configured ones, or automatic when empty."""
    return tuple(conv_channels) or default_conv_channels(input_shape)
