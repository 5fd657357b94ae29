"""Triton epilogues of the chunked driver (dropreg/chunked.py, docs/math.md 7.3): the elementwise work on one
R x C chunk of fp32 products, between the cuBLAS GEMMs, and (:class:`TritonEpilogues`) the launches of the row kernels
of dropreg/triton/row_kernels.py. Each chunk kernel reads its chunk once and writes the next GEMM's operand in the
operand dtype; none uses atomics. :class:`dropreg.torch_epilogues.TorchEpilogues` defines what each computes (same
signatures) and the tests compare the two under ``TRITON_INTERPRET=1``.

* ``softmax_chunk_kernel``: one program per BLOCK_R rows; one pass finds each row's chunk maximum and its column and
  writes ``P = exp(z + b - reference)``, summed exactly and as rounded; a program one of whose rows' references
  moved (dropreg.rows.moved_reference: rare) reads its rows again to write them on the new reference.
* ``gradient_chunk_kernel``: one program per ROW_TILES x BLOCK_R x BLOCK_C tiles; ``G = s (row_const + t) -
  g_ce [v = y]`` and ``S`` from z, t, and G's column sums for grad_b. Reads z (and t) once, writes G (and S) once.
* ``rdrop_softmax_chunk_kernel`` / ``rdrop_gradient_chunk_kernel``: the same for R-Drop's two passes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..chunk_buffers import SweepRows, add_weight_gradient
from ..gemm import mm
from ..rows import reference_headroom
from .epilogue_helpers import second_block, to_operand
from .row_kernels import (finish_moments_kernel, row_block_d, sweep_rows_kernel, weight_gradient_kernel,
                          weight_gradient_tile)
from .utils import FP_FUSION, INTERPRETED, TL_DTYPES

# The chunk kernels' row count is not specialized (to 1, or as a multiple of 16): nothing in them gains from it, and
# each specialization is one more compilation. The interpreter gets small tiles so that the tests' tiny chunks still
# span several tiles.
NUM_WARPS = 1 if INTERPRETED else 8
# Row tiles per program of the gradient epilogues: each program writes one row of column sums for grad_b, so the
# sums written for grad_b are 1/128 of G (at 8-row tiles) rather than 1/8.
ROW_TILES = 2 if INTERPRETED else 16


def row_tile(dtype: torch.dtype) -> tuple[int, int]:
    """(rows per program, column tile) of the softmax epilogues, which loop over the chunk's columns: 4 x 512, or
    4 x 256 for fp64 logits (8 x 1024 spilled registers in edge specializations, tools/compile_report.py)."""
    if INTERPRETED:
        return 4, 8
    return (4, 256) if dtype == torch.float64 else (4, 512)


def gradient_tile(dtype: torch.dtype) -> tuple[int, int]:
    """(rows, columns) of a gradient epilogue's tile, ROW_TILES of which one program walks: 8 x 128, 4 x 128 for fp64
    logits (two registers per value). Larger tiles spilled registers in specializations the JIT makes for edge sizes
    (a size of 1 or not a multiple of 16; tools/compile_report.py compiles them all)."""
    if INTERPRETED:
        return 4, 8
    return (4, 128) if dtype == torch.float64 else (8, 128)


@triton.jit
def _tile(row_tile, R, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Row tile ``row_tile`` of this program's column tile of a contiguous R x C chunk: rows, columns, masks,
    offsets."""
    rows = row_tile * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < R
    inside = row_ok[:, None] & (cols[None, :] < C)
    return rows, cols, row_ok, inside, rows.to(tl.int64)[:, None] * C + cols[None, :]


@triton.jit
def _shift(maximum):
    """An online softmax's shift: its maximum, or 0 for rows whose logits so far are all -inf
    (dropreg.rows.logit_shift)."""
    return tl.where(maximum == float("-inf"), 0.0, maximum)


@triton.jit
def _store_col_sums(col_sums_out, sums, cols, C):
    """This program's column sums (fp32, before rounding), for grad_b: row ``program_id(0)`` of a (row programs) x C
    buffer that the launcher sums over the programs in order (no atomics)."""
    tl.store(col_sums_out + tl.program_id(0).to(tl.int64) * C + cols, sums, mask=cols < C)


@triton.jit
def _chunk_logits(z_ptr, b_ptr, rows, cols, R, C, HAS_BIAS: tl.constexpr):
    """``z + b`` for a (rows x cols) tile of a contiguous R x C chunk; entries outside it read as -inf."""
    inside = (rows[:, None] < R) & (cols[None, :] < C)
    z = tl.load(z_ptr + rows.to(tl.int64)[:, None] * C + cols[None, :], mask=inside, other=float("-inf"))
    return _add_bias(z, b_ptr, cols, C, inside, HAS_BIAS)


@triton.jit
def _write_probs(z, shift, probs_ptr, rows, cols, row_ok, C, OPERAND: tl.constexpr):
    """``P = exp(z - shift)`` of a tile written in the operand dtype; returns its row sums, exact and as written."""
    e = tl.exp(z - shift[:, None])
    p = to_operand(e, OPERAND)
    tl.store(probs_ptr + rows.to(tl.int64)[:, None] * C + cols[None, :], p, mask=row_ok[:, None] & (cols[None, :] < C))
    return tl.sum(e, axis=1), tl.sum(p.to(e.dtype), axis=1)


@triton.jit
def _add_bias(z, b_ptr, cols, C, inside, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        z += tl.load(b_ptr + cols, mask=cols < C, other=0.0).to(z.dtype)[None, :]
    return tl.where(inside, z, float("-inf"))


@triton.jit
def _rdrop_tile(z1_ptr, z2_ptr, b_ptr, rows, cols, R, C, HAS_BIAS: tl.constexpr):
    """``(z1 + b, z2 + b, D = z1 - z2)`` for a tile, D from the products before the bias (where it cancels) and 0
    outside the chunk, as TorchEpilogues forms it."""
    inside = (rows[:, None] < R) & (cols[None, :] < C)
    at = rows.to(tl.int64)[:, None] * C + cols[None, :]
    z1 = tl.load(z1_ptr + at, mask=inside, other=0.0)
    z2 = tl.load(z2_ptr + at, mask=inside, other=0.0)
    diff = z1 - z2
    return (_add_bias(z1, b_ptr, cols, C, inside, HAS_BIAS), _add_bias(z2, b_ptr, cols, C, inside, HAS_BIAS),
            diff)


@triton.jit(do_not_specialize=["R"])
def softmax_chunk_kernel(z_ptr, b_ptr, probs_ptr, max_ptr, sum_ptr, mass_ptr, rescale_out, top_p_out, top_col_out,
                         R, C, HAS_BIAS: tl.constexpr, WRITE_PROBS: tl.constexpr, HEADROOM: tl.constexpr,
                         OPERAND: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    acc: tl.constexpr = max_ptr.dtype.element_ty  # the states' dtype: fp32, or fp64 for fp64 problems
    chunk_max = tl.full((BLOCK_R,), float("-inf"), dtype=acc)
    top_col = tl.zeros((BLOCK_R,), dtype=tl.int32)
    online_sum = tl.zeros((BLOCK_R,), dtype=acc)  # without probabilities: sum exp(z - chunk max so far), one pass
    old_max = tl.load(max_ptr + rows, mask=row_ok, other=0.0)
    # an unset reference starts at the chunk's first logit (dropreg.rows.moved_reference): written as it is read
    first = _chunk_logits(z_ptr, b_ptr, rows, tl.arange(0, 1), R, C, HAS_BIAS)
    start = tl.where(old_max == float("-inf"), tl.max(first, axis=1), old_max)
    start_shift = _shift(start)
    written_sum = tl.zeros((BLOCK_R,), dtype=acc)  # with probabilities: sum exp(z - start), as written
    written_rounded = tl.zeros((BLOCK_R,), dtype=acc)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        z = _chunk_logits(z_ptr, b_ptr, rows, cols, R, C, HAS_BIAS)
        tile_max = tl.max(z, axis=1)
        tile_col = c0 + tl.argmax(z, axis=1)
        better = tile_max > chunk_max  # strict: the first column reaching the maximum, as torch.max
        top_col = tl.where(better, tile_col, top_col)
        if WRITE_PROBS:
            tile_sum, tile_rounded = _write_probs(z, start_shift, probs_ptr, rows, cols, row_ok, C, OPERAND)
            written_sum += tile_sum
            written_rounded += tile_rounded
        else:
            running = _shift(tl.maximum(chunk_max, tile_max))
            online_sum = online_sum * tl.exp(chunk_max - running) + tl.sum(tl.exp(z - running[:, None]), axis=1)
        chunk_max = tl.where(better, tile_max, chunk_max)
    new_max = tl.where(chunk_max > start + HEADROOM, chunk_max, start)  # dropreg.rows.moved_reference
    shift = _shift(new_max)
    exp_sum = online_sum * tl.exp(_shift(chunk_max) - shift)  # at most e^HEADROOM: the chunk is within it
    rounded_sum = tl.zeros((BLOCK_R,), dtype=acc)
    if WRITE_PROBS:  # written against the start in the pass above; again only where a row's reference moved
        exp_sum = tl.zeros((BLOCK_R,), dtype=acc)
        if tl.max((new_max != start).to(tl.int32), axis=0) > 0:
            for c0 in range(0, C, BLOCK_C):
                cols = c0 + tl.arange(0, BLOCK_C)
                z = _chunk_logits(z_ptr, b_ptr, rows, cols, R, C, HAS_BIAS)
                tile_sum, tile_rounded = _write_probs(z, shift, probs_ptr, rows, cols, row_ok, C, OPERAND)
                exp_sum += tile_sum
                rounded_sum += tile_rounded
        else:
            exp_sum = written_sum
            rounded_sum = written_rounded
    rescale = tl.exp(old_max - shift)
    top_p = tl.exp(chunk_max - shift)
    tl.store(sum_ptr + rows, tl.load(sum_ptr + rows, mask=row_ok, other=0.0) * rescale + exp_sum, mask=row_ok)
    if WRITE_PROBS:
        mass = tl.load(mass_ptr + rows, mask=row_ok, other=0.0) * rescale + rounded_sum
        tl.store(mass_ptr + rows, mass, mask=row_ok)
    tl.store(max_ptr + rows, new_max, mask=row_ok)
    tl.store(rescale_out + rows, rescale, mask=row_ok)
    tl.store(top_p_out + rows, top_p, mask=row_ok)
    tl.store(top_col_out + rows, top_col.to(tl.int64), mask=row_ok)


@triton.jit(do_not_specialize=["R"])
def gradient_chunk_kernel(z_ptr, b_ptr, t_ptr, lse_ptr, row_const_ptr, g_ce_ptr, target_ptr, top_col_ptr, t_top_ptr,
                          out_ptr, col_sums_out, R, C, HAS_BIAS: tl.constexpr, HAS_T: tl.constexpr,
                          HAS_TARGET: tl.constexpr, HAS_TOP: tl.constexpr, WRITE_S: tl.constexpr,
                          COL_SUMS: tl.constexpr, OPERAND: tl.constexpr, BLOCK_R: tl.constexpr,
                          BLOCK_C: tl.constexpr, ROW_TILES: tl.constexpr):
    col_sums = tl.zeros((BLOCK_C,), dtype=lse_ptr.dtype.element_ty)
    for tile in range(ROW_TILES):  # several row tiles per program: fewer column sums written
        rows, cols, row_ok, inside, at = _tile(tl.program_id(0) * ROW_TILES + tile, R, C, BLOCK_R, BLOCK_C)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=float("inf"))  # rows past R: probability 0
        probs = tl.exp(_chunk_logits(z_ptr, b_ptr, rows, cols, R, C, HAS_BIAS) - lse[:, None])
        modulation = tl.load(row_const_ptr + rows, mask=row_ok, other=0.0)[:, None]
        if HAS_T:
            t = tl.load(t_ptr + at, mask=inside, other=0.0)
            if HAS_TOP:  # the row's dominant class: its exact t (dropreg.chunked.gradient_sweep)
                top_col = tl.load(top_col_ptr + rows, mask=row_ok, other=-1)
                t_top = tl.load(t_top_ptr + rows, mask=row_ok, other=0.0)
                t = tl.where(cols[None, :] == top_col[:, None], t_top[:, None], t)
            modulation += t
        g = probs * modulation
        if HAS_TARGET:
            target = tl.load(target_ptr + rows, mask=row_ok, other=-1)
            g_ce = tl.load(g_ce_ptr + rows, mask=row_ok, other=0.0)
            g -= tl.where(cols[None, :] == target[:, None], g_ce[:, None], 0.0)
        tl.store(out_ptr + at, to_operand(g, OPERAND), mask=inside)
        if COL_SUMS:
            col_sums += tl.sum(tl.where(inside, g, 0.0), axis=0)
        if WRITE_S:
            if HAS_TOP:  # S without the dominant class: the driver adds that class's grad_W part exactly
                top_col_s = tl.load(top_col_ptr + rows, mask=row_ok, other=-1)
                probs = tl.where(cols[None, :] == top_col_s[:, None], 0.0, probs)
            tl.store(out_ptr + second_block(at, R, C), to_operand(probs, OPERAND), mask=inside)
    if COL_SUMS:
        _store_col_sums(col_sums_out, col_sums, tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C), C)


@triton.jit(do_not_specialize=["R"])
def rdrop_softmax_chunk_kernel(z1_ptr, z2_ptr, b_ptr, max_ptr, sum_ptr, weighted_d_ptr, R, C,
                               HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """The (2, R) states are updated in place: row r of pass i at ``i * R + r``."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    acc: tl.constexpr = max_ptr.dtype.element_ty  # the states' dtype: fp32, or fp64 for fp64 problems
    # one pass: sums on the scale of each pass's running maximum over the chunk, rescaled as it grows
    max1 = tl.full((BLOCK_R,), float("-inf"), dtype=acc)
    max2 = tl.full((BLOCK_R,), float("-inf"), dtype=acc)
    sum1 = tl.zeros((BLOCK_R,), dtype=acc)
    sum2 = tl.zeros((BLOCK_R,), dtype=acc)
    d1 = tl.zeros((BLOCK_R,), dtype=acc)
    d2 = tl.zeros((BLOCK_R,), dtype=acc)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        z1, z2, diff = _rdrop_tile(z1_ptr, z2_ptr, b_ptr, rows, cols, R, C, HAS_BIAS)
        new1 = tl.maximum(max1, tl.max(z1, axis=1))  # the true maxima (-inf while a row has seen no logit)
        new2 = tl.maximum(max2, tl.max(z2, axis=1))
        run1, run2 = _shift(new1), _shift(new2)
        e1 = tl.exp(z1 - run1[:, None])
        e2 = tl.exp(z2 - run2[:, None])
        scale1, scale2 = tl.exp(max1 - run1), tl.exp(max2 - run2)
        sum1 = sum1 * scale1 + tl.sum(e1, axis=1)
        sum2 = sum2 * scale2 + tl.sum(e2, axis=1)
        d1 = d1 * scale1 + tl.sum(e1 * diff, axis=1)
        d2 = d2 * scale2 + tl.sum(e2 * diff, axis=1)
        max1, max2 = new1, new2
    old1 = tl.load(max_ptr + rows, mask=row_ok, other=0.0)
    old2 = tl.load(max_ptr + R + rows, mask=row_ok, other=0.0)
    new1, new2 = tl.maximum(old1, max1), tl.maximum(old2, max2)
    shift1, shift2 = _shift(new1), _shift(new2)
    to_new1, to_new2 = tl.exp(_shift(max1) - shift1), tl.exp(_shift(max2) - shift2)
    sum1, sum2, d1, d2 = sum1 * to_new1, sum2 * to_new2, d1 * to_new1, d2 * to_new2
    rescale1, rescale2 = tl.exp(old1 - shift1), tl.exp(old2 - shift2)
    tl.store(sum_ptr + rows, tl.load(sum_ptr + rows, mask=row_ok, other=0.0) * rescale1 + sum1, mask=row_ok)
    tl.store(sum_ptr + R + rows, tl.load(sum_ptr + R + rows, mask=row_ok, other=0.0) * rescale2 + sum2, mask=row_ok)
    tl.store(weighted_d_ptr + rows, tl.load(weighted_d_ptr + rows, mask=row_ok, other=0.0) * rescale1 + d1,
             mask=row_ok)
    tl.store(weighted_d_ptr + R + rows, tl.load(weighted_d_ptr + R + rows, mask=row_ok, other=0.0) * rescale2 + d2,
             mask=row_ok)
    tl.store(max_ptr + rows, new1, mask=row_ok)
    tl.store(max_ptr + R + rows, new2, mask=row_ok)


@triton.jit(do_not_specialize=["R"])
def rdrop_gradient_chunk_kernel(z1_ptr, z2_ptr, b_ptr, lse_ptr, expected_d_ptr, g_ce1_ptr, g_ce2_ptr, half_kl_ptr,
                                target_ptr, out_ptr, col_sums_out, R, C, HAS_BIAS: tl.constexpr,
                                COL_SUMS: tl.constexpr, OPERAND: tl.constexpr, BLOCK_R: tl.constexpr,
                                BLOCK_C: tl.constexpr, ROW_TILES: tl.constexpr):
    col_sums = tl.zeros((BLOCK_C,), dtype=lse_ptr.dtype.element_ty)
    for tile in range(ROW_TILES):  # several row tiles per program: fewer column sums written
        rows, cols, row_ok, inside, at = _tile(tl.program_id(0) * ROW_TILES + tile, R, C, BLOCK_R, BLOCK_C)
        z1, z2, diff = _rdrop_tile(z1_ptr, z2_ptr, b_ptr, rows, cols, R, C, HAS_BIAS)
        p1 = tl.exp(z1 - tl.load(lse_ptr + rows, mask=row_ok, other=float("inf"))[:, None])
        p2 = tl.exp(z2 - tl.load(lse_ptr + R + rows, mask=row_ok, other=float("inf"))[:, None])
        ed1 = tl.load(expected_d_ptr + rows, mask=row_ok, other=0.0)[:, None]
        ed2 = tl.load(expected_d_ptr + R + rows, mask=row_ok, other=0.0)[:, None]
        g_ce1 = tl.load(g_ce1_ptr + rows, mask=row_ok, other=0.0)[:, None]
        g_ce2 = tl.load(g_ce2_ptr + rows, mask=row_ok, other=0.0)[:, None]
        k = tl.load(half_kl_ptr + rows, mask=row_ok, other=0.0)[:, None]
        at_target = cols[None, :] == tl.load(target_ptr + rows, mask=row_ok, other=-1)[:, None]
        g1 = p1 * (g_ce1 + k * (diff - ed1 + 1.0)) - k * p2 - tl.where(at_target, g_ce1, 0.0)
        g2 = p2 * (g_ce2 - k * (diff - ed2 - 1.0)) - k * p1 - tl.where(at_target, g_ce2, 0.0)
        tl.store(out_ptr + at, to_operand(g1, OPERAND), mask=inside)
        tl.store(out_ptr + second_block(at, R, C), to_operand(g2, OPERAND), mask=inside)
        if COL_SUMS:  # grad_b takes G1 + G2
            col_sums += tl.sum(tl.where(inside, g1 + g2, 0.0), axis=0)
    if COL_SUMS:
        _store_col_sums(col_sums_out, col_sums, tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C), C)


def _placeholder(dtype, device):
    """A one-element tensor passed for an argument a kernel will not read (its option is off)."""
    return torch.empty(1, dtype=dtype, device=device)


def _bias_arg(bias, like):
    return like if bias is None else bias.contiguous()  # never read when HAS_BIAS is False


def _col_sums_buffer(grad_b, row_programs, cols, like):
    """Where a gradient epilogue's programs write their column sums for ``grad_b`` (a placeholder without one)."""
    return like if grad_b is None else torch.empty(row_programs, cols, dtype=like.dtype, device=like.device)


def _add_col_sums(grad_b, col_sums):
    if grad_b is not None:
        grad_b += col_sums.sum(dim=0)


def _launch_directly(kernel):
    return kernel


class TritonEpilogues:
    """:class:`dropreg.chunked.TorchEpilogues`'s functions as Triton launches (CUDA, or CPU tensors under
    ``TRITON_INTERPRET=1``). The chunk views are contiguous (dropreg.chunked.ChunkBuffers). ``launch(kernel)`` is
    what ``kernel[grid](...)`` goes through: the compile report passes a recorder."""

    name = "triton"

    def __init__(self, launch=_launch_directly):
        self.launch = launch

    def softmax_chunk(self, z, bias, running_max, running_sum, mass, probs, *, keep_logits=False):
        # the kernel never writes z: keep_logits holds whatever it says
        rows, cols = z.shape
        rescale = torch.empty_like(running_max)
        top_p = torch.empty_like(running_max)
        top_col = torch.empty(rows, dtype=torch.int64, device=z.device)
        write_probs = probs is not None
        block_r, block_c = row_tile(z.dtype)
        self.launch(softmax_chunk_kernel)[(triton.cdiv(rows, block_r),)](
            z, _bias_arg(bias, z), probs if write_probs else z, running_max, running_sum,
            mass if write_probs else running_sum, rescale, top_p, top_col, rows, cols, HAS_BIAS=bias is not None,
            WRITE_PROBS=write_probs, HEADROOM=reference_headroom((probs if write_probs else z).dtype),
            OPERAND=TL_DTYPES[(probs if write_probs else z).dtype],
            BLOCK_R=block_r, BLOCK_C=block_c, num_warps=NUM_WARPS, enable_fp_fusion=FP_FUSION)
        return rescale, top_p, top_col

    def finish_moments(self, moments, normalizer, weight, top, operand, square_scale, head=None):
        rows, width = moments.shape
        dim = weight.shape[1]
        block_r, block_d = row_block_d(moments.dtype)
        has_top = top is not None
        has_terms = head is not None
        need_implicit = has_terms and head.need_implicit
        # arguments a switched-off option never reads: of the dtype it would have, so that one compilation serves all
        acc, narrow, index = (_placeholder(dtype, moments.device) for dtype in (moments.dtype, weight.dtype,
                                                                                torch.int64))
        h = head.h if has_terms else narrow
        self.launch(finish_moments_kernel)[(triton.cdiv(rows, block_r),)](
            moments, normalizer, weight, top.exact if has_top else acc, top.seen if has_top else acc,
            top.col if has_top else index, acc if square_scale is None else square_scale, h,
            _bias_arg(head.bias if has_terms else None, narrow), head.target.contiguous() if has_terms else index,
            head.signs.contiguous() if need_implicit else narrow, head.lse if has_terms else acc,
            *((head.ce, head.quadratic, head.sign_term) if has_terms else (acc,) * 3), rows, dim,
            *weight.stride(), *(h.stride() if has_terms else (dim, 1)), int(square_scale is not None), int(has_terms),
            int(has_terms and head.bias is not None), int(has_terms and head.need_explicit), int(need_implicit),
            HAS_M2=width > dim, HAS_TOP=has_top, OPERAND=TL_DTYPES[operand], BLOCK_R=block_r, BLOCK_D=block_d,
            num_warps=NUM_WARPS, enable_fp_fusion=FP_FUSION)

    def sweep_rows(self, h, weight, bias, target, top_class, signs, mu, var, lse, g_ce, g_r, g_i, g_i_target,
                   grad_mu, need_explicit, need_implicit, operand, fold_rows, want_h, want_w):
        rows, dim = h.shape
        acc = lse.dtype
        has_top = top_class is not None
        scatter = None
        values = scales = lse
        if want_w and (has_top or need_implicit):  # the dominant classes' stored parts, then the target rows' u
            values = torch.empty(rows if has_top else 0, dim, dtype=acc, device=h.device)
            scales = torch.empty((int(has_top) + int(need_implicit)) * rows, dtype=acc, device=h.device)
            if need_implicit:
                torch.neg(g_i_target, out=scales[len(values):])
            classes = [c for c, on in ((top_class, has_top), (target, need_implicit)) if on]
            scatter = (torch.cat(classes) if len(classes) > 1 else classes[0], values, scales,
                       (h, signs.contiguous()) if need_implicit else None)
        sweep = SweepRows(torch.empty_like(lse), torch.empty(2 * rows, dim, dtype=operand, device=h.device),
                          torch.empty(rows, dim, dtype=operand, device=h.device) if need_explicit else None,
                          torch.empty_like(lse) if has_top else None,
                          torch.empty(rows, dim, dtype=acc, device=h.device) if want_h else None, scatter)
        block_r, block_d = row_block_d(acc)
        self.launch(sweep_rows_kernel)[(triton.cdiv(rows, block_r),)](
            h, weight, _bias_arg(bias, weight), target.contiguous(), top_class.contiguous() if has_top else target,
            signs.contiguous() if need_implicit else lse, mu, var if need_explicit else mu, lse.contiguous(),
            g_ce.contiguous(), g_r.contiguous(), g_i.contiguous(), g_i_target.contiguous(),
            grad_mu.contiguous() if grad_mu is not None else lse, sweep.row_const, sweep.stacked,
            sweep.g_r_q if need_explicit else sweep.stacked, sweep.t_top if has_top else lse,
            sweep.grad_h if want_h else lse, values, scales, rows, dim, *h.stride(), *weight.stride(), mu.stride(0),
            var.stride(0) if need_explicit else 0, int(bias is not None), int(grad_mu is not None), int(fold_rows),
            int(want_h), int(want_w), NEED_EXPLICIT=need_explicit, NEED_IMPLICIT=need_implicit, HAS_TOP=has_top,
            OPERAND=TL_DTYPES[operand], BLOCK_R=block_r, BLOCK_D=block_d, num_warps=NUM_WARPS,
            enable_fp_fusion=FP_FUSION)
        return sweep

    def add_weight_gradient(self, grad_w, v0, v1, a, b, acc, overwrite, weight=None, s_g_r_q=None, scatter=None,
                            index=0):
        if not overwrite or (s_g_r_q is None and scatter is None):  # the GEMM adds into grad_W, or writes it
            add_weight_gradient(grad_w, v0, v1, a, b, acc, overwrite, weight, s_g_r_q,
                                None if scatter is None else scatter.chunk(index, v0))
            return
        product = mm(a, b, acc)
        cols, dim = product.shape
        has_scatter = scatter is not None
        # placeholders of the dtypes they would have: one compilation serves both values of a runtime flag
        narrow = _placeholder(a.dtype if weight is None else weight.dtype, a.device)
        index = _placeholder(torch.int64, a.device)
        has_u = has_scatter and scatter.u_rows is not None
        scales = product
        if has_scatter:  # rows built already scaled (RowScatter's scales None) count once
            scales = scatter.scales if scatter.scales is not None else torch.ones(
                len(scatter.sorted_classes), dtype=product.dtype, device=product.device)
        h, signs = scatter.u_rows if has_u else (narrow, narrow)
        stored = has_scatter and len(scatter.values) > 0
        block_c, block_d = weight_gradient_tile(product.dtype)
        self.launch(weight_gradient_kernel)[(triton.cdiv(cols, block_c), triton.cdiv(dim, block_d))](
            grad_w[v0:v1], product, product if weight is None else weight, product if s_g_r_q is None else s_g_r_q,
            scatter.order if has_scatter else index, scatter.class_starts(v0, v1) if has_scatter else index,
            scatter.values if stored else product, scales, h, signs, cols, dim,
            len(scatter.values) if has_scatter else 0, *(weight.stride() if weight is not None else (0, 0)),
            *(h.stride() if has_u else (dim, 1)), int(has_scatter), int(has_u), HAS_SQ=s_g_r_q is not None,
            OUT=TL_DTYPES[grad_w.dtype], BLOCK_C=block_c, BLOCK_D=block_d,
            num_warps=NUM_WARPS, enable_fp_fusion=FP_FUSION)

    def gradient_chunk(self, z, bias, t, lse, row_const, g_ce, target_col, out, top_col=None, t_top=None, *,
                       grad_b=None):
        rows, cols = z.shape
        has_target = target_col is not None
        has_top = top_col is not None and t is not None
        tile_r, tile_c = gradient_tile(z.dtype)
        row_programs = triton.cdiv(rows, tile_r * ROW_TILES)
        col_sums = _col_sums_buffer(grad_b, row_programs, cols, z)
        self.launch(gradient_chunk_kernel)[(row_programs, triton.cdiv(cols, tile_c))](
            z, _bias_arg(bias, z), z if t is None else t, lse.contiguous(), row_const.contiguous(),
            g_ce.contiguous() if has_target else lse, target_col.contiguous() if has_target else lse,
            top_col.contiguous() if has_top else lse, t_top.contiguous() if has_top else lse, out, col_sums, rows,
            cols, HAS_BIAS=bias is not None, HAS_T=t is not None, HAS_TARGET=has_target, HAS_TOP=has_top,
            WRITE_S=out.shape[0] > rows, COL_SUMS=grad_b is not None, OPERAND=TL_DTYPES[out.dtype], BLOCK_R=tile_r,
            BLOCK_C=tile_c, ROW_TILES=ROW_TILES, num_warps=NUM_WARPS, enable_fp_fusion=FP_FUSION)
        _add_col_sums(grad_b, col_sums)

    def rdrop_softmax_chunk(self, z1, z2, bias, running_max, running_sum, weighted_d):
        rows, cols = z1.shape
        block_r, block_c = row_tile(z1.dtype)
        self.launch(rdrop_softmax_chunk_kernel)[(triton.cdiv(rows, block_r),)](
            z1, z2, _bias_arg(bias, z1), running_max, running_sum, weighted_d, rows, cols, HAS_BIAS=bias is not None,
            BLOCK_R=block_r, BLOCK_C=block_c, num_warps=NUM_WARPS, enable_fp_fusion=FP_FUSION)

    def rdrop_gradient_chunk(self, z1, z2, bias, lse, expected_d, g_ce1, g_ce2, half_kl, target_col, out, *,
                             grad_b=None):
        rows, cols = z1.shape
        tile_r, tile_c = gradient_tile(z1.dtype)
        row_programs = triton.cdiv(rows, tile_r * ROW_TILES)
        col_sums = _col_sums_buffer(grad_b, row_programs, cols, z1)
        self.launch(rdrop_gradient_chunk_kernel)[(row_programs, triton.cdiv(cols, tile_c))](
            z1, z2, _bias_arg(bias, z1), lse.contiguous(), expected_d.contiguous(), g_ce1.contiguous(),
            g_ce2.contiguous(), half_kl.contiguous(), target_col.contiguous(), out, col_sums, rows, cols,
            HAS_BIAS=bias is not None, COL_SUMS=grad_b is not None, OPERAND=TL_DTYPES[out.dtype], BLOCK_R=tile_r,
            BLOCK_C=tile_c, ROW_TILES=ROW_TILES, num_warps=NUM_WARPS, enable_fp_fusion=FP_FUSION)
        _add_col_sums(grad_b, col_sums)



TRITON_EPILOGUES = TritonEpilogues()
