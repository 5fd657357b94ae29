"""The ``"chunked"`` backend: docs/math.md 7.3's vocabulary-chunked driver, the GPU path.

Rows are processed in blocks (all N rows at once when the workspace allows) and the vocabulary in chunks of Vc
entries. Every product that sums over d, over the vocabulary or over the rows is one large GEMM
(:func:`dropreg.gemm.mm`: cuBLAS with narrow operands and fp32 results on CUDA), and the elementwise work on each
R x Vc chunk is one fused epilogue: Triton kernels on CUDA (``dropreg/triton/epilogues.py``), the PyTorch
functions of :class:`TorchEpilogues` elsewhere (they define what the kernels compute and run the CPU tests).

Per chunk c, forward (3 NVd with both terms):
    Z = H W_c^T;  epilogue: online softmax of Z + b_c against a per-row reference, P_c in the operand dtype;
    the moved rows of A rescaled;  A += P_c [W_c | W_c*W_c] (two GEMMs into A's halves; W_c*W_c kept for the
    backward when it fits the workspace); after the last chunk, one row pass (``finish_moments``): each row's
    dominant entry made exact (:class:`DominantEntry`, docs/math.md 8.4), mu and var, and a whole head's terms.
backward (7 NVd), after one row pass (``sweep_rows``: [H; T], gR' q, row_const, grad_input's initial value):
    Z = H W_c^T;  t = T W_c^T + gR' q (W_c*W_c)^T  (two GEMMs into t);  epilogue: G and S in the operand dtype;
    grad_input += G W_c;  grad_W_c = [G; S]^T [H; T] + 2 W_c * (S^T gR' q) + scattered rows (K = 2R), finished in
    one pass (``add_weight_gradient``) and written once per chunk: each chunk owns its rows of grad_W, so there are
    no atomics and the result is deterministic.
R-Drop and softmax_mean run on the same loops; cross entropy alone under "mean"/"sum" takes
:func:`dropreg.streamed.ce_with_grads` with this backend's operand types (3 NVd).
"""
from __future__ import annotations

import math

import torch
from torch.profiler import record_function

from .chunk_buffers import (ChunkBuffers, DominantEntry, HeadTerms, RowScatter, SweepRows, add_weight_gradient,
                            grad_weight_buffer, squares_operand, squares_scale, sweep_rows_from, top_class_buffer)
from .gemm import as_operand, mm, operand_types
from .plan import DEFAULT_PLAN, BlockPlan, ce_chunks, default_chunks, keeps_squares
from .rows import (SliceStatistics, input_row_gradient, logit_shift, softmax_mean_modulation, target_logit)
from .streamed import StreamedPasses, add_ce_loss
from .tiles import spans
from .torch_epilogues import TorchEpilogues, epilogues_for


# ---------------------------------------------------------------------------------------------------------
# Epilogues: the elementwise work on one chunk. Triton's (dropreg/triton/epilogues.py) have the same signatures.
# ---------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------
# Block plan: how many rows and vocabulary entries one chunk holds (docs/math.md 7.2, 7.3)
# ---------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------
# Forward statistics and the logit-gradient sweep
# ---------------------------------------------------------------------------------------------------------

def rescale_moved_rows(moments, rescale):
    """The moments of the rows whose reference moved in this chunk (``rescale != 1``), put on their new scale: rare
    once the first chunk has set the references (:func:`dropreg.rows.reference_headroom`), and touching only those
    rows. Finding them reads the flags on the host. Meta tensors (tools/traffic.py) have no values: taken as none."""
    if rescale.device.type == "meta":
        return
    moved = (rescale != 1).nonzero().squeeze(1)
    if len(moved):
        moments[moved] = moments[moved] * rescale[moved, None]


def chunked_statistics(h, weight, bias, *, need_mu, need_m2, row_block, vocab_chunk, epilogues=None,
                       top_class=None, keep_top=True, scale_squares=True, squares=None, head=None):
    """Per-row ``(lse, mu, var)`` over ``weight``'s rows in one streamed pass (mu None unless ``need_mu``, var None
    unless ``need_m2``); 1 + (1 + need_m2) NVd. Each row block's moments ``[A1 | A2]`` are accumulated by the GEMMs
    on the scale of the row's running reference and finished in place into ``[mu | var]`` by the epilogues'
    ``finish_moments``.

    With narrow operands the moments are those of the probabilities as the GEMMs saw them (rounded, the dominant
    entry made exact: :class:`DominantEntry`), normalized by their own sum (the ``mass``): ``var = m2 - mu^2`` stays
    the variance of one distribution (docs/math.md 8.4).
    ``top_class`` (N int64, optional, needs ``need_mu``) receives each row's largest logit's row of ``weight``:
    the backward keeps that class's modulation exact. ``squares`` (V x d, the operand dtype, optional, needs
    ``need_m2`` and an unscaled square): receives the ``W*W`` operand as each chunk forms it, for the backward.
    ``head`` (a :class:`HeadTerms` over all rows, its ``lse`` filled here): a head held whole, whose terms are
    written as each row block is finished. ``keep_top``, ``scale_squares``: docs/math.md 8.4's and 7.3's precision
    measures (switched off only to measure them)."""
    types = operand_types(h.dtype)
    epilogues = epilogues or epilogues_for(h.device, h.dtype)
    acc = types.acc
    n_rows, dim = h.shape
    vocab = weight.shape[0]
    lse = torch.empty(n_rows, dtype=acc, device=h.device) if head is None else head.lse
    # [A1 | A2] per row, written by each row block's first chunk (no zeroing), finished into [mu | var]
    moments = torch.empty(n_rows, ((1 + int(need_m2)) if need_mu else 0) * dim, dtype=acc, device=h.device)
    buffers = ChunkBuffers.allocate(min(row_block, n_rows), min(vocab_chunk, vocab), acc, types.forward, h.device,
                                    second=False, outputs=1 if need_mu else 0)
    narrow = types.forward != acc  # probabilities rounded for the moment GEMMs: normalize by what was rounded
    keep_top = narrow and keep_top
    # the moments' m2 half holds m2 * square_scale
    square_scale = squares_scale(weight, types, need_m2) if scale_squares else None
    for r0, r1 in spans(n_rows, row_block):
        rows = r1 - r0
        h_op = as_operand(h[r0:r1], types.forward)
        running_max = torch.full((rows,), float("-inf"), dtype=acc, device=h.device)
        running_sum = torch.zeros(rows, dtype=acc, device=h.device)
        mass = torch.zeros(rows, dtype=acc, device=h.device)
        block_moments = moments[r0:r1]
        top = DominantEntry(rows, acc, h.device) if need_mu and (keep_top or top_class is not None) else None
        for v0, v1 in spans(vocab, vocab_chunk):
            cols = v1 - v0
            w = weight[v0:v1]
            w_op = as_operand(w, types.forward)
            with record_function("dropreg::chunk_logits"):
                z = mm(h_op, w_op.T, acc, out=ChunkBuffers.view(buffers.logits, rows, cols))
            probs = ChunkBuffers.view(buffers.outputs, rows, cols) if need_mu else None
            with record_function("dropreg::softmax_epilogue"):
                rescale, top_p, top_col = epilogues.softmax_chunk(
                    z, None if bias is None else bias[v0:v1], running_max, running_sum, mass, probs)
            if not need_mu:
                continue
            if top is not None:
                top.update(rescale, top_p, top_col + v0, types.forward)
            with record_function("dropreg::moments"):
                if v0 > 0:  # before the first chunk there is nothing to rescale
                    rescale_moved_rows(block_moments, rescale)
                mm(probs, w_op, acc, out=block_moments[:, :dim], accumulate=v0 > 0)
                if need_m2:
                    if squares is None:
                        w_squares = squares_operand(w, w_op, types.forward, square_scale)
                    elif r0 == 0:  # formed once, kept
                        w_squares = torch.mul(w_op, w_op, out=squares[v0:v1])
                    else:
                        w_squares = squares[v0:v1]
                    mm(probs, w_squares, acc, out=block_moments[:, dim:], accumulate=v0 > 0)
        if top is not None and top_class is not None:
            top_class[r0:r1] = top.col
        lse[r0:r1] = logit_shift(running_max) + running_sum.log()
        if need_mu:
            with record_function("dropreg::finish_moments"):
                epilogues.finish_moments(block_moments, mass if narrow else running_sum, weight,
                                         top if keep_top else None, types.forward, square_scale,
                                         None if head is None else head.rows(r0, r1))
        elif head is not None:  # cross entropy alone
            head.ce[r0:r1] = lse[r0:r1] - target_logit(h[r0:r1].to(acc), weight, bias, head.target[r0:r1], acc)
    return lse, moments[:, :dim] if need_mu else None, moments[:, dim:] if need_m2 else None


def gradient_sweep(weight, bias, lse, target, g_ce, sweep: SweepRows, with_squares, types, epilogues, buffers,
                   vocab_chunk, *, grad_w=None, grad_b=None, overwrite_w=False, top_class=None, squares=None):
    """One row block's backward over every chunk, from its :class:`SweepRows`; returns ``sweep.grad_h`` with the
    block's ``W^T G`` added (None unless wanted).

    Unmodulated sweeps are plain cross entropy (``G = s g_ce - g_ce [v = y]``, grad_W = G^T H). ``target`` None:
    no target correction. ``grad_w``'s chunk rows are overwritten (``overwrite_w``: the first row block) or
    accumulated. ``top_class`` (per row, a row of ``weight``, with ``sweep.t_top``): with narrow operands that class
    is handled in the accumulation dtype (docs/math.md 7.3): its ``t``, since ``row_const + t`` cancels there on
    confident rows and the rounding of ``[T | gR' q]`` would not, and its grad_W part, which the epilogue leaves out of
    S and ``sweep.scatter`` carries. The scattered rows reach grad_W through a :class:`RowScatter`: summed per class
    without atomics, rounded once with the chunk. ``squares``: the forward's ``W*W`` operand, if it kept it."""
    acc = types.acc
    n_rows = sweep.row_const.shape[0]
    modulated = sweep.modulated
    chunks = list(spans(weight.shape[0], vocab_chunk))
    scatter = None
    if grad_w is not None and sweep.scatter is not None:
        classes, values, scales, u_rows = sweep.scatter
        scatter = RowScatter(classes, values, scales, [v0 for v0, _ in chunks], u_rows)
    h_op = sweep.stacked[:n_rows]
    T_op = sweep.stacked[n_rows:] if modulated else None
    grad_h_block = sweep.grad_h
    for index, (v0, v1) in enumerate(chunks):
        cols = v1 - v0
        w_op = as_operand(weight[v0:v1], types.backward)
        with record_function("dropreg::chunk_logits"):
            z = mm(h_op, w_op.T, acc, out=ChunkBuffers.view(buffers.logits, n_rows, cols))
            t = None
            if modulated:  # t = T W_c^T + gR' q (W_c*W_c)^T
                t = mm(T_op, w_op.T, acc, out=ChunkBuffers.view(buffers.second, n_rows, cols))
                if with_squares:
                    w_squares = (squares_operand(weight[v0:v1], w_op, types.backward) if squares is None
                                 else squares[v0:v1])
                    mm(sweep.g_r_q, w_squares.T, acc, out=t, accumulate=True)
        out = ChunkBuffers.view(buffers.outputs, (2 if modulated else 1) * n_rows, cols)
        with record_function("dropreg::gradient_epilogue"):
            epilogues.gradient_chunk(z, None if bias is None else bias[v0:v1], t, lse, sweep.row_const, g_ce,
                                     None if target is None else target - v0, out,
                                     *((top_class - v0, sweep.t_top) if sweep.t_top is not None else ()),
                                     grad_b=None if grad_b is None else grad_b[v0:v1])
        g = out[:n_rows]
        if grad_h_block is not None:
            with record_function("dropreg::grad_input"):
                mm(g, w_op, acc, out=grad_h_block, accumulate=True)
        if grad_w is not None:
            with record_function("dropreg::grad_weight"):
                epilogues.add_weight_gradient(grad_w, v0, v1, out.T, sweep.stacked, acc, overwrite_w, weight[v0:v1],
                                              mm(out[n_rows:].T, sweep.g_r_q, acc) if with_squares else None,
                                              scatter, index)
    return grad_h_block


def terms_backward(h, weight, bias, target, signs, lse, mu, var, grad_ce, grad_quadratic, grad_sign_term,
                   need_explicit, need_implicit, row_block, vocab_chunk, wants, owns_target=None, grad_mu=None,
                   epilogues=None, top_class=None, squares=None):
    """:func:`dropreg.streamed.terms_backward` on this driver: ``(grad_h_vocab, grad_h_rows, grad_w, grad_b)`` over
    ``weight``'s rows given the per-row globals; ``owns_target`` marks the rows whose target lies in ``weight`` (a
    vocabulary slice), ``target`` indexing ``weight`` there. A head held whole (``owns_target`` None) gets grad_input
    whole in ``grad_h_vocab`` (its row-wise parts start the sum) and ``grad_h_rows`` None; a slice keeps them apart,
    to be added once after the slices' sum. ``grad_w`` comes in the weight's dtype when one row block writes each
    chunk once, else in the accumulation dtype. ``top_class``, ``squares``: from :func:`chunked_statistics`."""
    want_h, want_w, want_b = wants
    types = operand_types(h.dtype)
    epilogues = epilogues or epilogues_for(h.device, h.dtype)
    acc = types.acc
    n_rows, dim = h.shape
    modulated = need_explicit or need_implicit
    whole = owns_target is None
    one_block = row_block >= n_rows
    grad_h = torch.empty(n_rows, dim, dtype=acc, device=h.device) if want_h and not one_block else None
    grad_h_rows = torch.empty(n_rows, dim, dtype=acc, device=h.device) if want_h and not whole else None
    grad_w = grad_weight_buffer(weight, acc, math.ceil(n_rows / row_block)) if want_w else None
    grad_b = torch.zeros(weight.shape[0], dtype=acc, device=h.device) if want_b else None
    if not whole:
        sweep_target = torch.where(owns_target, target, torch.full_like(target, -1))  # -1: in no chunk
        target = torch.where(owns_target, target, torch.zeros_like(target))
    else:
        sweep_target = target
    narrow = types.backward != acc
    buffers = ChunkBuffers.allocate(min(row_block, n_rows), min(vocab_chunk, weight.shape[0]), acc,
                                    types.backward, h.device, second=modulated, outputs=2 if modulated else 1)
    for r0, r1 in spans(n_rows, row_block):
        y = target[r0:r1]
        g_ce = grad_ce[r0:r1].to(acc)
        top = top_class[r0:r1] if modulated and narrow and top_class is not None else None
        if modulated:
            g_i = grad_sign_term[r0:r1].to(acc)
            with record_function("dropreg::sweep_rows"):
                sweep = epilogues.sweep_rows(
                    h[r0:r1], weight, bias, y, top, signs[r0:r1] if need_implicit else None, mu[r0:r1],
                    var[r0:r1] if need_explicit else None, lse[r0:r1], g_ce, grad_quadratic[r0:r1].to(acc), g_i,
                    g_i if whole else g_i * owns_target[r0:r1], None if grad_mu is None else grad_mu[r0:r1],
                    need_explicit, need_implicit, types.backward, whole, want_h, want_w)
        else:
            sweep = sweep_rows_from(h[r0:r1].to(acc), weight, bias, lse[r0:r1], None, None, False, types.backward,
                                    want_h, want_w, extra=g_ce)
        grad_h_block = gradient_sweep(weight, bias, lse[r0:r1], sweep_target[r0:r1], g_ce, sweep, need_explicit,
                                      types, epilogues, buffers, vocab_chunk, grad_w=grad_w, grad_b=grad_b,
                                      overwrite_w=r0 == 0, top_class=top, squares=squares)
        if want_h:
            if one_block:  # the sweep's own buffer: no copy
                grad_h = grad_h_block
            else:
                grad_h[r0:r1] = grad_h_block
            if grad_h_rows is not None:  # the row-wise parts of grad_input (docs/math.md 4.3), added after the sum
                grad_h_rows[r0:r1] = input_row_gradient(h[r0:r1].to(acc), signs[r0:r1] if need_implicit else None,
                                                        mu[r0:r1] if need_implicit else None,
                                                        var[r0:r1] if need_explicit else None,
                                                        grad_quadratic[r0:r1].to(acc),
                                                        grad_sign_term[r0:r1].to(acc), need_explicit, need_implicit)
    return grad_h, grad_h_rows, grad_w, grad_b


def softmax_mean_backward(h, weight, bias, lse, mu, grad_mu, row_block, vocab_chunk, wants, epilogues=None,
                          top_class=None):
    """:func:`dropreg.streamed.softmax_mean_backward` on this driver: the logit-gradient sweep with ``T = gbar``,
    ``row_const = -mu . gbar`` and no target (docs/math.md 11.2); ``grad_h = W^T G`` for these rows of W."""
    want_h, want_w, want_b = wants
    types = operand_types(h.dtype)
    epilogues = epilogues or epilogues_for(h.device, h.dtype)
    acc = types.acc
    n_rows, dim = h.shape
    grad_h = torch.empty(n_rows, dim, dtype=acc, device=h.device) if want_h else None
    grad_w = grad_weight_buffer(weight, acc, math.ceil(n_rows / row_block)) if want_w else None
    grad_b = torch.zeros(weight.shape[0], dtype=acc, device=h.device) if want_b else None
    buffers = ChunkBuffers.allocate(min(row_block, n_rows), min(vocab_chunk, weight.shape[0]), acc,
                                    types.backward, h.device, second=True, outputs=2)
    narrow = types.backward != acc
    for r0, r1 in spans(n_rows, row_block):
        top = top_class[r0:r1] if narrow and top_class is not None else None
        sweep = sweep_rows_from(h[r0:r1].to(acc), weight, bias, lse[r0:r1],
                                softmax_mean_modulation(grad_mu[r0:r1].to(acc), mu[r0:r1]), top, False,
                                types.backward, want_h, want_w)
        grad_h_block = gradient_sweep(weight, bias, lse[r0:r1], None, None, sweep, False, types, epilogues, buffers,
                                      vocab_chunk, grad_w=grad_w, grad_b=grad_b, overwrite_w=r0 == 0, top_class=top)
        if want_h:
            grad_h[r0:r1] = grad_h_block
    return grad_h, grad_w, grad_b


def rdrop_partial_statistics(h1, h2, weight, bias, row_block, vocab_chunk, epilogues=None):
    """:func:`dropreg.streamed.rdrop_partial_statistics` on this driver: per pass and row, ``(m_i, L_i, B_i)``
    over ``weight``'s rows, each ``(2, N)``; 2 NVd."""
    types = operand_types(h1.dtype)
    epilogues = epilogues or epilogues_for(h1.device, h1.dtype)
    acc = types.acc
    n_rows, vocab = h1.shape[0], weight.shape[0]
    row_max = torch.empty(2, n_rows, dtype=acc, device=h1.device)
    exp_sum = torch.empty(2, n_rows, dtype=acc, device=h1.device)
    weighted_d = torch.empty(2, n_rows, dtype=acc, device=h1.device)
    buffers = ChunkBuffers.allocate(min(row_block, n_rows), min(vocab_chunk, vocab), acc, types.forward, h1.device,
                                    second=True, outputs=0)
    for r0, r1 in spans(n_rows, row_block):
        rows = r1 - r0
        h_ops = [as_operand(h[r0:r1], types.forward) for h in (h1, h2)]
        running_max = torch.full((2, rows), float("-inf"), dtype=acc, device=h1.device)
        running_sum = torch.zeros(2, rows, dtype=acc, device=h1.device)
        block_d = torch.zeros(2, rows, dtype=acc, device=h1.device)
        for v0, v1 in spans(vocab, vocab_chunk):
            w_op = as_operand(weight[v0:v1], types.forward)
            z1 = mm(h_ops[0], w_op.T, acc, out=ChunkBuffers.view(buffers.logits, rows, v1 - v0))
            z2 = mm(h_ops[1], w_op.T, acc, out=ChunkBuffers.view(buffers.second, rows, v1 - v0))
            epilogues.rdrop_softmax_chunk(z1, z2, None if bias is None else bias[v0:v1], running_max, running_sum,
                                          block_d)
        row_max[:, r0:r1], exp_sum[:, r0:r1], weighted_d[:, r0:r1] = running_max, running_sum, block_d
    return row_max, exp_sum, weighted_d


def rdrop_backward(h1, h2, weight, bias, target, lse, expected_d, grad_ce1, grad_ce2, grad_kl, row_block,
                   vocab_chunk, wants, epilogues=None):
    """:func:`dropreg.streamed.rdrop_backward` on this driver: ``(grad_h (2, N, d), grad_w, grad_b)``, ``grad_h``
    being ``W^T G`` for these rows of W; a target outside ``[0, weight.shape[0])`` gets no correction. 6 NVd."""
    want_h1, want_h2, want_w, want_b = wants
    types = operand_types(h1.dtype)
    epilogues = epilogues or epilogues_for(h1.device, h1.dtype)
    acc = types.acc
    n_rows, dim = h1.shape
    grad_ce1, grad_ce2, grad_kl = (g.to(acc) for g in (grad_ce1, grad_ce2, grad_kl))
    grad_h = torch.zeros(2, n_rows, dim, dtype=acc, device=h1.device)
    grad_w = grad_weight_buffer(weight, acc, math.ceil(n_rows / row_block)) if want_w else None
    grad_b = torch.zeros(weight.shape[0], dtype=acc, device=h1.device) if want_b else None
    buffers = ChunkBuffers.allocate(min(row_block, n_rows), min(vocab_chunk, weight.shape[0]), acc, types.backward,
                                    h1.device, second=True, outputs=2)
    for r0, r1 in spans(n_rows, row_block):
        rows = r1 - r0
        h_ops = [as_operand(h[r0:r1], types.backward) for h in (h1, h2)]
        stacked_rows = torch.cat(h_ops) if want_w else None  # [H1; H2]: grad_W's two products as one, K = 2R
        for v0, v1 in spans(weight.shape[0], vocab_chunk):
            cols = v1 - v0
            w_op = as_operand(weight[v0:v1], types.backward)
            z1 = mm(h_ops[0], w_op.T, acc, out=ChunkBuffers.view(buffers.logits, rows, cols))
            z2 = mm(h_ops[1], w_op.T, acc, out=ChunkBuffers.view(buffers.second, rows, cols))
            out = ChunkBuffers.view(buffers.outputs, 2 * rows, cols)
            epilogues.rdrop_gradient_chunk(z1, z2, None if bias is None else bias[v0:v1], lse[:, r0:r1],
                                           expected_d[:, r0:r1], grad_ce1[r0:r1], grad_ce2[r0:r1],
                                           0.5 * grad_kl[r0:r1], target[r0:r1] - v0, out,
                                           grad_b=grad_b[v0:v1] if want_b else None)
            if want_h1:
                mm(out[:rows], w_op, acc, out=grad_h[0, r0:r1], accumulate=True)
            if want_h2:
                mm(out[rows:], w_op, acc, out=grad_h[1, r0:r1], accumulate=True)
            if want_w:
                add_weight_gradient(grad_w, v0, v1, out.T, stacked_rows, acc, r0 == 0)
    return grad_h, grad_w, grad_b


# ---------------------------------------------------------------------------------------------------------
# The backend's functions (dropreg/_dispatch.py)
# ---------------------------------------------------------------------------------------------------------


def ce_gradients(h, weight, bias, target, row_weight, wants, block_rows, vocab_chunk, z_weight=None, *,
                 epilogues=TorchEpilogues):
    """Cross entropy alone with its gradients formed in the forward (docs/math.md 7.1) on this driver: the same
    contract as :func:`dropreg.streamed.ce_with_grads`.

    Per row block, the block's logits over the whole vocabulary stay in the workspace, chunk after chunk
    (``Z_c = H W_c^T``, 1 NVd), while the softmax epilogue runs the online max and sum; then per chunk the gradient
    epilogue writes ``G = (w + 2 zw lse) s - w [v = y]`` in the operand dtype and ``grad_input += G W_c``,
    ``grad_W_c = G^T H`` (2 NVd)."""
    types = operand_types(h.dtype)
    acc = types.acc
    want_h, want_w, want_b = wants
    n_rows, dim = h.shape
    vocab = weight.shape[0]
    device = h.device
    loss = torch.zeros(2, dtype=acc, device=device)
    grad_h = torch.empty(n_rows, dim, dtype=acc, device=device) if want_h else None
    grad_w = grad_weight_buffer(weight, acc, math.ceil(n_rows / block_rows)) if want_w else None
    grad_b = torch.zeros(vocab, dtype=acc, device=device) if want_b else None
    chunks = list(spans(vocab, vocab_chunk))
    block = min(block_rows, n_rows)
    logits = torch.empty(block * vocab, dtype=acc, device=device)  # chunk-major: chunk [v0, v1) at block * v0
    gradient = torch.empty(block * min(vocab_chunk, vocab) if any(wants) else 0, dtype=types.backward, device=device)
    for r0, r1 in spans(n_rows, block_rows):
        rows = r1 - r0
        y, w_row = target[r0:r1], row_weight[r0:r1].to(acc)
        h_forward = as_operand(h[r0:r1], types.forward)
        running_max = torch.full((rows,), float("-inf"), dtype=acc, device=device)
        running_sum = torch.zeros(rows, dtype=acc, device=device)
        with record_function("dropreg::ce_logits"):
            for v0, v1 in chunks:
                z = logits[rows * v0:rows * v1].view(rows, v1 - v0)
                mm(h_forward, as_operand(weight[v0:v1], types.forward).T, acc, out=z)
                epilogues.softmax_chunk(z, None if bias is None else bias[v0:v1], running_max, running_sum, None,
                                        None, keep_logits=True)
        lse = logit_shift(running_max) + running_sum.log()
        ce = lse - target_logit(h[r0:r1].to(acc), weight, bias, y, acc)
        softmax_scale = add_ce_loss(loss, lse, ce, w_row, None if z_weight is None else z_weight[r0:r1].to(acc))
        if not any(wants):
            continue
        h_backward = as_operand(h[r0:r1], types.backward)
        grad_h_block = torch.zeros(rows, dim, dtype=acc, device=device) if want_h else None
        for v0, v1 in chunks:
            z = logits[rows * v0:rows * v1].view(rows, v1 - v0)
            g = ChunkBuffers.view(gradient, rows, v1 - v0)
            with record_function("dropreg::ce_gradients"):
                epilogues.gradient_chunk(z, None if bias is None else bias[v0:v1], None, lse, softmax_scale, w_row,
                                         y - v0, g, grad_b=grad_b[v0:v1] if want_b else None)
            if want_h:
                mm(g, as_operand(weight[v0:v1], types.backward), acc, out=grad_h_block, accumulate=True)
            if want_w:
                add_weight_gradient(grad_w, v0, v1, g.T, h_backward, acc, r0 == 0)
        if want_h:
            grad_h[r0:r1] = grad_h_block
    return loss, grad_h, grad_w, grad_b


class ChunkedPasses(StreamedPasses):
    """The ``"chunked"`` backend's passes (the contract of dropreg/ops.py): cuBLAS-sized GEMMs per vocabulary chunk and
    fused epilogues between them (Triton's on CUDA, PyTorch's elsewhere or as the plan says), with the plan's blocks
    (else :func:`default_chunks`, :func:`ce_chunks`). The capped head runs the streamed PyTorch passes, the
    inherited ones."""

    name = "chunked"

    def __init__(self, plan: BlockPlan = DEFAULT_PLAN, epilogues=None):
        super().__init__(plan)
        self.epilogues = epilogues  # an epilogues object that overrides the plan's choice (the compile report's)

    def blocks(self, n_rows: int, vocab: int, dtype=None, device=None) -> tuple[int, int]:
        """The streamed (capped) passes' blocks without ``dtype``; this driver's with it."""
        if dtype is None:
            return super().blocks(n_rows, vocab)
        return self.plan.blocks(default_chunks(n_rows, vocab, dtype, device))

    def ce_blocks(self, n_rows: int, vocab: int, dtype, device) -> tuple[int, int]:
        return self.plan.ce_blocks(ce_chunks(n_rows, vocab, dtype, device))

    def _chunks(self, h, weight) -> dict:
        row_block, vocab_chunk = self.blocks(h.shape[0], weight.shape[0], h.dtype, h.device)
        return {"row_block": row_block, "vocab_chunk": vocab_chunk,
                "epilogues": self.epilogues or epilogues_for(h.device, h.dtype, self.plan.epilogues)}

    def statistics(self, h, weight, bias, *, need_mu, need_m2, head=None) -> SliceStatistics:
        top_class = top_class_buffer(h, need_mu) if self.plan.top_class else None
        squares = None
        if need_m2 and keeps_squares(self.plan, weight, operand_types(h.dtype)):
            squares = torch.empty(weight.shape, dtype=operand_types(h.dtype).forward, device=weight.device)
        lse, mu, var = chunked_statistics(h, weight, bias, need_mu=need_mu, need_m2=need_m2, top_class=top_class,
                                          keep_top=self.plan.keep_top, scale_squares=self.plan.scale_squares,
                                          squares=squares, head=head, **self._chunks(h, weight))
        return SliceStatistics(lse, mu, var=var, extra=(top_class, squares))

    def whole_head(self, h, weight, bias, target, signs, need_explicit, need_implicit):
        acc = operand_types(h.dtype).acc
        per_row = [torch.zeros(h.shape[0], dtype=acc, device=h.device) for _ in range(4)]
        head = HeadTerms(h, bias, target, signs, *per_row[:1], need_explicit, need_implicit, *per_row[1:])
        stats = self.statistics(h, weight, bias, need_mu=need_explicit or need_implicit, need_m2=need_explicit,
                                head=head)
        return (head.ce, head.quadratic, head.sign_term), stats

    def terms_sweep(self, h, weight, bias, target, owned, signs, lse, mu, var, grad_ce, grad_quadratic,
                    grad_sign_term, grad_mu, need_explicit, need_implicit, wants, extra):
        return terms_backward(h, weight, bias, target, signs, lse, mu, var, grad_ce, grad_quadratic, grad_sign_term,
                              need_explicit, need_implicit, wants=wants, owns_target=owned, grad_mu=grad_mu,
                              top_class=extra[0] if extra else None, squares=extra[1] if extra else None,
                              **self._chunks(h, weight))

    def softmax_mean_sweep(self, h, weight, bias, lse, mu, grad_mu, wants, extra):
        return softmax_mean_backward(h, weight, bias, lse, mu, grad_mu, wants=wants,
                                     top_class=extra[0] if extra else None,
                                     **self._chunks(h, weight))

    def rdrop_statistics(self, h1, h2, weight, bias, softcap):
        if softcap is not None:
            return super().rdrop_statistics(h1, h2, weight, bias, softcap)
        row_max, exp_sum, weighted_d = rdrop_partial_statistics(h1, h2, weight, bias, **self._chunks(h1, weight))
        return logit_shift(row_max) + exp_sum.log(), weighted_d / exp_sum

    def rdrop_sweep(self, h1, h2, weight, bias, target, owned, lse, expected_d, grad_ce1, grad_ce2, grad_kl, wants,
                    softcap):
        if softcap is not None:
            return super().rdrop_sweep(h1, h2, weight, bias, target, owned, lse, expected_d, grad_ce1, grad_ce2,
                                       grad_kl, wants, softcap)
        if owned is not None:
            target = torch.where(owned, target, torch.full_like(target, -1))  # -1: no target correction here
        return rdrop_backward(h1, h2, weight, bias, target, lse, expected_d, grad_ce1, grad_ce2, grad_kl,
                              wants=wants, **self._chunks(h1, weight))

    def ce_gradients(self, h, weight, bias, target, row_weight, wants, z_weight=None, softcap=None,
                     smoothing_weights=None, smoothing_row_weight=None):
        if softcap is not None:
            return super().ce_gradients(h, weight, bias, target, row_weight, wants, z_weight, softcap,
                                        smoothing_weights, smoothing_row_weight)
        block_rows, vocab_chunk = self.ce_blocks(h.shape[0], weight.shape[0], h.dtype, h.device)
        return ce_gradients(h, weight, bias, target, row_weight, wants, block_rows, vocab_chunk, z_weight,
                            epilogues=self.epilogues or epilogues_for(h.device, h.dtype, self.plan.epilogues))
