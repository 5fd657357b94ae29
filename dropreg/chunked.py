"""The ``"chunked"`` backend: docs/math.md 7.3's vocabulary-chunked driver, the GPU path.

Rows are processed in blocks (all N rows at once when the workspace allows) and the vocabulary in chunks of Vc
entries. Every product that sums over d, over the vocabulary or over the rows is one large GEMM
(:func:`dropreg.gemm.mm`: cuBLAS with narrow operands and fp32 results on CUDA), and the elementwise work on each
R x Vc chunk is one fused epilogue: Triton kernels on CUDA (``dropreg/triton/epilogues.py``), the PyTorch
functions of :class:`TorchEpilogues` elsewhere (they define what the kernels compute and run the CPU tests).

Per chunk c, forward (3 NVd with both terms):
    Z = H W_c^T;  epilogue: online softmax of Z + b_c against a per-row reference, P_c in the operand dtype;
    A = rescale * A where a reference moved;  A += P_c [W_c | W_c*W_c] (two GEMMs into A's halves); after the last
    chunk, each row's dominant entry made exact (:class:`DominantEntry`, docs/math.md 8.4).
backward (7 NVd):
    Z = H W_c^T;  t = T W_c^T + gR' q (W_c*W_c)^T  (two GEMMs into t);  epilogue: G and S in the operand dtype;
    grad_input += G W_c;  grad_W_c = [G; S]^T [H; T] + 2 W_c * (S^T gR' q)  (K = 2R), written once per chunk: each
    chunk owns its rows of grad_W, so there are no atomics and the result is deterministic.
R-Drop and softmax_mean run on the same loops; cross entropy alone under "mean"/"sum" takes
:func:`dropreg.streamed.ce_with_grads` with this backend's operand types (3 NVd).
"""
from __future__ import annotations

import math

import torch
from torch.profiler import record_function

from .chunk_buffers import (ChunkBuffers, DominantEntry, RowScatter, add_weight_gradient, grad_weight_buffer,
                            squares_operand, squares_scale, top_class_buffer)
from .gemm import as_operand, mm, operand_types
from .plan import DEFAULT_PLAN, BlockPlan, ce_chunks, default_chunks
from .rows import (RowModulation, SliceStatistics, input_row_gradient, logit_shift, row_modulation,
                   softmax_mean_modulation, target_logit)
from .streamed import StreamedPasses, add_ce_loss, finish_statistics, online_state
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

def rescale_needed(rescale) -> bool:
    """Whether a row's reference moved in this chunk, so that the moments accumulated on its old scale must be
    rescaled: rare once the first chunk has set it (:func:`dropreg.rows.reference_headroom`). Asking reads one flag
    on the host. Meta tensors (tools/traffic.py) have no values: taken as no."""
    return rescale.device.type != "meta" and bool((rescale != 1).any())


def partial_statistics(h, weight, bias, *, need_mu, need_m2, row_block, vocab_chunk, epilogues=None,
                       top_class=None, keep_top=True, scale_squares=True):
    """Per-row online state over ``weight``'s rows, as :func:`dropreg.streamed.partial_statistics` returns it:
    running reference ``m`` (the max, up to the epilogues' headroom), ``L = sum exp(z - m)`` and moments
    ``[A1 | A2]`` on the scale of ``L`` (so that :func:`dropreg.streamed.finish_statistics` divides them by ``L``,
    and states of vocabulary slices merge by the same rescaling). 1 + (1 + need_m2) NVd.

    With narrow operands the moments are those of the probabilities as the GEMMs saw them (rounded, the dominant
    entry made exact: :class:`DominantEntry`), normalized by their own sum (the ``mass``) and then put on the scale
    of ``L``: ``var = m2 - mu^2`` stays the variance of one distribution (docs/math.md 8.4), of a mixture of them once
    slices merge.
    ``top_class`` (N int64, optional, needs ``need_mu``) receives each row's largest logit's row of ``weight``:
    the backward keeps that class's modulation exact. ``keep_top``, ``scale_squares``: docs/math.md 8.4's and 7.3's
    precision measures (switched off only to measure them)."""
    types = operand_types(h.dtype)
    epilogues = epilogues or epilogues_for(h.device, h.dtype)
    acc = types.acc
    n_rows, dim = h.shape
    vocab = weight.shape[0]
    row_max, exp_sum, moments = online_state(h, need_mu, need_m2)
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
        block_moments = torch.zeros_like(moments[r0:r1])
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
                if v0 > 0 and rescale_needed(rescale):  # before the first chunk the moments are 0
                    block_moments.mul_(rescale[:, None])
                mm(probs, w_op, acc, out=block_moments[:, :dim], accumulate=True)
                if need_m2:
                    mm(probs, squares_operand(w, w_op, types.forward, square_scale), acc, out=block_moments[:, dim:],
                       accumulate=True)
        if top is not None and top_class is not None:
            top_class[r0:r1] = top.col
        if top is not None and keep_top:
            top.make_exact(block_moments, mass, weight, need_m2, types.forward, square_scale)
        row_max[r0:r1] = running_max
        exp_sum[r0:r1] = running_sum
        if need_mu:
            if square_scale is not None:
                block_moments[:, dim:].div_(square_scale)
            moments[r0:r1] = block_moments * (running_sum / mass)[:, None] if narrow else block_moments
    return row_max, exp_sum, moments


def chunked_statistics(h, weight, bias, *, need_mu, need_m2, row_block, vocab_chunk, epilogues=None,
                       top_class=None, keep_top=True, scale_squares=True):
    """Per-row ``(lse, mu, m2)`` (mu, m2 None unless needed) in one streamed pass."""
    state = partial_statistics(h, weight, bias, need_mu=need_mu, need_m2=need_m2, row_block=row_block,
                               vocab_chunk=vocab_chunk, epilogues=epilogues, top_class=top_class, keep_top=keep_top,
                               scale_squares=scale_squares)
    return finish_statistics(*state, h.shape[1], need_mu=need_mu, need_m2=need_m2)


def gradient_sweep(h_block, weight, bias, lse, target, g_ce, rows: RowModulation, with_squares, types, epilogues,
                   buffers, vocab_chunk, *, grad_w=None, grad_b=None, want_h=True, overwrite_w=False, top_class=None,
                   scatter_rows=None):
    """One row block's backward over every chunk; returns its ``W^T G`` (None unless ``want_h``).

    ``rows.T_stack`` None: plain cross entropy (``G = s g_ce - g_ce [v = y]``, grad_W = G^T H). ``target`` None:
    no target correction. ``grad_w``'s chunk rows are overwritten (``overwrite_w``: the first row block) or
    accumulated. ``top_class`` (per row, a row of ``weight``): with narrow operands that class is
    handled in the accumulation dtype (docs/math.md 7.3): its ``t``, since ``row_const + t`` cancels there on
    confident rows and the rounding of ``[T | gR' q]`` would not, and its grad_W part ``s_k (T + 2 gR' q W_k)``,
    whose halves cancel to ``2 s_k gR' q (W_k - mu)`` there (the epilogue leaves it out of S). ``scatter_rows``:
    ``(classes, values)``, one vector per row added to grad_W's row of its class (the implicit term's target part).
    Both reach grad_W through a :class:`RowScatter`: summed per class without atomics, rounded once with the chunk."""
    acc = types.acc
    n_rows, dim = h_block.shape
    modulated = rows.T_stack is not None
    chunks = list(spans(weight.shape[0], vocab_chunk))
    t_top = None
    scattered = [scatter_rows] if scatter_rows is not None else []
    if modulated and top_class is not None and types.backward != acc:
        w_top = weight[top_class].to(acc)
        t_top = (rows.T_stack * (torch.cat([w_top, w_top * w_top], dim=1) if with_squares else w_top)).sum(1)
        z_top = (h_block * w_top).sum(1) + (0.0 if bias is None else bias[top_class].to(acc))
        part = rows.T_vec + 2.0 * rows.g_r_q * w_top if with_squares else rows.T_vec
        scattered.append((top_class, torch.exp(z_top - lse)[:, None] * part))
    scatter = None
    if grad_w is not None and scattered:
        scatter = RowScatter(torch.cat([c for c, _ in scattered]), torch.cat([v for _, v in scattered]),
                             [v0 for v0, _ in chunks])
    h_op = as_operand(h_block, types.backward)
    T_op = as_operand(rows.T_vec, types.backward) if modulated else None
    # [H; T]: grad_W's G^T H and S^T T as one product with K = 2R
    stacked_rows = torch.cat([h_op, T_op]) if modulated else h_op
    g_r_q_op = as_operand(rows.g_r_q, types.backward) if with_squares else None
    grad_h_block = torch.zeros(n_rows, dim, dtype=acc, device=h_block.device) if want_h else None
    for index, (v0, v1) in enumerate(chunks):
        cols = v1 - v0
        w_op = as_operand(weight[v0:v1], types.backward)
        with record_function("dropreg::chunk_logits"):
            z = mm(h_op, w_op.T, acc, out=ChunkBuffers.view(buffers.logits, n_rows, cols))
            t = None
            if modulated:  # t = T W_c^T + gR' q (W_c*W_c)^T
                t = mm(T_op, w_op.T, acc, out=ChunkBuffers.view(buffers.second, n_rows, cols))
                if with_squares:
                    mm(g_r_q_op, squares_operand(weight[v0:v1], w_op, types.backward).T, acc, out=t, accumulate=True)
        out = ChunkBuffers.view(buffers.outputs, (2 if modulated else 1) * n_rows, cols)
        with record_function("dropreg::gradient_epilogue"):
            epilogues.gradient_chunk(z, None if bias is None else bias[v0:v1], t, lse, rows.row_const, g_ce,
                                     None if target is None else target - v0, out,
                                     *((top_class - v0, t_top) if t_top is not None else ()),
                                     grad_b=None if grad_b is None else grad_b[v0:v1])
        g = out[:n_rows]
        if want_h:
            with record_function("dropreg::grad_input"):
                mm(g, w_op, acc, out=grad_h_block, accumulate=True)
        if grad_w is not None:
            with record_function("dropreg::grad_weight"):
                add_weight_gradient(grad_w, v0, v1, out.T, stacked_rows, acc, overwrite_w, weight[v0:v1],
                                    mm(out[n_rows:].T, g_r_q_op, acc) if with_squares else None,
                                    None if scatter is None else scatter.chunk(index, v0))
    return grad_h_block


def terms_backward(h, weight, bias, target, signs, lse, mu, var, grad_ce, grad_quadratic, grad_sign_term,
                   need_explicit, need_implicit, row_block, vocab_chunk, wants, owns_target=None, grad_mu=None,
                   epilogues=None, top_class=None):
    """:func:`dropreg.streamed.terms_backward` on this driver: ``(grad_h_vocab, grad_h_rows, grad_w, grad_b)`` over
    ``weight``'s rows given the per-row globals; ``owns_target`` marks the rows whose target lies in ``weight`` (a
    vocabulary slice), ``target`` indexing ``weight`` there. ``grad_w`` comes in the weight's dtype when one row
    block writes each chunk once, else in the accumulation dtype. ``top_class``: from :func:`partial_statistics`."""
    want_h, want_w, want_b = wants
    types = operand_types(h.dtype)
    epilogues = epilogues or epilogues_for(h.device, h.dtype)
    acc = types.acc
    n_rows, dim = h.shape
    modulated = need_explicit or need_implicit
    grad_h = torch.empty(n_rows, dim, dtype=acc, device=h.device) if want_h else None
    grad_h_rows = torch.empty(n_rows, dim, dtype=acc, device=h.device) if want_h else None
    grad_w = grad_weight_buffer(weight, acc, math.ceil(n_rows / row_block)) if want_w else None
    grad_b = torch.zeros(weight.shape[0], dtype=acc, device=h.device) if want_b else None
    if owns_target is not None:
        sweep_target = torch.where(owns_target, target, torch.full_like(target, -1))  # -1: in no chunk
        target = torch.where(owns_target, target, torch.zeros_like(target))
    else:
        sweep_target = target
    buffers = ChunkBuffers.allocate(min(row_block, n_rows), min(vocab_chunk, weight.shape[0]), acc,
                                    types.backward, h.device, second=modulated, outputs=2 if modulated else 1)
    for r0, r1 in spans(n_rows, row_block):
        h_block, y = h[r0:r1].to(acc), target[r0:r1]
        g_ce = grad_ce[r0:r1].to(acc)
        rows = row_modulation(h_block, g_ce, mu, var, signs, grad_quadratic, grad_sign_term, grad_mu, r0, r1,
                              need_explicit, need_implicit)
        g_i_owned = None
        if need_implicit:
            g_i_owned = rows.g_i if owns_target is None else rows.g_i * owns_target[r0:r1, None]
        grad_h_block = gradient_sweep(h_block, weight, bias, lse[r0:r1], sweep_target[r0:r1], g_ce, rows,
                                      need_explicit, types, epilogues, buffers, vocab_chunk, grad_w=grad_w,
                                      grad_b=grad_b, want_h=want_h, overwrite_w=r0 == 0,
                                      top_class=None if top_class is None else top_class[r0:r1],
                                      # the implicit term's target part of grad_W
                                      scatter_rows=(y, -g_i_owned * rows.u) if want_w and need_implicit else None)
        if want_h:  # the row-wise parts of grad_input (docs/math.md 4.3)
            grad_h_rows[r0:r1] = input_row_gradient(h_block, signs[r0:r1] if need_implicit else None,
                                                    mu[r0:r1] if need_implicit else None,
                                                    var[r0:r1] if need_explicit else None,
                                                    grad_quadratic[r0:r1].to(acc), grad_sign_term[r0:r1].to(acc),
                                                    need_explicit, need_implicit)
            if need_implicit:
                grad_h_block -= g_i_owned * signs[r0:r1] * weight[y].to(acc)
            grad_h[r0:r1] = grad_h_block
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
    for r0, r1 in spans(n_rows, row_block):
        g_mu = grad_mu[r0:r1].to(acc)
        rows = softmax_mean_modulation(g_mu, mu[r0:r1])
        grad_h_block = gradient_sweep(h[r0:r1].to(acc), weight, bias, lse[r0:r1], None, None, rows, False, types,
                                      epilogues, buffers, vocab_chunk, grad_w=grad_w, grad_b=grad_b, want_h=want_h,
                                      overwrite_w=r0 == 0,
                                      top_class=None if top_class is None else top_class[r0:r1])
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

    def statistics(self, h, weight, bias, *, need_mu, need_m2) -> SliceStatistics:
        top_class = top_class_buffer(h, need_mu) if self.plan.top_class else None
        lse, mu, m2 = chunked_statistics(h, weight, bias, need_mu=need_mu, need_m2=need_m2, top_class=top_class,
                                         keep_top=self.plan.keep_top, scale_squares=self.plan.scale_squares,
                                         **self._chunks(h, weight))
        return SliceStatistics(lse, mu, m2=m2, extra=top_class)

    def terms_sweep(self, h, weight, bias, target, owned, signs, lse, mu, var, grad_ce, grad_quadratic,
                    grad_sign_term, grad_mu, need_explicit, need_implicit, wants, extra):
        return terms_backward(h, weight, bias, target, signs, lse, mu, var, grad_ce, grad_quadratic, grad_sign_term,
                              need_explicit, need_implicit, wants=wants, owns_target=owned, grad_mu=grad_mu,
                              top_class=extra, **self._chunks(h, weight))

    def softmax_mean_sweep(self, h, weight, bias, lse, mu, grad_mu, wants, extra):
        return softmax_mean_backward(h, weight, bias, lse, mu, grad_mu, wants=wants, top_class=extra,
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
