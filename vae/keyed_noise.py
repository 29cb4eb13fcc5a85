"""Standard normal noise that belongs to an example, not to a position in a stream.

Draw (i, b, j), the j-th latent coordinate of the i-th sample for example b, is a pure function
of (seeds[b], i, j): a counter-based generator (murmur3's 32-bit finaliser over the seed and the
counter, then Box-Muller). So an example gets the same z samples however the data is batched,
ordered or spread over workers, and two models scored with the same seeds see the same eps:
paired comparisons cancel the Monte-Carlo noise, and 1 or 8 workers give identical figures.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import Tensor

_M32 = 0xFFFFFFFF


def _mul32(a: Tensor, c: int) -> Tensor:
    """a * c mod 2^32 for int64 a in [0, 2^32): in 16-bit halves, so no product overflows
    int64 (signed overflow is not defined behaviour in torch's kernels)."""
    return (((a & 0xFFFF) * c) + (((a >> 16) * (c & 0xFFFF)) << 16)) & _M32


def _fmix32(h: Tensor) -> Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def _uniform(state: Tensor, counter: Tensor) -> Tensor:
    """Float64 in (0, 1) from a per-example state and a counter (int64, broadcastable)."""
    h = _fmix32(_fmix32(state ^ (counter & _M32)) ^ ((counter >> 32) & _M32))
    return (h.double() + 0.5) * 2.0**-32


def keyed_normal(
    seeds: Tensor, n_samples: int, dim: int, start: int = 0, dtype: torch.dtype = torch.float32
) -> Tensor:
    """(n_samples, B, dim) N(0, 1) draws for B examples with int64 seeds (B,): draw (i, b, j) is
    that of sample start + i, so a chunk of samples [start, start + n) is a slice of the whole."""
    seeds = seeds.to(torch.int64)
    state = _fmix32(_fmix32(seeds & _M32) ^ ((seeds >> 32) & _M32))  # (B,)
    i = torch.arange(start, start + n_samples, device=seeds.device, dtype=torch.int64)
    j = torch.arange(dim, device=seeds.device, dtype=torch.int64)
    counter = 2 * (i.view(-1, 1, 1) * dim + j.view(1, 1, -1))  # (n, 1, dim); two uniforms each
    u1 = _uniform(state.view(1, -1, 1), counter)
    u2 = _uniform(state.view(1, -1, 1), counter + 1)
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
    return z.to(dtype)


def seeds_from_keys(keys: list[str], salt: str) -> Tensor:
    """Each example's noise seed (int64 >= 0): SHA-256 of the salt and the example's key. The
    salt names what the noise is for (a stage's seed, a training epoch), so that the streams of
    different uses never coincide while an example keeps its own within one."""
    prefix = f"{salt}\0".encode()
    return torch.tensor(
        [
            int.from_bytes(hashlib.sha256(prefix + k.encode()).digest()[:8], "big") >> 1
            for k in keys
        ],
        dtype=torch.int64,
    )
