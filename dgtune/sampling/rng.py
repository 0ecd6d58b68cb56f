"""Counter-based random numbers for the fast sampler: a pure function of (row seed, canvas, step, purpose, position,
vocab id), so a row's draws never depend on the batch it is in, on the device, or on the order of calls.

Keys are 32-bit integers held in int64 tensors. `mix32` is a lowbias32-style integer hash whose multipliers are
< 2**31, so every product of a 32-bit value and a multiplier fits in int64 (no overflow in torch); the Triton
kernel in `triton_stats.py` computes the same hash with wrapping uint32 arithmetic, bit for bit.
"""

from __future__ import annotations

import torch

M32 = 0xFFFFFFFF
MUL1 = 0x7FEB352D
MUL2 = 0x5BD1E995
COLUMN_SALT = 0x632BE5AB  # vocab columns (Gumbel noise)
POSITION_SALT = 0x2545F491  # canvas positions

# purposes of a draw (folded into the key)
INIT, SAMPLE, RENOISE, SCORE = 1, 2, 3, 4


def mix32(x: torch.Tensor) -> torch.Tensor:
    """Hash int64 values in [0, 2**32) to [0, 2**32) (bijective)."""
    x = x ^ (x >> 16)
    x = (x * MUL1) & M32
    x = x ^ (x >> 15)
    x = (x * MUL2) & M32
    return x ^ (x >> 16)


def fold(keys: torch.Tensor, *values: int) -> torch.Tensor:
    """Fold integers (canvas index, step, purpose, ...) into keys [...]: a new independent stream per tuple."""
    for v in values:
        keys = mix32(keys ^ mix32(torch.full_like(keys, (int(v) + 0x9E3779B9) & M32)))
    return keys


def seed_keys(row_seeds: torch.Tensor) -> torch.Tensor:
    """Row seeds [b] (any int64) -> 32-bit keys [b]."""
    s = row_seeds.long()
    return mix32(mix32(s & M32) ^ ((s >> 32) & M32))


def step_keys(keys: torch.Tensor, canvas_idx: int, n_steps: int, n_purposes: int = SCORE + 1) -> torch.Tensor:
    """Keys [b] -> one key per (step, purpose) of a canvas [b, n_steps, n_purposes] (purpose 0 unused: INIT is
    derived with `fold`), computed at once so the step loop only indexes."""
    k = fold(keys, canvas_idx)  # [b]
    ids = torch.arange(n_steps * n_purposes, device=keys.device).view(n_steps, n_purposes)
    return mix32(k[:, None, None] ^ mix32((ids + 0x3C6EF372) & M32)[None])


_HASH_CACHE: dict = {}


def _hashes(n: int, salt: int, device) -> torch.Tensor:
    key = (n, salt, str(device))
    if key not in _HASH_CACHE:
        _HASH_CACHE[key] = mix32((torch.arange(n, device=device) + salt) & M32)
    return _HASH_CACHE[key]


def position_keys(keys: torch.Tensor, length: int) -> torch.Tensor:
    """Keys [b] -> one key per canvas position [b, l]."""
    return mix32(keys[:, None] ^ _hashes(length, POSITION_SALT, keys.device)[None])


def column_hashes(vocab_size: int, device=None) -> torch.Tensor:
    """The per-vocab-id hashes [v] mixed into position keys for Gumbel noise."""
    return _hashes(vocab_size, COLUMN_SALT, device)


def to_unit(bits: torch.Tensor) -> torch.Tensor:
    """32-bit hashes -> float32 uniforms in (0, 1) (24 random bits, never 0 or 1)."""
    return ((bits >> 8).to(torch.float32) + 0.5) * (2.0 ** -24)


def uniform(keys: torch.Tensor) -> torch.Tensor:
    """One uniform (0, 1) float32 per key."""
    return to_unit(mix32(keys))


def randint(keys: torch.Tensor, high: int) -> torch.Tensor:
    """One integer in [0, high) per key (int64)."""
    return (uniform(keys) * high).long().clamp_(max=high - 1)


def vocab_uniform(pos_keys: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Uniform noise [..., v] for Gumbel-max sampling from position keys [...] (what the Triton kernel computes
    in registers from the same keys)."""
    return to_unit(mix32(pos_keys[..., None] ^ column_hashes(vocab_size, pos_keys.device)))


def row_seeds_from(generator: torch.Generator, batch_size: int, device=None) -> torch.Tensor:
    """Per-row seeds [b] drawn from `generator` (the default when `sample` gets no `row_seeds`)."""
    seeds = torch.randint(0, 2**62, (batch_size,), generator=generator, device=generator.device)
    return seeds.to(device) if device is not None else seeds
