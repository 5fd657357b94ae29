"""Logit softcapping (Gemma 2's ``z = softcap * tanh(raw / softcap)``) for the ``"torch"`` backend: docs/math.md 3.6.

The cap makes every statistic weight vocabulary entry v by a function of its own raw logit: with ``c = dz/draw``,
``z2``, ``z3`` the higher derivatives and ``phi = c^2 + z2``, the forward streams ``M1 = sum_v s_v c_v W_v`` and
``M2 = sum_v s_v phi_v W_v^2`` (in place of ``mu`` and ``m2``) and the backward's logit gradient becomes
``G = s (c row_const + phi (T W^T) + psi (Q (W*W)^T)) - amount [v = y]`` with ``psi = c phi + 2 c z2 + z3``: the
same GEMMs as the uncapped path (docs/math.md 4.4), split where the uncapped path stacks them.
"""
from __future__ import annotations

import torch
from torch.profiler import record_function

from ._op_family import first_order_only
from ._policy import accumulation_dtype
from . import streamed
from .streamed import (OnlineSoftmax, _chunk_logits, _eager_under_compile, _spans, _subtract_at_target, _weight_chunk,
                       implicit_signs)


def softcap_derivatives(raw_logits, softcap):
    """``(z, c, z2, z3)`` elementwise for ``z = softcap tanh(raw / softcap)``: the capped logits and their first,
    second and third derivatives in the raw logits."""
    t = torch.tanh(raw_logits / softcap)
    c = 1 - t * t
    return softcap * t, c, -2 * t * c / softcap, -2 * c * (c - 2 * t * t) / (softcap * softcap)


class _TargetValues:
    """Per row, the capped target logit and its derivatives (O(N d))."""

    def __init__(self, h, weight, bias, target, softcap, acc):
        raw = (h * weight[target].to(acc)).sum(1)
        if bias is not None:
            raw = raw + bias[target].to(acc)
        self.z, self.c, self.z2, self.z3 = softcap_derivatives(raw, softcap)
        self.w = weight[target].to(acc)


def _capped_statistics(h, weight, bias, softcap, need_mu, need_m2, row_block, vocab_chunk):
    """Per row ``lse`` of the capped logits and, as asked, ``M1`` and ``M2`` (N x d each, or None)."""
    acc = accumulation_dtype(h.dtype)
    n_rows, dim = h.shape
    lse = torch.empty(n_rows, dtype=acc, device=h.device)
    m1 = torch.zeros(n_rows, dim, dtype=acc, device=h.device) if need_mu else None
    m2 = torch.zeros(n_rows, dim, dtype=acc, device=h.device) if need_m2 else None
    for r0, r1 in _spans(n_rows, row_block):
        h_block = h[r0:r1].to(acc)
        softmax = OnlineSoftmax(r1 - r0, acc, h.device)
        for v0, v1 in _spans(weight.shape[0], vocab_chunk):
            w, _, b = _weight_chunk(weight, bias, v0, v1, acc, False)
            logits, c, z2, _ = softcap_derivatives(_chunk_logits(h_block, w, b), softcap)
            rescale = softmax.absorb(logits)  # logits become exp(z - running max)
            if need_mu:
                m1[r0:r1].mul_(rescale[:, None]).addmm_(logits * c, w)
            if need_m2:
                m2[r0:r1].mul_(rescale[:, None]).addmm_(logits * (c * c + z2), w * w)
        lse[r0:r1] = softmax.lse()
        for moment in (m1, m2):
            if moment is not None:
                moment[r0:r1] /= softmax.sum[:, None]
    return lse, m1, m2


def _capped_gradient_sweep(h_block, weight, bias, softcap, lse, target, amount, T_vec, Q, row_const, vocab_chunk,
                           grad_h_block, grad_w, grad_b):
    """One row block's backward over every vocabulary chunk (the capped form of streamed.logit_gradient_sweep)."""
    acc = lse.dtype
    for v0, v1 in _spans(weight.shape[0], vocab_chunk):
        w, _, b = _weight_chunk(weight, bias, v0, v1, acc, False)
        with record_function("dropreg::softcap_logit_gradient"):
            logits, c, z2, z3 = softcap_derivatives(_chunk_logits(h_block, w, b), softcap)
            probs = logits.sub_(lse[:, None]).exp_()
            g_logits = c * row_const[:, None]
            if T_vec is not None:
                phi = c * c + z2
                g_logits += phi * (T_vec @ w.T)
                if Q is not None:
                    g_logits += (c * phi + 2 * c * z2 + z3) * (Q @ (w * w).T)
            g_logits.mul_(probs)
            _subtract_at_target(g_logits, target, v0, v1, amount)
        if grad_h_block is not None:
            grad_h_block.addmm_(g_logits, w)
        if grad_w is not None:
            g_w = g_logits.T @ h_block
            if T_vec is not None:
                g_w += (probs * c).T @ T_vec
                if Q is not None:
                    g_w += 2 * w * ((probs * phi).T @ Q)
            grad_w[v0:v1] += g_w
        if grad_b is not None:
            grad_b[v0:v1] += g_logits.sum(0)


class StreamedSoftcapTerms(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, target, signs, softcap, need_explicit, need_implicit, row_block, vocab_chunk):
        acc = accumulation_dtype(h.dtype)
        need_mu = need_explicit or need_implicit
        with record_function("dropreg::softcap_forward_stats"):
            lse, m1, m2 = _capped_statistics(h, weight, bias, softcap, need_mu, need_explicit, row_block,
                                             vocab_chunk)
        hc = h.to(acc)
        y = _TargetValues(hc, weight, bias, target, softcap, acc)
        ce = lse - y.z
        quadratic = sign_term = torch.zeros_like(ce)
        if need_explicit:
            quadratic = (hc * hc * (m2 - m1 * m1 - y.z2[:, None] * y.w * y.w)).sum(1)
        if need_implicit:
            sign_term = (signs * hc * (m1 - y.c[:, None] * y.w)).sum(1)
        ctx.save_for_backward(h, weight, bias, target, signs, lse, m1, m2)
        ctx.options = (softcap, need_explicit, need_implicit, row_block, vocab_chunk)
        return ce, quadratic, sign_term, m1

    @staticmethod
    @first_order_only
    def backward(ctx, grad_ce, grad_quadratic, grad_sign_term, grad_m1):
        h, weight, bias, target, signs, lse, m1, m2 = ctx.saved_tensors
        softcap, need_explicit, need_implicit, row_block, vocab_chunk = ctx.options
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        acc = lse.dtype
        n_rows, dim = h.shape
        grad_h = torch.empty(n_rows, dim, dtype=acc, device=h.device) if want_h else None
        grad_w = torch.zeros(weight.shape[0], dim, dtype=acc, device=h.device) if want_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=acc, device=h.device) if want_b else None
        zeros = torch.zeros_like(lse)
        g_ce, g_r, g_i = (zeros if g is None else g.to(acc) for g in (grad_ce, grad_quadratic, grad_sign_term))
        for r0, r1 in _spans(n_rows, row_block):
            h_block, rows = h[r0:r1].to(acc), slice(r0, r1)
            y = _TargetValues(h_block, weight, bias, target[rows], softcap, acc)
            # dF/dlse = g_ce, dF/dM1 = T, dF/dM2 = Q; row_const = g_ce - T.M1 - Q.M2 (docs/math.md 3.6)
            row_const = g_ce[rows].clone()
            amount = g_ce[rows] * y.c  # what G loses at the target
            T_vec = Q = None
            direct_h = torch.zeros_like(h_block)
            if need_explicit or need_implicit:
                T_vec = torch.zeros_like(h_block)
                if grad_m1 is not None:
                    T_vec += grad_m1[rows].to(acc)
            if need_explicit:
                q, g_r_col = h_block * h_block, g_r[rows, None]
                Q = g_r_col * q
                T_vec -= 2 * Q * m1[rows]
                row_const -= (Q * m2[rows]).sum(1)
                amount += g_r[rows] * y.z3 * (q * y.w * y.w).sum(1)
                direct_h += 2 * g_r_col * h_block * (m2[rows] - m1[rows] ** 2 - y.z2[:, None] * y.w * y.w)
            if need_implicit:
                g_i_col = g_i[rows, None]
                u = signs[rows] * h_block
                T_vec += g_i_col * u
                amount += g_i[rows] * y.z2 * (u * y.w).sum(1)
                direct_h += g_i_col * signs[rows] * (m1[rows] - y.c[:, None] * y.w)
            if T_vec is not None:
                row_const -= (T_vec * m1[rows]).sum(1)
            grad_h_block = torch.zeros_like(h_block) if want_h else None
            _capped_gradient_sweep(h_block, weight, bias, softcap, lse[rows], target[rows], amount, T_vec, Q,
                                   row_const, vocab_chunk, grad_h_block, grad_w, grad_b)
            if want_h:
                grad_h[rows] = grad_h_block + direct_h
            if want_w:  # the target terms' own dependence on W_y (not through the logit)
                direct_w = torch.zeros_like(h_block)
                if need_explicit:
                    direct_w -= 2 * g_r[rows, None] * y.z2[:, None] * h_block * h_block * y.w
                if need_implicit:
                    direct_w -= g_i[rows, None] * y.c[:, None] * signs[rows] * h_block
                grad_w.index_add_(0, target[rows], direct_w)
        return (None if grad_h is None else grad_h.to(h.dtype), None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None, None, None, None)


@_eager_under_compile
def streamed_softcap_terms(input, weight, bias, target, signs, seed, need_explicit, need_implicit, softcap, *,
                           row_block=None, vocab_chunk=None):
    """Per-row ``(ce, quadratic, sign_term, M1)`` of a softcapped head, as
    :func:`dropreg.reference.reference_softcap_terms`, streamed."""
    # streamed.default_blocks looked up per call: the test suite's small-tile variant patches it
    default_rows, default_chunk = streamed.default_blocks(input.shape[0], weight.shape[0])
    signs = implicit_signs(input, signs, seed, need_implicit)
    return StreamedSoftcapTerms.apply(input, weight, bias, target, signs, float(softcap), need_explicit,
                                      need_implicit, row_block or default_rows, vocab_chunk or default_chunk)
