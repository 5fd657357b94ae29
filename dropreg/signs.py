"""dropreg's counter-based random streams, in plain PyTorch: the implicit term's signs and the Gumbel noise
of sampled targets. Both are Philox4x32-10 with key ``(seed_lo, seed_hi)``; counter word 3 tells them apart
(0: signs, 1: sampled targets), so one seed never reuses a word across purposes.

Signs (shared by every backend, so one seed gives identical signs everywhere):

* Signs are indexed over the flattened ``(N, d)`` input: element ``(n, j)`` has flat index
  ``i = n * d + j``.
* One Philox4x32-10 call yields four 32-bit words = 128 signs. Element ``i`` uses counter
  ``c = i // 128`` (as ``(c_lo, c_hi, stream, 0)``), key ``(seed_lo, seed_hi)``, word ``(i // 32) % 4``
  and bit ``i % 32`` of that word. A set bit means ``-1``, a clear bit ``+1``. ``stream`` is 0 for
  :func:`dropreg.linear_cross_entropy`; site ``k`` of :func:`dropreg.site_regularizers` uses ``k + 1``.

Gumbel noise of :func:`dropreg.sample_targets` (sample ``k``, row ``n``, class ``v``): word ``v % 4`` of
Philox at counter ``(v // 4, n, k, 1)``; ``u = (word + 1/2) / 2**32`` and ``g = -log(-log(u))``, in float64.
The draw is ``argmax_v (z_v + g_v)`` with ``z`` promoted to float64, the lowest class winning a tie (the
Gumbel-max trick: an exact draw from ``softmax(z)``, whatever the tiling).

This is exactly the word sequence of Triton's ``tl.randint4x(seed, c)`` and of ATen's
``at::Philox4_32(seed, /*subsequence=*/0, /*offset=*/c)`` (its first four outputs).
All arithmetic here is done on int64 tensors holding uint32 values, so it runs on any device.
"""
from __future__ import annotations

import torch

from ._policy import eager_under_compile

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


def philox_signs(seed: int, rows: int, dim: int, *, stream: int = 0, device=None,
                 dtype=torch.float32) -> torch.Tensor:
    """The ``(rows, dim)`` tensor of +-1 signs for ``seed`` and ``stream`` (see the module docstring)."""
    for name, value, bound in (("seed", seed, 2**64), ("stream", stream, 2**32)):
        if isinstance(value, int) and not 0 <= value < bound:  # the Philox key and counter words are unsigned
            raise ValueError(f"{name}: expected an int in [0, 2**{bound.bit_length() - 1}), got {value}")
    total = rows * dim
    n_counters = -(-total // SIGNS_PER_COUNTER)
    counter = torch.arange(n_counters, device=device, dtype=torch.int64)
    zero = torch.zeros_like(counter)
    words = torch.stack(philox4x32((counter & _MASK32, counter >> 32, zero + stream, zero), seed), dim=1)
    bits = (words.unsqueeze(-1) >> torch.arange(32, device=device, dtype=torch.int64)) & 1
    flat_bits = bits.reshape(-1)[:total]
    return (1 - 2 * flat_bits).to(dtype).reshape(rows, dim)


SAMPLING_STREAM_TAG = 1  # counter word 3 of the Gumbel noise (signs use 0)


def gumbel_noise(seed: int, sample: int, rows: torch.Tensor, v0: int, v1: int) -> torch.Tensor:
    """float64 Gumbel noise ``g[i, v - v0]`` of draw ``sample`` for rows ``rows`` (int64) and classes [v0, v1)."""
    first, last = v0 // 4, (v1 + 3) // 4
    groups = torch.arange(first, last, device=rows.device, dtype=torch.int64)[None, :]
    row_words = rows.to(torch.int64)[:, None] & _MASK32
    words = philox4x32((groups, row_words, torch.full_like(row_words, sample), torch.full_like(row_words,
                                                                                               SAMPLING_STREAM_TAG)),
                       seed)
    per_class = torch.stack(torch.broadcast_tensors(*words), dim=2).reshape(rows.shape[0], -1)
    uniform = (per_class[:, v0 - 4 * first: v1 - 4 * first].to(torch.float64) + 0.5) * 2.0**-32
    return -torch.log(-torch.log(uniform))


@eager_under_compile  # under torch.compile, Inductor's RNG would draw a different seed than eager
def draw_seed() -> int:
    """A 63-bit seed drawn from torch's default generator, so ``torch.manual_seed`` reproduces it."""
    return int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64).item())


def random_signs(rows: int, dim: int, device, dtype) -> torch.Tensor:
    """``(rows, dim)`` independent +-1 drawn from torch's generator, not from the Philox stream: what
    ``seed=None`` uses inside a ``torch.compile`` graph, where drawing an integer seed would break the graph."""
    return torch.randint(0, 2, (rows, dim), device=device).to(dtype).mul_(2).sub_(1)
