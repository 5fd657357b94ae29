"""Device helpers shared by the chunked driver's Triton kernels (dropreg/triton/epilogues.py, row_kernels.py)."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def to_operand(x, OPERAND: tl.constexpr):
    """``x`` (fp32) rounded to nearest-even in the GEMM operand dtype, as torch rounds it. bf16 is rounded on the
    bits first (the interpreter's own bf16 conversion truncates); the cast is then exact."""
    if OPERAND == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))  # NaN stays NaN
    return x.to(OPERAND)


@triton.jit
def second_block(at, R, C):
    """Offsets ``at`` of an (R, C) block moved to the second block of a (2R, C) buffer, in int64. R or C may arrive as
    the Python int 1 (Triton's JIT specializes an integer argument equal to 1 to a constant), which has no ``.to``."""
    return at + tl.full((), R, tl.int64) * C
