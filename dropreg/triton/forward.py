"""Triton forward of the fused linear cross entropy + dropout regularizers (docs/math.md, "forward").

Three kernels, launched in this order by :func:`linear_ce_forward`:

1. ``lse_partials_kernel``: grid (row blocks, vocabulary splits). Each program streams its vocabulary
   range with an online softmax and writes its partial (m, L) and the target logit if the target falls in
   its range. The partials are merged exactly on the host side (``merge_vocab_splits``).
   Multiply-adds: 1 NVd (the logits).
2. ``moments_kernel`` (only when the explicit or implicit term is wanted): grid (row blocks x vocabulary
   blocks). With lse known, ``s = exp(z - lse)`` needs no rescaling, so partial A1 = s @ W and
   A2 = s @ (W*W) from different vocabulary blocks merge by plain addition: fp32 atomic adds into (N, d).
   Multiply-adds: 1 NVd (logit recompute) + 1 (A1) + 1 (A2, explicit only).
   Why not one pass with (m, L, A1, A2) kept per row: at d = 4096 a BLOCK_M x 2d fp32 accumulator cannot
   live in registers or shared memory, and rescaling it in global memory for every vocabulary tile would
   make the kernel memory-bound. Knowing lse first costs one extra logit GEMM (1 NVd).
   The moment GEMMs use wide (fp32/tf32) operands, see ``DotTypes`` in utils.py.
3. ``row_terms_kernel``: per row, mu = A1 / mass, var = A2 / mass - mu^2, quadratic = sum q var,
   sign_term = sum sigma h (mu - W[y]) with sigma from ``tl.randint4x`` unless signs were given.
   O(N d), no GEMM.

Total forward: 4 NVd with both terms (docs/math.md's floor counts 3), 3 NVd with the implicit term only,
1 NVd for cross entropy alone.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .._policy import accumulation_dtype
from .utils import (LaunchPlan, dot_operand, grouped_tile, launch_plan, logit_tile, merge_vocab_splits,
                    online_softmax_update, philox_sign_block, pick_target, row_descriptor, row_probabilities,
                    split_tiles)


@triton.jit
def lse_partials_kernel(h_ptr, w_ptr, b_ptr, target_ptr, max_out, sum_out, target_logit_out,
                        N, V, D, stride_h, stride_w, tiles_per_split,
                        HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
                        BLOCK_K: tl.constexpr, ACC: tl.constexpr, OPERAND: tl.constexpr, COMPUTE: tl.constexpr,
                        PRECISION: tl.constexpr, ROUND_TF32: tl.constexpr):
    row_block = tl.program_id(0)
    split = tl.program_id(1)
    h_desc = row_descriptor(h_ptr, N, D, stride_h, BLOCK_M, BLOCK_K)
    w_desc = row_descriptor(w_ptr, V, D, stride_w, BLOCK_V, BLOCK_K)
    row0 = row_block * BLOCK_M
    rows = row0 + tl.arange(0, BLOCK_M)
    target = tl.load(target_ptr + rows, mask=rows < N, other=-1)
    running_max = tl.full((BLOCK_M,), float("-inf"), dtype=ACC)
    running_sum = tl.zeros((BLOCK_M,), dtype=ACC)
    target_logit = tl.zeros((BLOCK_M,), dtype=ACC)
    first_tile, last_tile = split_tiles(split, tiles_per_split, V, BLOCK_V)
    for tile in range(first_tile, last_tile):
        col0 = tile * BLOCK_V
        cols = col0 + tl.arange(0, BLOCK_V)
        z = logit_tile(h_desc, w_desc, b_ptr, row0, col0, V, D, cols, HAS_BIAS, BLOCK_M, BLOCK_V, BLOCK_K,
                       ACC, OPERAND, COMPUTE, PRECISION, ROUND_TF32)
        target_logit += pick_target(z, cols, target)
        running_max, running_sum, _, _ = online_softmax_update(running_max, running_sum, z)
    out = split * N + rows
    tl.store(max_out + out, running_max, mask=rows < N)
    tl.store(sum_out + out, running_sum, mask=rows < N)
    tl.store(target_logit_out + out, target_logit, mask=rows < N)


@triton.jit
def moments_kernel(h_ptr, w_ptr, b_ptr, lse_ptr, mass_out, a1_out, a2_out, N, V, D, stride_h, stride_w,
                   HAS_BIAS: tl.constexpr, NEED_SECOND: tl.constexpr, GROUP_M: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr,
                   OPERAND: tl.constexpr, COMPUTE: tl.constexpr, PRECISION: tl.constexpr, ROUND_TF32: tl.constexpr,
                   WIDE: tl.constexpr, WIDE_PRECISION: tl.constexpr, WIDE_ROUND_TF32: tl.constexpr):
    """Unnormalized A1 = s~ @ W, A2 = s~ @ (W*W) and the mass sum s~, where s~ is s rounded exactly as the
    dot sees it: dividing by that mass (row_terms_kernel) keeps var = m2 - mu^2 the variance of one
    distribution, so operand rounding cannot push it off by the cancellation in m2 - mu^2."""
    row_block, vocab_block = grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_M), tl.cdiv(V, BLOCK_V), GROUP_M)
    h_desc = row_descriptor(h_ptr, N, D, stride_h, BLOCK_M, BLOCK_K)
    w_desc = row_descriptor(w_ptr, V, D, stride_w, BLOCK_V, BLOCK_K)
    row0 = row_block * BLOCK_M
    col0 = vocab_block * BLOCK_V
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = col0 + tl.arange(0, BLOCK_V)
    z = logit_tile(h_desc, w_desc, b_ptr, row0, col0, V, D, cols, HAS_BIAS, BLOCK_M, BLOCK_V, BLOCK_K,
                   ACC, OPERAND, COMPUTE, PRECISION, ROUND_TF32)
    probs = dot_operand(row_probabilities(z, lse_ptr, rows, N), WIDE, WIDE, WIDE_ROUND_TF32)
    tl.atomic_add(mass_out + rows, tl.sum(probs, axis=1).to(ACC), mask=rows < N, sem="relaxed")
    for k0 in range(0, D, BLOCK_K):
        dims = k0 + tl.arange(0, BLOCK_K)
        out = rows.to(tl.int64)[:, None] * D + dims[None, :]
        in_bounds = (rows[:, None] < N) & (dims[None, :] < D)
        w = w_desc.load([col0, k0]).to(WIDE)
        a1 = tl.dot(probs, dot_operand(w, WIDE, WIDE, WIDE_ROUND_TF32), input_precision=WIDE_PRECISION,
                    out_dtype=ACC)
        tl.atomic_add(a1_out + out, a1, mask=in_bounds, sem="relaxed")
        if NEED_SECOND:
            a2 = tl.dot(probs, dot_operand(w * w, WIDE, WIDE, WIDE_ROUND_TF32), input_precision=WIDE_PRECISION,
                        out_dtype=ACC)
            tl.atomic_add(a2_out + out, a2, mask=in_bounds, sem="relaxed")


@triton.jit
def row_terms_kernel(h_ptr, w_ptr, target_ptr, signs_ptr, mass_ptr, mu_ptr, var_ptr, quadratic_out,
                     sign_term_out, seed, N, D, stride_h, stride_w,
                     NEED_EXPLICIT: tl.constexpr, NEED_IMPLICIT: tl.constexpr, HAS_SIGNS: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr):
    """Per-row epilogue: normalizes A1, A2 by the mass into mu (in place) and var = m2 - mu^2 (in place of A2),
    both saved for backward."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mass = tl.load(mass_ptr + rows, mask=rows < N, other=1.0)[:, None]
    target = tl.load(target_ptr + rows, mask=rows < N, other=0)
    quadratic = tl.zeros((BLOCK_M,), dtype=ACC)
    sign_term = tl.zeros((BLOCK_M,), dtype=ACC)
    for k0 in range(0, D, BLOCK_K):
        dims = k0 + tl.arange(0, BLOCK_K)
        in_bounds = (rows[:, None] < N) & (dims[None, :] < D)
        at = rows.to(tl.int64)[:, None] * D + dims[None, :]
        h = tl.load(h_ptr + rows.to(tl.int64)[:, None] * stride_h + dims[None, :], mask=in_bounds, other=0.0).to(ACC)
        mu = tl.load(mu_ptr + at, mask=in_bounds, other=0.0) / mass
        tl.store(mu_ptr + at, mu, mask=in_bounds)
        if NEED_EXPLICIT:
            var = tl.load(var_ptr + at, mask=in_bounds, other=0.0) / mass - mu * mu
            tl.store(var_ptr + at, var, mask=in_bounds)
            quadratic += tl.sum(h * h * var, axis=1)
        if NEED_IMPLICIT:
            w_target = tl.load(w_ptr + target[:, None] * stride_w + dims[None, :], mask=in_bounds, other=0.0)
            if HAS_SIGNS:
                signs = tl.load(signs_ptr + at, mask=in_bounds, other=0.0).to(ACC)
            else:
                signs = philox_sign_block(seed, rows, dims, D).to(ACC)
            sign_term += tl.sum(signs * h * (mu - w_target.to(ACC)), axis=1)
    tl.store(quadratic_out + rows, quadratic, mask=rows < N)
    tl.store(sign_term_out + rows, sign_term, mask=rows < N)


def linear_ce_forward(launch, input, weight, bias, target, signs: Optional[torch.Tensor], seed: int,
                      need_explicit: bool, need_implicit: bool, plan: Optional[LaunchPlan] = None):
    """Returns (ce, quadratic, sign_term, lse, mu, var) like the C++ op. ``launch(kernel)`` is
    ``torch.library.wrap_triton`` inside the registered op. Inputs are descriptor-ready (see ops.py).
    ``plan`` (tiles, splits, dot types) defaults to ``launch_plan(input.dtype, input.device)``."""
    n_rows, dim = input.shape
    vocab = weight.shape[0]
    if plan is None:
        plan = launch_plan(input.dtype, input.device)
    types = plan.types
    acc = accumulation_dtype(input.dtype)
    has_bias = bias is not None
    bias_arg = bias if has_bias else input  # never read when HAS_BIAS is False

    config = plan.tile("lse_partials")
    n_row_blocks = triton.cdiv(n_rows, config.block_m)
    n_vocab_blocks = triton.cdiv(vocab, config.block_v)
    splits = plan.vocab_splits(n_row_blocks, n_vocab_blocks)
    tiles_per_split = triton.cdiv(n_vocab_blocks, splits)
    partials = torch.empty(3, splits, n_rows, dtype=acc, device=input.device)
    launch(lse_partials_kernel)[(n_row_blocks, splits)](
        input, weight, bias_arg, target, partials[0], partials[1], partials[2], n_rows, vocab, dim,
        input.stride(0), weight.stride(0), tiles_per_split, HAS_BIAS=has_bias, BLOCK_M=config.block_m,
        BLOCK_V=config.block_v, BLOCK_K=config.block_k, num_warps=config.num_warps,
        num_stages=config.num_stages, **types.narrow_args())
    (lse,) = merge_vocab_splits(partials[0], partials[1])
    ce = lse - partials[2].sum(dim=0)

    need_mu = need_explicit or need_implicit
    mu = torch.zeros((n_rows if need_mu else 0, dim), dtype=acc, device=input.device)
    var = torch.zeros((n_rows if need_explicit else 0, dim), dtype=acc, device=input.device)
    quadratic = torch.zeros(n_rows, dtype=acc, device=input.device)
    sign_term = torch.zeros(n_rows, dtype=acc, device=input.device)
    if need_mu and n_rows:
        config = plan.tile("moments")
        grid = (triton.cdiv(n_rows, config.block_m) * triton.cdiv(vocab, config.block_v),)
        mass = torch.zeros(n_rows, dtype=acc, device=input.device)
        launch(moments_kernel)[grid](
            input, weight, bias_arg, lse, mass, mu, var if need_explicit else mu, n_rows, vocab, dim,
            input.stride(0), weight.stride(0), HAS_BIAS=has_bias, NEED_SECOND=need_explicit,
            GROUP_M=config.group_m, BLOCK_M=config.block_m, BLOCK_V=config.block_v, BLOCK_K=config.block_k,
            num_warps=config.num_warps, num_stages=config.num_stages, **types.narrow_args(), **types.wide_args())
        config = plan.tile("row_terms")
        launch(row_terms_kernel)[(triton.cdiv(n_rows, config.block_m),)](
            input, weight, target, signs if signs is not None else mu, mass, mu,
            var if need_explicit else mu, quadratic, sign_term, seed, n_rows, dim, input.stride(0), weight.stride(0),
            NEED_EXPLICIT=need_explicit, NEED_IMPLICIT=need_implicit, HAS_SIGNS=signs is not None,
            BLOCK_M=config.block_m, BLOCK_K=config.block_k, ACC=types.acc, num_warps=config.num_warps,
            num_stages=config.num_stages)
    return ce, quadratic, sign_term, lse, mu, var
