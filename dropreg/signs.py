"""The random-sign stream of the implicit term, in plain PyTorch.

Definition (shared by every backend, so one seed gives identical signs everywhere):

* Signs are indexed over the flattened ``(N, d)`` input: element ``(n, j)`` has flat index
  ``i = n * d + j``.
* One Philox4x32-10 call yields four 32-bit words = 128 signs. Element ``i`` uses counter
  ``c = i // 128`` (as ``(c_lo, c_hi, 0, 0)``), key ``(seed_lo, seed_hi)``, word ``(i // 32) % 4``
  and bit ``i % 32`` of that word. A set bit means ``-1``, a clear bit ``+1``.

This is exactly the word sequence of Triton's ``tl.randint4x(seed, c)`` and of ATen's
``at::Philox4_32(seed, /*subsequence=*/0, /*offset=*/c)`` (its first four outputs).
All arithmetic here is done on int64 tensors holding uint32 values, so it runs on any device.
"""
from __future__ import annotations

import torch

PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUNDS = 10
SIGNS_PER_COUNTER = 128

_MASK32 = 0xFFFFFFFF


def _mul_hi_lo(x: torch.Tensor, const: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit halves of ``x * const`` for uint32 values held in int64.

    The full product can reach 2**64, which int64 cannot hold, so it is formed from 16-bit halves of x.
    """
    part_lo = (x & 0xFFFF) * const  # < 2**48
    part_hi = (x >> 16) * const  # < 2**48; weight 2**16
    low_sum = part_lo + ((part_hi & 0xFFFF) << 16)  # < 2**49
    return (part_hi >> 16) + (low_sum >> 32), low_sum & _MASK32


def philox4x32(counter: tuple[torch.Tensor, ...], seed: int) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 on int64 tensors holding uint32 counter words; returns the four output words."""
    c0, c1, c2, c3 = counter
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(PHILOX_ROUNDS):
        hi_a, lo_a = _mul_hi_lo(c0, PHILOX_ROUND_A)
        hi_b, lo_b = _mul_hi_lo(c2, PHILOX_ROUND_B)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & _MASK32
        k1 = (k1 + PHILOX_KEY_B) & _MASK32
    return c0, c1, c2, c3


def philox_signs(seed: int, rows: int, dim: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """The ``(rows, dim)`` tensor of +-1 signs for ``seed`` (see the module docstring)."""
    total = rows * dim
    n_counters = -(-total // SIGNS_PER_COUNTER)
    counter = torch.arange(n_counters, device=device, dtype=torch.int64)
    zero = torch.zeros_like(counter)
    words = torch.stack(philox4x32((counter & _MASK32, counter >> 32, zero, zero), seed), dim=1)
    bits = (words.unsqueeze(-1) >> torch.arange(32, device=device, dtype=torch.int64)) & 1
    flat_bits = bits.reshape(-1)[:total]
    return (1 - 2 * flat_bits).to(dtype).reshape(rows, dim)


def draw_seed() -> int:
    """A 63-bit seed drawn from torch's default generator, so ``torch.manual_seed`` reproduces it."""
    return int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64).item())
