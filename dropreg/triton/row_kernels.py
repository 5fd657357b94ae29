"""The chunked driver's row kernels (dropreg/chunked.py, docs/math.md 7.3): the O(N d) and O(V d) passes around the
vocabulary sweeps, each walking its rows' d-vectors once. :class:`dropreg.torch_epilogues.TorchEpilogues` defines what
each computes; :class:`dropreg.triton.epilogues.TritonEpilogues` launches them.

* ``finish_moments_kernel``: a row block's ``[A1 | A2]`` into ``[mu | var]`` in place (the dominant entry made exact)
  and, for a head held whole, its per-row terms.
* ``sweep_rows_kernel``: what a row block's gradient sweep takes per row (``[H; T]``, ``gR' q``, ``row_const``, the
  dominant class's exact ``t`` and grad_W part, grad_input's initial value).
* ``weight_gradient_kernel``: a chunk's rows of grad_W written once (GEMM product, scattered rows, ``2 W * sq``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .epilogue_helpers import second_block, to_operand
from .utils import INTERPRETED


def row_block_d(dtype: torch.dtype) -> tuple[int, int]:
    """(rows per program, d tile) of the row kernels, which loop over each row's d-vectors: 2 x 128, 4 x 64 in fp64
    (larger tiles spilled registers in edge specializations, tools/compile_report.py)."""
    if INTERPRETED:
        return 4, 8
    return (4, 64) if dtype == torch.float64 else (2, 128)


def weight_gradient_tile(dtype: torch.dtype) -> tuple[int, int]:
    """(classes, d) of the grad_W finishing kernel's tile: 4 x 128, 2 x 128 for an fp64 product (8 x 128 spilled
    registers in edge specializations, tools/compile_report.py)."""
    if INTERPRETED:
        return 4, 8
    return (2, 128) if dtype == torch.float64 else (4, 128)


# Only what shapes a kernel's loads is a constexpr (its variants: the terms, the dominant class, the second moment,
# the operand dtype); the other switches are runtime flags, and the row and class counts are not specialized (to 1
# or as multiples of 16: the loads' alignment follows d and the strides), so each kernel compiles in a few variants.
@triton.jit(do_not_specialize=["R", "scaled", "has_terms", "has_bias", "need_explicit", "need_implicit"])
def finish_moments_kernel(moments_ptr, normalizer_ptr, w_ptr, exact_ptr, seen_ptr, top_col_ptr, scale_ptr, h_ptr, b_ptr,
                          target_ptr, signs_ptr, lse_ptr, ce_out, quadratic_out, sign_term_out, R, D, stride_w,
                          stride_w_col, stride_h, stride_h_col, scaled, has_terms, has_bias, need_explicit,
                          need_implicit, HAS_M2: tl.constexpr, HAS_TOP: tl.constexpr, OPERAND: tl.constexpr,
                          BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """``[A1 | A2]`` -> ``[mu | var]`` in place, one program per BLOCK_R rows walking their d-vectors once; the
    normalizer (the mass) gets the dominant entry's exact value too. ``has_terms`` (a head held whole): also
    ``ce = lse - h . W_y - b_y``, ``quadratic = (h*h) . var``, ``sign_term = (sigma*h) . (mu - W_y)``
    (dropreg.rows.whole_head_terms)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    width = D * (2 if HAS_M2 else 1)
    norm = tl.load(normalizer_ptr + rows, mask=row_ok, other=1.0)
    acc: tl.constexpr = normalizer_ptr.dtype.element_ty
    if HAS_TOP:
        exact_1d = tl.load(exact_ptr + rows, mask=row_ok, other=0.0)
        seen_1d = tl.load(seen_ptr + rows, mask=row_ok, other=0.0)
        seen = seen_1d[:, None]
        top_row = tl.load(top_col_ptr + rows, mask=row_ok, other=0)
        norm = norm + (exact_1d - seen_1d)
        tl.store(normalizer_ptr + rows, norm, mask=row_ok)
        share = (exact_1d / norm)[:, None]  # the dominant entry's, exactly 1 on a saturated row
    scale = tl.full((), 1.0, acc)  # fp16's square scale, else 1 (exact)
    if scaled:
        scale = tl.load(scale_ptr).to(acc)
    target = tl.zeros((BLOCK_R,), dtype=tl.int64)
    if has_terms:
        target = tl.load(target_ptr + rows, mask=row_ok, other=0)
    z_target = tl.zeros((BLOCK_R,), dtype=acc)
    quadratic = tl.zeros((BLOCK_R,), dtype=acc)
    sign_term = tl.zeros((BLOCK_R,), dtype=acc)
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        ok = row_ok[:, None] & (dims[None, :] < D)
        at = rows.to(tl.int64)[:, None] * width + dims[None, :]
        a1 = tl.load(moments_ptr + at, mask=ok, other=0.0)
        if HAS_TOP:  # dropreg.chunk_buffers.DominantEntry.normalize: the others' part, then the exact share
            w = tl.load(w_ptr + top_row[:, None] * stride_w + dims[None, :] * stride_w_col, mask=ok, other=0.0)
            w_exact = w.to(acc)
            w_seen = to_operand(w_exact, OPERAND).to(acc)
            mu = (a1 - seen * w_seen) / norm[:, None] + share * w_exact
        else:
            mu = a1 / norm[:, None]
        tl.store(moments_ptr + at, mu, mask=ok)
        var = tl.zeros((BLOCK_R, BLOCK_D), dtype=acc)
        if HAS_M2:
            a2 = tl.load(moments_ptr + at + D, mask=ok, other=0.0)
            if HAS_TOP:  # dropreg.chunk_buffers.squares_operand, as the GEMMs saw it
                square_seen = to_operand(w_seen * w_seen, OPERAND).to(acc)
                if scaled:
                    square_seen = to_operand(w_exact * w_exact * scale, OPERAND).to(acc)
                m2 = (a2 - seen * square_seen) / scale / norm[:, None] + share * (w_exact * w_exact)
            else:
                m2 = a2 / scale / norm[:, None]
            var = m2 - mu * mu
            tl.store(moments_ptr + at + D, var, mask=ok)
        if has_terms:
            h = tl.load(h_ptr + rows.to(tl.int64)[:, None] * stride_h + dims[None, :] * stride_h_col, mask=ok,
                        other=0.0).to(acc)
            w_target = tl.load(w_ptr + target[:, None] * stride_w + dims[None, :] * stride_w_col, mask=ok,
                               other=0.0).to(acc)
            z_target += tl.sum(h * w_target, axis=1)
            if need_explicit:
                quadratic += tl.sum(h * h * var, axis=1)
            if need_implicit:
                u = tl.load(signs_ptr + rows.to(tl.int64)[:, None] * D + dims[None, :], mask=ok,
                            other=0.0).to(acc) * h
                sign_term += tl.sum(u * (mu - w_target), axis=1)
    if has_terms:
        if has_bias:
            z_target += tl.load(b_ptr + target, mask=row_ok, other=0.0).to(acc)
        tl.store(ce_out + rows, tl.load(lse_ptr + rows, mask=row_ok, other=0.0) - z_target, mask=row_ok)
        tl.store(quadratic_out + rows, quadratic, mask=row_ok)
        tl.store(sign_term_out + rows, sign_term, mask=row_ok)


@triton.jit(do_not_specialize=["R", "has_bias", "has_grad_mu", "fold_rows", "want_h", "want_w"])
def sweep_rows_kernel(h_ptr, w_ptr, b_ptr, target_ptr, top_ptr, signs_ptr, mu_ptr, var_ptr, lse_ptr, g_ce_ptr,
                      g_r_ptr, g_i_ptr, g_i_target_ptr, g_mu_ptr, row_const_out, stacked_out, g_r_q_out, t_top_out,
                      grad_h_out, values_out, scales_out, R, D, stride_h, stride_h_col, stride_w, stride_w_col,
                      stride_mu, stride_var, has_bias, has_grad_mu, fold_rows, want_h, want_w,
                      NEED_EXPLICIT: tl.constexpr, NEED_IMPLICIT: tl.constexpr, HAS_TOP: tl.constexpr,
                      OPERAND: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """A row block's SweepRows (TorchEpilogues.sweep_rows), one program per BLOCK_R rows walking their d-vectors
    once: ``[H; T]`` and ``gR' q`` in the operand dtype, ``row_const``, the dominant class's exact ``t`` and its
    grad_W part (unscaled, with its scale ``s_k``), grad_input's initial value. (The target rows' ``-g_i u`` is formed
    where grad_W sums it, weight_gradient_kernel.)"""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    acc: tl.constexpr = lse_ptr.dtype.element_ty
    row_const = tl.load(g_ce_ptr + rows, mask=row_ok, other=0.0)
    g_r = tl.load(g_r_ptr + rows, mask=row_ok, other=0.0)[:, None]
    g_i = tl.load(g_i_ptr + rows, mask=row_ok, other=0.0)[:, None]
    g_i_target = tl.load(g_i_target_ptr + rows, mask=row_ok, other=0.0)[:, None]
    target = tl.load(target_ptr + rows, mask=row_ok, other=0)
    top = target
    if HAS_TOP:
        top = tl.load(top_ptr + rows, mask=row_ok, other=0)
    t_top = tl.zeros((BLOCK_R,), dtype=acc)
    z_top = tl.zeros((BLOCK_R,), dtype=acc)
    row_at = rows.to(tl.int64)[:, None] * D
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        ok = row_ok[:, None] & (dims[None, :] < D)
        at = row_at + dims[None, :]
        h = tl.load(h_ptr + rows.to(tl.int64)[:, None] * stride_h + dims[None, :] * stride_h_col, mask=ok,
                    other=0.0).to(acc)
        mu = tl.load(mu_ptr + rows.to(tl.int64)[:, None] * stride_mu + dims[None, :], mask=ok, other=0.0)
        T = tl.zeros((BLOCK_R, BLOCK_D), dtype=acc)
        grad_h = tl.zeros((BLOCK_R, BLOCK_D), dtype=acc)
        g_r_q = tl.zeros((BLOCK_R, BLOCK_D), dtype=acc)
        if NEED_EXPLICIT:
            var = tl.load(var_ptr + rows.to(tl.int64)[:, None] * stride_var + dims[None, :], mask=ok, other=0.0)
            g_r_q = g_r * h * h
            tl.store(g_r_q_out + at, to_operand(g_r_q, OPERAND), mask=ok)
            T -= 2.0 * g_r_q * mu
            row_const += tl.sum(g_r_q * (mu * mu - var), axis=1)
            if fold_rows:
                grad_h += 2.0 * g_r * h * var
        if NEED_IMPLICIT:
            signs = tl.load(signs_ptr + at, mask=ok, other=0.0).to(acc)
            u = signs * h
            T += g_i * u
            row_const -= tl.sum(g_i * mu * u, axis=1)
            if fold_rows:
                grad_h += g_i * signs * mu
            if want_h:
                w_target = tl.load(w_ptr + target[:, None] * stride_w + dims[None, :] * stride_w_col, mask=ok,
                                   other=0.0).to(acc)
                grad_h -= g_i_target * signs * w_target
        if has_grad_mu:  # mu's own upstream gradient gbar: T += gbar, row_const -= mu . gbar
            g_mu = tl.load(g_mu_ptr + at, mask=ok, other=0.0).to(acc)
            T += g_mu
            row_const -= tl.sum(g_mu * mu, axis=1)
        tl.store(stacked_out + at, to_operand(h, OPERAND), mask=ok)
        tl.store(stacked_out + second_block(at, R, D), to_operand(T, OPERAND), mask=ok)
        if want_h:
            tl.store(grad_h_out + at, grad_h, mask=ok)
        if HAS_TOP:
            w_top = tl.load(w_ptr + top[:, None] * stride_w + dims[None, :] * stride_w_col, mask=ok,
                            other=0.0).to(acc)
            t_top += tl.sum(T * w_top, axis=1)
            z_top += tl.sum(h * w_top, axis=1)
            part = T
            if NEED_EXPLICIT:
                t_top += tl.sum(g_r_q * (w_top * w_top), axis=1)
                part += 2.0 * g_r_q * w_top
            if want_w:
                tl.store(values_out + at, part, mask=ok)
    tl.store(row_const_out + rows, row_const, mask=row_ok)
    if HAS_TOP:
        tl.store(t_top_out + rows, t_top, mask=row_ok)
        if want_w:
            if has_bias:
                z_top += tl.load(b_ptr + top, mask=row_ok, other=0.0).to(acc)
            lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
            tl.store(scales_out + rows, tl.exp(z_top - lse), mask=row_ok)


@triton.jit(do_not_specialize=["C", "values_rows", "has_scatter", "has_u"])
def weight_gradient_kernel(out_ptr, product_ptr, w_ptr, sq_ptr, order_ptr, class_starts_ptr, values_ptr, scales_ptr,
                           h_ptr, signs_ptr, C, D, values_rows, stride_w, stride_w_col, stride_h, stride_h_col,
                           has_scatter, has_u, HAS_SQ: tl.constexpr, OUT: tl.constexpr, BLOCK_C: tl.constexpr,
                           BLOCK_D: tl.constexpr):
    """A chunk's rows of grad_W written once: ``product + (its scattered rows' sums) + 2 W * sq``, rounded once to
    grad_W's dtype (dropreg.chunk_buffers.add_weight_gradient). Each class's scattered rows are walked in their
    sorted order (dropreg.chunk_buffers.RowScatter): no atomics. Entries past ``values_rows`` are ``signs * h`` of
    row ``entry - values_rows`` (``has_u``)."""
    classes = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    dims = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    class_ok = classes < C
    ok = class_ok[:, None] & (dims[None, :] < D)
    at = classes.to(tl.int64)[:, None] * D + dims[None, :]
    total = tl.load(product_ptr + at, mask=ok, other=0.0)
    if has_scatter:
        first = tl.load(class_starts_ptr + classes, mask=class_ok, other=0)
        count = tl.load(class_starts_ptr + classes + 1, mask=class_ok, other=0) - first
        scattered = tl.zeros((BLOCK_C, BLOCK_D), dtype=total.dtype)
        for k in range(0, tl.max(count, axis=0)):
            present = class_ok & (k < count)
            entry = tl.load(order_ptr + first + k, mask=present, other=0)
            scale = tl.load(scales_ptr + entry, mask=present, other=0.0)
            stored = present & (entry < values_rows)
            values = tl.load(values_ptr + entry[:, None] * D + dims[None, :], mask=stored[:, None] & ok, other=0.0)
            if has_u:
                row = entry - values_rows
                formed = (present & (entry >= values_rows))[:, None] & ok
                h = tl.load(h_ptr + row[:, None] * stride_h + dims[None, :] * stride_h_col, mask=formed, other=0.0)
                signs = tl.load(signs_ptr + row[:, None] * D + dims[None, :], mask=formed, other=0.0)
                values += signs.to(values.dtype) * h.to(values.dtype)
            scattered += values * scale[:, None]
        total += scattered
    if HAS_SQ:
        w = tl.load(w_ptr + classes.to(tl.int64)[:, None] * stride_w + dims[None, :] * stride_w_col, mask=ok,
                    other=0.0).to(total.dtype)
        total += 2.0 * w * tl.load(sq_ptr + at, mask=ok, other=0.0)
    tl.store(out_ptr + at, to_operand(total, OUT), mask=ok)
