"""Triton R-Drop: cross entropy of two dropout passes and their symmetric KL (docs/math.md, "R-Drop").

1. ``rdrop_partials_kernel``: grid (row blocks, vocabulary splits). One K loop gives z1 and z2 for a tile;
   two online softmaxes keep (m_i, L_i) and the scalar accumulator sum e^{z_i - m_i} D (D = z1 - z2), which
   rescales like L. Partials are merged exactly on the host side. Multiply-adds: 2 NVd (docs/math.md's floor).
2. ``rdrop_gradient_kernel``: grid (row blocks x vocabulary blocks). Recomputes z1, z2 (2 NVd), forms both
   logit gradients in registers and adds G1 W, G2 W into grad_input1/2 (2 NVd) and G1^T h1 + G2^T h2 into
   grad_W (2 NVd) with fp32 atomics (see backward.py for why atomics). 6 NVd: total 8 NVd = the floor.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .._policy import accumulation_dtype
from .utils import (LaunchPlan, add_logit_chunk, dot_operand, finish_logits, grouped_tile, launch_plan,
                    merge_vocab_splits, online_softmax_update, pick_target, row_descriptor, row_probabilities,
                    split_tiles)


@triton.jit
def _two_logit_tiles(h1_desc, h2_desc, w_desc, b_ptr, row0, col0, V, D, cols, HAS_BIAS: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr,
                     OPERAND: tl.constexpr, COMPUTE: tl.constexpr, PRECISION: tl.constexpr, ROUND_TF32: tl.constexpr):
    """z1, z2 for one tile from one pass over W's K chunks (each W chunk loaded once)."""
    z1 = tl.zeros((BLOCK_M, BLOCK_V), dtype=ACC)
    z2 = tl.zeros((BLOCK_M, BLOCK_V), dtype=ACC)
    for k0 in range(0, D, BLOCK_K):
        w = w_desc.load([col0, k0])
        z1 = add_logit_chunk(z1, h1_desc, w, row0, k0, ACC, OPERAND, COMPUTE, PRECISION, ROUND_TF32)
        z2 = add_logit_chunk(z2, h2_desc, w, row0, k0, ACC, OPERAND, COMPUTE, PRECISION, ROUND_TF32)
    return (finish_logits(z1, b_ptr, cols, V, HAS_BIAS, ACC), finish_logits(z2, b_ptr, cols, V, HAS_BIAS, ACC))


@triton.jit
def _logit_difference(z1, z2, cols, V):
    """D = z1 - z2, 0 in the padding columns (where both are -inf and the difference would be NaN)."""
    valid = cols[None, :] < V
    return tl.where(valid, z1, 0.0) - tl.where(valid, z2, 0.0)


@triton.jit
def rdrop_partials_kernel(h1_ptr, h2_ptr, w_ptr, b_ptr, target_ptr, partials_out, N, V, D, stride_h1, stride_h2,
                          stride_w, tiles_per_split,
                          HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
                          BLOCK_K: tl.constexpr, ACC: tl.constexpr, OPERAND: tl.constexpr, COMPUTE: tl.constexpr,
                          PRECISION: tl.constexpr, ROUND_TF32: tl.constexpr):
    """partials_out is (8, splits, N): max1, sum1, weighted_d1, target_logit1, then the same for pass 2."""
    row_block = tl.program_id(0)
    split = tl.program_id(1)
    h1_desc = row_descriptor(h1_ptr, N, D, stride_h1, BLOCK_M, BLOCK_K)
    h2_desc = row_descriptor(h2_ptr, N, D, stride_h2, BLOCK_M, BLOCK_K)
    w_desc = row_descriptor(w_ptr, V, D, stride_w, BLOCK_V, BLOCK_K)
    row0 = row_block * BLOCK_M
    rows = row0 + tl.arange(0, BLOCK_M)
    target = tl.load(target_ptr + rows, mask=rows < N, other=-1)
    max1 = tl.full((BLOCK_M,), float("-inf"), dtype=ACC)
    max2 = tl.full((BLOCK_M,), float("-inf"), dtype=ACC)
    sum1 = tl.zeros((BLOCK_M,), dtype=ACC)
    sum2 = tl.zeros((BLOCK_M,), dtype=ACC)
    weighted1 = tl.zeros((BLOCK_M,), dtype=ACC)
    weighted2 = tl.zeros((BLOCK_M,), dtype=ACC)
    target1 = tl.zeros((BLOCK_M,), dtype=ACC)
    target2 = tl.zeros((BLOCK_M,), dtype=ACC)
    first_tile, last_tile = split_tiles(split, tiles_per_split, V, BLOCK_V)
    for tile in range(first_tile, last_tile):
        col0 = tile * BLOCK_V
        cols = col0 + tl.arange(0, BLOCK_V)
        z1, z2 = _two_logit_tiles(h1_desc, h2_desc, w_desc, b_ptr, row0, col0, V, D, cols, HAS_BIAS, BLOCK_M,
                                  BLOCK_V, BLOCK_K, ACC, OPERAND, COMPUTE, PRECISION, ROUND_TF32)
        target1 += pick_target(z1, cols, target)
        target2 += pick_target(z2, cols, target)
        diff = _logit_difference(z1, z2, cols, V)
        max1, sum1, rescale1, e1 = online_softmax_update(max1, sum1, z1)
        max2, sum2, rescale2, e2 = online_softmax_update(max2, sum2, z2)
        weighted1 = weighted1 * rescale1 + tl.sum(e1 * diff, axis=1)
        weighted2 = weighted2 * rescale2 + tl.sum(e2 * diff, axis=1)
    ok = rows < N
    out = split * N + rows
    stride = tl.num_programs(1) * N
    tl.store(partials_out + out, max1, mask=ok)
    tl.store(partials_out + stride + out, sum1, mask=ok)
    tl.store(partials_out + 2 * stride + out, weighted1, mask=ok)
    tl.store(partials_out + 3 * stride + out, target1, mask=ok)
    tl.store(partials_out + 4 * stride + out, max2, mask=ok)
    tl.store(partials_out + 5 * stride + out, sum2, mask=ok)
    tl.store(partials_out + 6 * stride + out, weighted2, mask=ok)
    tl.store(partials_out + 7 * stride + out, target2, mask=ok)


@triton.jit
def rdrop_gradient_kernel(h1_ptr, h2_ptr, w_ptr, b_ptr, target_ptr, lse_ptr, expected_ptr, grad_ce1_ptr,
                          grad_ce2_ptr, grad_kl_ptr, grad_h1_out, grad_h2_out, grad_w_out, grad_b_out,
                          N, V, D, stride_h1, stride_h2, stride_w,
                          HAS_BIAS: tl.constexpr, WANT_H1: tl.constexpr, WANT_H2: tl.constexpr, WANT_W: tl.constexpr,
                          WANT_B: tl.constexpr, GROUP_M: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr, OPERAND: tl.constexpr,
                          COMPUTE: tl.constexpr, PRECISION: tl.constexpr, ROUND_TF32: tl.constexpr):
    row_block, vocab_block = grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_M), tl.cdiv(V, BLOCK_V), GROUP_M)
    h1_desc = row_descriptor(h1_ptr, N, D, stride_h1, BLOCK_M, BLOCK_K)
    h2_desc = row_descriptor(h2_ptr, N, D, stride_h2, BLOCK_M, BLOCK_K)
    w_desc = row_descriptor(w_ptr, V, D, stride_w, BLOCK_V, BLOCK_K)
    row0 = row_block * BLOCK_M
    col0 = vocab_block * BLOCK_V
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = col0 + tl.arange(0, BLOCK_V)
    row_ok = rows < N
    z1, z2 = _two_logit_tiles(h1_desc, h2_desc, w_desc, b_ptr, row0, col0, V, D, cols, HAS_BIAS, BLOCK_M, BLOCK_V,
                              BLOCK_K, ACC, OPERAND, COMPUTE, PRECISION, ROUND_TF32)
    diff = _logit_difference(z1, z2, cols, V)
    p1 = row_probabilities(z1, lse_ptr, rows, N)
    p2 = row_probabilities(z2, lse_ptr + N, rows, N)
    expected1 = tl.load(expected_ptr + rows, mask=row_ok, other=0.0)[:, None]
    expected2 = tl.load(expected_ptr + N + rows, mask=row_ok, other=0.0)[:, None]
    g_ce1 = tl.load(grad_ce1_ptr + rows, mask=row_ok, other=0.0).to(ACC)[:, None]
    g_ce2 = tl.load(grad_ce2_ptr + rows, mask=row_ok, other=0.0).to(ACC)[:, None]
    half_kl = 0.5 * tl.load(grad_kl_ptr + rows, mask=row_ok, other=0.0).to(ACC)[:, None]
    # d symKL/dz1 = p1 (D - E_p1 D) + p1 - p2;  d symKL/dz2 = -p2 (D - E_p2 D) - (p1 - p2)
    grad1 = p1 * (g_ce1 + half_kl * (diff - expected1 + 1.0)) - half_kl * p2
    grad2 = p2 * (g_ce2 - half_kl * (diff - expected2 - 1.0)) - half_kl * p1
    target = tl.load(target_ptr + rows, mask=row_ok, other=-1)
    at_target = cols[None, :] == target[:, None]
    grad1 = tl.where(at_target, grad1 - g_ce1, grad1)
    grad2 = tl.where(at_target, grad2 - g_ce2, grad2)
    if WANT_B:
        tl.atomic_add(grad_b_out + cols, tl.sum(grad1 + grad2, axis=0), mask=cols < V, sem="relaxed")
    g1 = dot_operand(grad1, OPERAND, COMPUTE, ROUND_TF32)
    g2 = dot_operand(grad2, OPERAND, COMPUTE, ROUND_TF32)
    for k0 in range(0, D, BLOCK_K):
        dims = k0 + tl.arange(0, BLOCK_K)
        h_at = rows.to(tl.int64)[:, None] * D + dims[None, :]
        h_ok = row_ok[:, None] & (dims[None, :] < D)
        w = dot_operand(w_desc.load([col0, k0]), OPERAND, COMPUTE, ROUND_TF32)
        if WANT_H1:
            tl.atomic_add(grad_h1_out + h_at, tl.dot(g1, w, input_precision=PRECISION, out_dtype=ACC), mask=h_ok,
                          sem="relaxed")
        if WANT_H2:
            tl.atomic_add(grad_h2_out + h_at, tl.dot(g2, w, input_precision=PRECISION, out_dtype=ACC), mask=h_ok,
                          sem="relaxed")
        if WANT_W:
            grad_w = tl.dot(tl.trans(g1), dot_operand(h1_desc.load([row0, k0]), OPERAND, COMPUTE, ROUND_TF32),
                            input_precision=PRECISION, out_dtype=ACC)
            grad_w = tl.dot(tl.trans(g2), dot_operand(h2_desc.load([row0, k0]), OPERAND, COMPUTE, ROUND_TF32), grad_w,
                            input_precision=PRECISION, out_dtype=ACC)
            tl.atomic_add(grad_w_out + cols.to(tl.int64)[:, None] * D + dims[None, :], grad_w,
                          mask=(cols[:, None] < V) & (dims[None, :] < D), sem="relaxed")


def rdrop_forward(launch, input1, input2, weight, bias, target, plan: Optional[LaunchPlan] = None):
    """Returns (ce1, ce2, kl, lse (2, N), expected_d (2, N)) like the C++ op. ``plan`` as in forward.py."""
    n_rows, dim = input1.shape
    vocab = weight.shape[0]
    if plan is None:
        plan = launch_plan(input1.dtype, input1.device)
    types = plan.types
    acc = accumulation_dtype(input1.dtype)
    config = plan.tile("rdrop_partials")
    n_row_blocks = triton.cdiv(n_rows, config.block_m)
    n_vocab_blocks = triton.cdiv(vocab, config.block_v)
    splits = plan.vocab_splits(n_row_blocks, n_vocab_blocks)
    partials = torch.empty(8, splits, n_rows, dtype=acc, device=input1.device)
    launch(rdrop_partials_kernel)[(n_row_blocks, splits)](
        input1, input2, weight, bias if bias is not None else input1, target, partials, n_rows, vocab, dim,
        input1.stride(0), input2.stride(0), weight.stride(0), triton.cdiv(n_vocab_blocks, splits),
        HAS_BIAS=bias is not None, BLOCK_M=config.block_m, BLOCK_V=config.block_v, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages, **types.narrow_args())
    lse1, expected1 = merge_vocab_splits(partials[0], partials[1], partials[2])
    lse2, expected2 = merge_vocab_splits(partials[4], partials[5], partials[6])
    ce1 = lse1 - partials[3].sum(dim=0)
    ce2 = lse2 - partials[7].sum(dim=0)
    kl = 0.5 * (expected1 - expected2)
    return ce1, ce2, kl, torch.stack([lse1, lse2]), torch.stack([expected1, expected2])


def rdrop_backward(launch, grad_ce1, grad_ce2, grad_kl, input1, input2, weight, bias, target, lse, expected_d,
                   want_h1, want_h2, want_w, want_b, plan: Optional[LaunchPlan] = None):
    n_rows, dim = input1.shape
    vocab = weight.shape[0]
    if plan is None:
        plan = launch_plan(input1.dtype, input1.device)
    types = plan.types
    acc, device = lse.dtype, input1.device
    grad_h1 = torch.zeros(n_rows, dim, dtype=acc, device=device) if want_h1 else None
    grad_h2 = torch.zeros(n_rows, dim, dtype=acc, device=device) if want_h2 else None
    grad_w = torch.zeros(vocab, dim, dtype=acc, device=device) if want_w else None
    grad_b = torch.zeros(vocab, dtype=acc, device=device) if want_b else None
    config = plan.tile("rdrop_gradient")
    grid = (triton.cdiv(n_rows, config.block_m) * triton.cdiv(vocab, config.block_v),)

    def out_or_placeholder(t):
        return lse if t is None else t

    launch(rdrop_gradient_kernel)[grid](
        input1, input2, weight, bias if bias is not None else lse, target, lse, expected_d, grad_ce1, grad_ce2,
        grad_kl, *map(out_or_placeholder, (grad_h1, grad_h2, grad_w, grad_b)), n_rows, vocab, dim,
        input1.stride(0), input2.stride(0), weight.stride(0), HAS_BIAS=bias is not None, WANT_H1=want_h1,
        WANT_H2=want_h2, WANT_W=want_w, WANT_B=want_b, GROUP_M=config.group_m, BLOCK_M=config.block_m,
        BLOCK_V=config.block_v, BLOCK_K=config.block_k, num_warps=config.num_warps, num_stages=config.num_stages,
        **types.narrow_args())
    return grad_h1, grad_h2, grad_w, grad_b
