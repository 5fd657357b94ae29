"""Triton backward of the fused linear cross entropy + dropout regularizers (docs/math.md, "gradients").

Two kernels, launched in this order by :func:`linear_ce_backward`:

1. ``row_prep_kernel``: per row, the d-vectors of docs/math.md's GEMM-friendly form, ``T = gI' u - 2 gR' q mu``
   (``+ gbar``, mu's own upstream gradient, when given) and ``gR' q``, the row constant of the logit gradient,
   the row-wise part of grad_input
   (``2 gR' h var + gI' sigma (mu - W[y])``, written as grad_input's initial value) and the implicit
   term's target scatter ``grad_W[y] -= gI' u`` (atomic adds). O(N d), no GEMM.
2. ``logit_gradient_kernel``: grid (row blocks x vocabulary blocks). Recomputes z and, in the same K loop,
   ``t = T W^T + (gR' q)(W*W)^T``; forms ``G = s (row_const + t) - g_ce [v = y]`` in registers, then walks
   d in BLOCK_K chunks: grad_input += G W, grad_W += G^T h + S^T T + 2 W * (S^T gR' q), grad_b += sum G.
   Multiply-adds: 1 NVd (z) + 2 (t, explicit; 1 if implicit only) + 1 (grad_input) + 3 (grad_W:
   1 for cross entropy alone) = 7 NVd with both terms, docs/math.md's backward count; 3 NVd for cross entropy.

Accumulation of grad_input and grad_W: plain fp32 atomic adds. Each (row block, vocab
block) tile holds only its BLOCK_M x BLOCK_V logit gradient, so its contributions to the (N, d) and (V, d)
gradients must be summed over vocabulary blocks and row blocks respectively. The alternatives were worse
here: split + reduce needs a (splits, V, d) fp32 buffer (2 GiB per split at V=128k, d=4096), and a second
kernel that owns grad_W per vocabulary block would recompute z and t (3 more NVd). Contention is kept low by
the grouped tile order (``grouped_tile``): programs running together write GROUP_M row blocks and several
vocabulary blocks, not one. Consequence: on a GPU the summation order, and so the last bits, vary between
runs (the interpreter runs programs in order and is deterministic).
(Cut Cross-Entropy, which has the same sums, serializes its adds with locks and skips blocks of negligible
softmax values instead; dropreg does neither.)

Names (T_vec, g_r_q, row_const, t, ...) follow the glossary in dropreg/_op_family.py.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .utils import (LaunchPlan, add_logit_chunk, aligned_empty, dot_operand, finish_logits, grouped_tile, launch_plan,
                    philox_sign_block, row_descriptor, row_probabilities)


@triton.jit
def row_prep_kernel(h_ptr, w_ptr, target_ptr, signs_ptr, mu_ptr, var_ptr, grad_ce_ptr, grad_quadratic_ptr,
                    grad_sign_ptr, grad_mu_ptr, T_out, g_r_q_out, row_const_out, grad_h_out, grad_w_out,
                    seed, N, D, stride_h, stride_w, stride_t,
                    NEED_EXPLICIT: tl.constexpr, NEED_IMPLICIT: tl.constexpr, HAS_SIGNS: tl.constexpr,
                    HAS_GRAD_MU: tl.constexpr, WANT_H: tl.constexpr, WANT_W: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_K: tl.constexpr, ACC: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    target = tl.load(target_ptr + rows, mask=row_ok, other=0)
    row_const = tl.load(grad_ce_ptr + rows, mask=row_ok, other=0.0).to(ACC)
    g_r = tl.load(grad_quadratic_ptr + rows, mask=row_ok, other=0.0).to(ACC)[:, None]
    g_i = tl.load(grad_sign_ptr + rows, mask=row_ok, other=0.0).to(ACC)[:, None]
    for k0 in range(0, D, BLOCK_K):
        dims = k0 + tl.arange(0, BLOCK_K)
        in_bounds = row_ok[:, None] & (dims[None, :] < D)
        at = rows.to(tl.int64)[:, None] * D + dims[None, :]
        h = tl.load(h_ptr + rows.to(tl.int64)[:, None] * stride_h + dims[None, :], mask=in_bounds, other=0.0).to(ACC)
        mu = tl.load(mu_ptr + at, mask=in_bounds, other=0.0)
        T_vec = tl.zeros((BLOCK_M, BLOCK_K), dtype=ACC)
        grad_h = tl.zeros((BLOCK_M, BLOCK_K), dtype=ACC)
        if NEED_EXPLICIT:
            var = tl.load(var_ptr + at, mask=in_bounds, other=0.0)
            g_r_q = g_r * h * h
            tl.store(g_r_q_out + rows.to(tl.int64)[:, None] * stride_t + dims[None, :], g_r_q, mask=in_bounds)
            T_vec -= 2.0 * g_r_q * mu
            row_const += tl.sum(g_r_q * (mu * mu - var), axis=1)
            grad_h += 2.0 * g_r * h * var
        if NEED_IMPLICIT:
            if HAS_SIGNS:
                signs = tl.load(signs_ptr + at, mask=in_bounds, other=0.0).to(ACC)
            else:
                signs = philox_sign_block(seed, rows, dims, D).to(ACC)
            g_i_u = g_i * signs * h
            T_vec += g_i_u
            row_const -= tl.sum(g_i_u * mu, axis=1)
            w_target = tl.load(w_ptr + target[:, None] * stride_w + dims[None, :], mask=in_bounds, other=0.0)
            grad_h += g_i * signs * (mu - w_target.to(ACC))
            if WANT_W:
                tl.atomic_add(grad_w_out + target[:, None] * D + dims[None, :], -g_i_u, mask=in_bounds,
                              sem="relaxed")
        if HAS_GRAD_MU:  # mu's own upstream gradient gbar: T += gbar, row_const -= mu . gbar
            g_mu = tl.load(grad_mu_ptr + at, mask=in_bounds, other=0.0).to(ACC)
            T_vec += g_mu
            row_const -= tl.sum(g_mu * mu, axis=1)
        tl.store(T_out + rows.to(tl.int64)[:, None] * stride_t + dims[None, :], T_vec, mask=in_bounds)
        if WANT_H:
            tl.store(grad_h_out + at, grad_h, mask=in_bounds)
    tl.store(row_const_out + rows, row_const, mask=row_ok)


@triton.jit
def logit_gradient_kernel(h_ptr, w_ptr, b_ptr, target_ptr, lse_ptr, grad_ce_ptr, row_const_ptr, T_ptr,
                          g_r_q_ptr, grad_h_out, grad_w_out, grad_b_out, N, V, D, stride_h, stride_w,
                          stride_t,
                          HAS_BIAS: tl.constexpr, MODULATED: tl.constexpr, NEED_EXPLICIT: tl.constexpr,
                          WANT_H: tl.constexpr, WANT_W: tl.constexpr, WANT_B: tl.constexpr, GROUP_M: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr,
                          OPERAND: tl.constexpr, COMPUTE: tl.constexpr, PRECISION: tl.constexpr,
                          ROUND_TF32: tl.constexpr, WIDE: tl.constexpr, WIDE_PRECISION: tl.constexpr,
                          WIDE_ROUND_TF32: tl.constexpr):
    row_block, vocab_block = grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_M), tl.cdiv(V, BLOCK_V), GROUP_M)
    row0 = row_block * BLOCK_M
    col0 = vocab_block * BLOCK_V
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = col0 + tl.arange(0, BLOCK_V)
    row_ok = rows < N
    h_desc = row_descriptor(h_ptr, N, D, stride_h, BLOCK_M, BLOCK_K)
    w_desc = row_descriptor(w_ptr, V, D, stride_w, BLOCK_V, BLOCK_K)
    if MODULATED:
        T_desc = row_descriptor(T_ptr, N, D, stride_t, BLOCK_M, BLOCK_K)
    if NEED_EXPLICIT:
        g_r_q_desc = row_descriptor(g_r_q_ptr, N, D, stride_t, BLOCK_M, BLOCK_K)

    # z (narrow dots) and t = T W^T + (gR' q)(W*W)^T (wide dots) in one K loop: each W tile is loaded once.
    z = tl.zeros((BLOCK_M, BLOCK_V), dtype=ACC)
    if MODULATED:
        t = tl.zeros((BLOCK_M, BLOCK_V), dtype=ACC)
    for k0 in range(0, D, BLOCK_K):
        w = w_desc.load([col0, k0])
        z = add_logit_chunk(z, h_desc, w, row0, k0, ACC, OPERAND, COMPUTE, PRECISION, ROUND_TF32)
        if MODULATED:
            w_wide = w.to(WIDE)
            T_vec = dot_operand(T_desc.load([row0, k0]), WIDE, WIDE, WIDE_ROUND_TF32)
            t = tl.dot(T_vec, tl.trans(dot_operand(w_wide, WIDE, WIDE, WIDE_ROUND_TF32)), t,
                       input_precision=WIDE_PRECISION, out_dtype=ACC)
            if NEED_EXPLICIT:
                g_r_q = dot_operand(g_r_q_desc.load([row0, k0]), WIDE, WIDE, WIDE_ROUND_TF32)
                t = tl.dot(g_r_q, tl.trans(dot_operand(w_wide * w_wide, WIDE, WIDE, WIDE_ROUND_TF32)), t,
                           input_precision=WIDE_PRECISION, out_dtype=ACC)
    z = finish_logits(z, b_ptr, cols, V, HAS_BIAS, ACC)

    g_ce = tl.load(grad_ce_ptr + rows, mask=row_ok, other=0.0).to(ACC)
    probs = row_probabilities(z, lse_ptr, rows, N)
    target = tl.load(target_ptr + rows, mask=row_ok, other=-1)
    if MODULATED:
        row_const = tl.load(row_const_ptr + rows, mask=row_ok, other=0.0)
        grad_logits = probs * (row_const[:, None] + t)
    else:
        grad_logits = probs * g_ce[:, None]
    grad_logits = tl.where(cols[None, :] == target[:, None], grad_logits - g_ce[:, None], grad_logits)
    if WANT_B:
        tl.atomic_add(grad_b_out + cols, tl.sum(grad_logits, axis=0), mask=cols < V, sem="relaxed")

    g_op = dot_operand(grad_logits, OPERAND, COMPUTE, ROUND_TF32)
    if MODULATED:
        probs_wide = dot_operand(probs, WIDE, WIDE, WIDE_ROUND_TF32)
    for k0 in range(0, D, BLOCK_K):
        dims = k0 + tl.arange(0, BLOCK_K)
        w = w_desc.load([col0, k0])
        if WANT_H:
            grad_h = tl.dot(g_op, dot_operand(w, OPERAND, COMPUTE, ROUND_TF32), input_precision=PRECISION,
                            out_dtype=ACC)
            tl.atomic_add(grad_h_out + rows.to(tl.int64)[:, None] * D + dims[None, :], grad_h,
                          mask=row_ok[:, None] & (dims[None, :] < D), sem="relaxed")
        if WANT_W:
            h = dot_operand(h_desc.load([row0, k0]), OPERAND, COMPUTE, ROUND_TF32)
            grad_w = tl.dot(tl.trans(g_op), h, input_precision=PRECISION, out_dtype=ACC)
            if MODULATED:
                T_vec = dot_operand(T_desc.load([row0, k0]), WIDE, WIDE, WIDE_ROUND_TF32)
                grad_w = tl.dot(tl.trans(probs_wide), T_vec, grad_w, input_precision=WIDE_PRECISION, out_dtype=ACC)
            if NEED_EXPLICIT:
                g_r_q = dot_operand(g_r_q_desc.load([row0, k0]), WIDE, WIDE, WIDE_ROUND_TF32)
                grad_w += 2.0 * w.to(ACC) * tl.dot(tl.trans(probs_wide), g_r_q, input_precision=WIDE_PRECISION,
                                                   out_dtype=ACC)
            tl.atomic_add(grad_w_out + cols.to(tl.int64)[:, None] * D + dims[None, :], grad_w,
                          mask=(cols[:, None] < V) & (dims[None, :] < D), sem="relaxed")


def linear_ce_backward(launch, grad_ce, grad_quadratic, grad_sign_term, grad_mu, input, weight, bias, target, signs,
                       seed, lse, mu, var, need_explicit, need_implicit, want_h, want_w, want_b,
                       plan: Optional[LaunchPlan] = None):
    """Returns fp32 (fp64 for fp64 inputs) grad_input, grad_weight, grad_bias (None where not wanted).
    ``plan`` defaults to ``launch_plan(input.dtype, input.device)``."""
    n_rows, dim = input.shape
    vocab = weight.shape[0]
    if plan is None:
        plan = launch_plan(input.dtype, input.device)
    types = plan.types
    acc = lse.dtype
    device = input.device
    modulated = need_explicit or need_implicit
    grad_h = (torch.empty if modulated else torch.zeros)(n_rows, dim, dtype=acc, device=device) if want_h else None
    grad_w = torch.zeros(vocab, dim, dtype=acc, device=device) if want_w else None
    grad_b = torch.zeros(vocab, dtype=acc, device=device) if want_b else None
    row_const = T_vec = g_r_q = grad_ce  # placeholders: never read unless MODULATED / NEED_EXPLICIT
    if modulated:
        # T and gR' q are dot operands read through tensor descriptors: rows 16-byte aligned.
        T_vec = aligned_empty(n_rows, dim, acc, device)
        g_r_q = aligned_empty(n_rows, dim, acc, device) if need_explicit else T_vec
        row_const = torch.empty(n_rows, dtype=acc, device=device)
        config = plan.tile("row_terms")
        launch(row_prep_kernel)[(triton.cdiv(n_rows, config.block_m),)](
            input, weight, target, signs if signs is not None else mu, mu, var if need_explicit else mu,
            grad_ce, grad_quadratic, grad_sign_term, grad_mu.contiguous() if grad_mu is not None else mu, T_vec,
            g_r_q, row_const,
            grad_h if want_h else mu, grad_w if want_w else mu, seed, n_rows, dim, input.stride(0),
            weight.stride(0), T_vec.stride(0), NEED_EXPLICIT=need_explicit, NEED_IMPLICIT=need_implicit,
            HAS_SIGNS=signs is not None, HAS_GRAD_MU=grad_mu is not None, WANT_H=want_h, WANT_W=want_w,
            BLOCK_M=config.block_m,
            BLOCK_K=config.block_k, ACC=types.acc, num_warps=config.num_warps, num_stages=config.num_stages)
    config = plan.tile("logit_gradient")
    grid = (triton.cdiv(n_rows, config.block_m) * triton.cdiv(vocab, config.block_v),)
    launch(logit_gradient_kernel)[grid](
        input, weight, bias if bias is not None else lse, target, lse, grad_ce, row_const, T_vec, g_r_q,
        grad_h if want_h else lse, grad_w if want_w else lse, grad_b if want_b else lse, n_rows, vocab, dim,
        input.stride(0), weight.stride(0), T_vec.stride(0) if modulated else dim, HAS_BIAS=bias is not None,
        MODULATED=modulated,
        NEED_EXPLICIT=need_explicit, WANT_H=want_h, WANT_W=want_w, WANT_B=want_b, GROUP_M=config.group_m,
        BLOCK_M=config.block_m, BLOCK_V=config.block_v, BLOCK_K=config.block_k, num_warps=config.num_warps,
        num_stages=config.num_stages, **types.narrow_args(), **types.wide_args())
    return grad_h, grad_w, grad_b
