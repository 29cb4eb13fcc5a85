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

import numpy as np
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
    if seeds.device.type == "cpu":
        u1, u2 = _uniforms_numpy(seeds, n_samples, dim, start)
    else:
        u1, u2 = _uniforms_torch(seeds, n_samples, dim, start)
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
    return z.to(dtype)


def _uniforms_torch(seeds: Tensor, n_samples: int, dim: int, start: int) -> tuple[Tensor, Tensor]:
    seeds = seeds.to(torch.int64)
    state = _fmix32(_fmix32(seeds & _M32) ^ ((seeds >> 32) & _M32))  # (B,)
    i = torch.arange(start, start + n_samples, device=seeds.device, dtype=torch.int64)
    j = torch.arange(dim, device=seeds.device, dtype=torch.int64)
    counter = 2 * (i.view(-1, 1, 1) * dim + j.view(1, 1, -1))  # (n, 1, dim); two uniforms each
    return _uniform(state.view(1, -1, 1), counter), _uniform(state.view(1, -1, 1), counter + 1)


def _fmix32_np(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def _halves(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return (v & np.uint64(_M32)).astype(np.uint32), (v >> np.uint64(32)).astype(np.uint32)


def _uniforms_numpy(seeds: Tensor, n_samples: int, dim: int, start: int) -> tuple[Tensor, Tensor]:
    """The same integers as _uniforms_torch, in numpy's uint32, whose products wrap mod 2^32 by
    definition: 3-4x faster on CPU, where torch's int64 ops (and the 16-bit halves they need)
    cost more in dispatch than in arithmetic. Tested equal to the bit."""
    lo, hi = _halves(seeds.numpy().astype(np.uint64))
    i = np.arange(start, start + n_samples, dtype=np.uint64).reshape(-1, 1, 1)
    counter = np.uint64(2) * (i * np.uint64(dim) + np.arange(dim, dtype=np.uint64))
    with np.errstate(over="ignore"):
        state = _fmix32_np(_fmix32_np(lo) ^ hi).reshape(1, -1, 1)
        out = []
        for c in (counter, counter + np.uint64(1)):
            c_lo, c_hi = _halves(c)
            h = _fmix32_np(_fmix32_np(state ^ c_lo) ^ c_hi)
            out.append((torch.from_numpy(h.astype(np.float64)) + 0.5) * 2.0**-32)
    return out[0], out[1]


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
