"""The chunked driver's workspace and operands: flat buffers viewed as R x C chunks, the ``W_c*W_c`` operand (with
fp16's square scaling, docs/math.md 7.3), grad_W's buffer and per-chunk update, and where the forward records each
row's dominant class."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .gemm import as_operand, mm, operand_types


@dataclass
class ChunkBuffers:
    """The workspace of one call: flat buffers viewed as contiguous R x C (or 2R x C) matrices per chunk."""
    logits: torch.Tensor
    second: Optional[torch.Tensor]  # t (linear_ce backward) or z2 (R-Drop), accumulation dtype
    outputs: Optional[torch.Tensor]  # probs (forward) or [G; S] / [G1; G2] (backward), operand dtype

    @staticmethod
    def allocate(row_block, vocab_chunk, acc, operand, device, *, second, outputs):
        entries = row_block * vocab_chunk
        return ChunkBuffers(torch.empty(entries, dtype=acc, device=device),
                            torch.empty(entries, dtype=acc, device=device) if second else None,
                            torch.empty(outputs * entries, dtype=operand, device=device) if outputs else None)

    @staticmethod
    def view(flat, rows, cols):
        return flat[:rows * cols].view(rows, cols)


def squares_operand(w, w_op, dtype, square_scale=None):
    """``W_c*W_c`` as an operand: the square of the operand ``w_op`` rounded once to ``dtype``, as a tensor core
    would see it (a bf16 product of bf16 values is the exact square rounded); with ``square_scale`` (see
    :func:`squares_scale`) the exact square of ``w`` times that power of two, rounded once. The GEMMs take it
    beside ``W_c`` (two products into the halves of one output) instead of a concatenated ``[W_c | W_c*W_c]``,
    which would copy W_c once more per chunk."""
    if square_scale is None:
        return w_op * w_op
    return as_operand(w.to(square_scale.dtype).square() * square_scale, dtype)


def squares_scale(weight, types, need_m2):
    """The power of two that the fp16 forward's W*W operand is multiplied by (m2 is divided by it afterwards, both
    exact), or None. fp16's range is too narrow for the squares: |W| >= 256 overflows (256^2 > 65504) and
    |W| < 2^-7 lands among the subnormals; scaled, the largest square lies in [2^14, 2^15). bf16 has fp32's range."""
    if not need_m2 or types.forward != torch.float16:
        return None
    peak = weight.detach().abs().amax().to(types.acc)
    exponent = torch.floor(torch.log2(peak * peak)).clamp(-100, 100)  # an all-zero W gives -inf: clamped
    return torch.exp2(14 - exponent)


def add_weight_gradient(grad_w, v0, v1, a, b, acc, overwrite, weight=None, s_g_r_q=None):
    """grad_W's rows ``[v0, v1)`` get ``a @ b`` (``+ 2 weight * s_g_r_q``, the explicit term's part, when given):
    written (``overwrite``: one row block, each chunk once, grad_W in the weight's dtype, rounded once) or added
    to the fp32 buffer by the GEMM itself (no product written apart and added)."""
    rows = grad_w[v0:v1]
    if not overwrite:
        mm(a, b, acc, out=rows, accumulate=True)
        if s_g_r_q is not None:
            rows.addcmul_(weight, s_g_r_q, value=2.0)
        return
    if rows.dtype == acc and s_g_r_q is None:
        mm(a, b, acc, out=rows)
        return
    product = mm(a, b, acc)
    if s_g_r_q is None:
        rows.copy_(product)
    else:  # one elementwise pass: the fp32 sum is rounded once into grad_W's dtype
        torch.addcmul(product, weight, s_g_r_q, value=2.0, out=rows)


def grad_weight_buffer(weight, acc, n_row_blocks):
    """grad_W in the weight's dtype when one row block writes each chunk once (no V x d fp32 copy), else in the
    accumulation dtype."""
    if n_row_blocks == 1:
        return torch.empty(weight.shape, dtype=weight.dtype, device=weight.device), True
    return torch.zeros(weight.shape, dtype=acc, device=weight.device), False


def top_class_buffer(h, modulated):
    """Where the forward records each row's dominant class, when the backward's operands are narrow (else None)."""
    if not modulated or operand_types(h.dtype).backward == operand_types(h.dtype).acc:
        return None
    return torch.zeros(h.shape[0], dtype=torch.int64, device=h.device)
