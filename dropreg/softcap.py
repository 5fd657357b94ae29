"""Logit softcapping (Gemma 2's ``z = softcap * tanh(raw / softcap)``) for the ``"torch"`` and ``"cpu"`` backends:
docs/math.md 3.6. The per-row algebra is here, once; the two passes over the vocabulary are chunked PyTorch
(:class:`TorchPasses`) or the C++ ops of csrc/softcap.cpp (:class:`CppPasses`).

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
from .cpu import load as load_cpp_library
from .streamed import (OnlineSoftmax, _chunk_logits, _eager_under_compile, _spans, _subtract_at_target, _weight_chunk,
                       implicit_signs, target_logit)


def softcap_derivatives(raw_logits, softcap):
    """``(z, c, z2, z3)`` elementwise for ``z = softcap tanh(raw / softcap)``: the capped logits and their first,
    second and third derivatives in the raw logits."""
    t = torch.tanh(raw_logits / softcap)
    c = 1 - t * t
    return softcap * t, c, -2 * t * c / softcap, -2 * c * (c - 2 * t * t) / (softcap * softcap)


class _TargetValues:
    """Per row, the capped target logit and its derivatives (O(N d))."""

    def __init__(self, h, weight, bias, target, softcap, acc):
        self.z, self.c, self.z2, self.z3 = softcap_derivatives(target_logit(h, weight, bias, target, acc), softcap)
        self.w = weight[target].to(acc)


class TorchPasses:
    """The two vocabulary passes in chunked PyTorch (any device), ``row_block`` rows and ``vocab_chunk`` classes at a
    time. The C++ backend has the same two passes as ops (``dropreg::softcap_statistics``, ``softcap_gradient_sweep``,
    csrc/softcap.cpp): :class:`CppPasses`."""

    def __init__(self, row_block, vocab_chunk):
        self.row_block, self.vocab_chunk = row_block, vocab_chunk

    def statistics(self, h, weight, bias, softcap, need_m1, need_m2):
        """Per row ``lse`` of the capped logits and, as asked, ``M1`` and ``M2`` (N x d each, else None)."""
        acc = accumulation_dtype(h.dtype)
        n_rows, dim = h.shape
        lse = torch.empty(n_rows, dtype=acc, device=h.device)
        m1 = torch.zeros(n_rows, dim, dtype=acc, device=h.device) if need_m1 else None
        m2 = torch.zeros(n_rows, dim, dtype=acc, device=h.device) if need_m2 else None
        for r0, r1 in _spans(n_rows, self.row_block):
            h_block = h[r0:r1].to(acc)
            softmax = OnlineSoftmax(r1 - r0, acc, h.device)
            for v0, v1 in _spans(weight.shape[0], self.vocab_chunk):
                w, _, b = _weight_chunk(weight, bias, v0, v1, acc, False)
                logits, c, z2, _ = softcap_derivatives(_chunk_logits(h_block, w, b), softcap)
                rescale = softmax.absorb(logits)  # logits become exp(z - running max)
                if need_m1:
                    m1[r0:r1].mul_(rescale[:, None]).addmm_(logits * c, w)
                if need_m2:
                    m2[r0:r1].mul_(rescale[:, None]).addmm_(logits * (c * c + z2), w * w)
            lse[r0:r1] = softmax.lse()
            for moment in (m1, m2):
                if moment is not None:
                    moment[r0:r1] /= softmax.sum[:, None]
        return lse, m1, m2

    def sweep(self, h, weight, bias, softcap, lse, target, amount, row_const, T_vec, Q, wants):
        """``(grad_h_vocab, grad_w, grad_b)``: ``sum_v G_v W_v``, ``G^T h + (s c)^T T + 2 W * (s phi)^T Q`` and
        ``sum_rows G`` (None where not wanted)."""
        want_h, want_w, want_b = wants
        acc = lse.dtype
        n_rows, dim = h.shape
        vocab = weight.shape[0]
        grad_h = torch.zeros(n_rows, dim, dtype=acc, device=h.device) if want_h else None
        grad_w = torch.zeros(vocab, dim, dtype=acc, device=h.device) if want_w else None
        grad_b = torch.zeros(vocab, dtype=acc, device=h.device) if want_b else None
        for r0, r1 in _spans(n_rows, self.row_block):
            h_block, rows = h[r0:r1].to(acc), slice(r0, r1)
            T_rows = None if T_vec is None else T_vec[rows]
            Q_rows = None if Q is None else Q[rows]
            for v0, v1 in _spans(vocab, self.vocab_chunk):
                w, _, b = _weight_chunk(weight, bias, v0, v1, acc, False)
                with record_function("dropreg::softcap_logit_gradient"):
                    logits, c, z2, z3 = softcap_derivatives(_chunk_logits(h_block, w, b), softcap)
                    probs = logits.sub_(lse[rows, None]).exp_()
                    g_logits = c * row_const[rows, None]
                    if T_rows is not None:
                        phi = c * c + z2
                        g_logits += phi * (T_rows @ w.T)
                        if Q_rows is not None:
                            g_logits += (c * phi + 2 * c * z2 + z3) * (Q_rows @ (w * w).T)
                    g_logits.mul_(probs)
                    _subtract_at_target(g_logits, target[rows], v0, v1, amount[rows])
                if want_h:
                    grad_h[rows].addmm_(g_logits, w)
                if want_w:
                    g_w = g_logits.T @ h_block
                    if T_rows is not None:
                        g_w += (probs * c).T @ T_rows
                        if Q_rows is not None:
                            g_w += 2 * w * ((probs * phi).T @ Q_rows)
                    grad_w[v0:v1] += g_w
                if want_b:
                    grad_b[v0:v1] += g_logits.sum(0)
        return grad_h, grad_w, grad_b


class CppPasses:
    """The two passes as the C++ ops of csrc/softcap.cpp (CPU tensors)."""

    @staticmethod
    def statistics(h, weight, bias, softcap, need_m1, need_m2):
        lse, m1, m2 = torch.ops.dropreg.softcap_statistics(h, weight, bias, softcap, need_m1, need_m2)
        return lse, (m1 if need_m1 else None), (m2 if need_m2 else None)

    @staticmethod
    def sweep(h, weight, bias, softcap, lse, target, amount, row_const, T_vec, Q, wants):
        want_h, want_w, want_b = wants
        grads = torch.ops.dropreg.softcap_gradient_sweep(
            h, weight, bias, softcap, lse, target, amount, row_const, T_vec, Q, [want_h, want_w, want_b])
        return tuple(g if wanted else None for g, wanted in zip(grads, wants))


class StreamedSoftcapTerms(torch.autograd.Function):
    """Per-row ``(ce, quadratic, sign_term, M1)`` of a capped head; ``passes`` runs the two vocabulary passes."""

    @staticmethod
    def forward(ctx, h, weight, bias, target, signs, softcap, need_explicit, need_implicit, passes):
        acc = accumulation_dtype(h.dtype)
        with record_function("dropreg::softcap_forward_stats"):
            lse, m1, m2 = passes.statistics(h, weight, bias, softcap, need_explicit or need_implicit, need_explicit)
        hc = h.to(acc)
        y = _TargetValues(hc, weight, bias, target, softcap, acc)
        ce = lse - y.z
        quadratic = sign_term = torch.zeros_like(ce)
        if need_explicit:
            quadratic = (hc * hc * (m2 - m1 * m1 - y.z2[:, None] * y.w * y.w)).sum(1)
        if need_implicit:
            sign_term = (signs * hc * (m1 - y.c[:, None] * y.w)).sum(1)
        ctx.save_for_backward(h, weight, bias, target, signs, lse, m1, m2)
        ctx.options = (softcap, need_explicit, need_implicit, passes)
        return ce, quadratic, sign_term, m1

    @staticmethod
    @first_order_only
    def backward(ctx, grad_ce, grad_quadratic, grad_sign_term, grad_m1):
        h, weight, bias, target, signs, lse, m1, m2 = ctx.saved_tensors
        softcap, need_explicit, need_implicit, passes = ctx.options
        wants = ctx.needs_input_grad[:3]
        acc = lse.dtype
        hc = h.to(acc)
        zeros = torch.zeros_like(lse)
        g_ce, g_r, g_i = (zeros if g is None else g.to(acc) for g in (grad_ce, grad_quadratic, grad_sign_term))
        y = _TargetValues(hc, weight, bias, target, softcap, acc)
        # dF/dlse = g_ce, dF/dM1 = T, dF/dM2 = Q; row_const = g_ce - T.M1 - Q.M2 (docs/math.md 3.6)
        row_const = g_ce.clone()
        amount = g_ce * y.c  # what G loses at the target
        T_vec = Q = None
        direct_h = torch.zeros_like(hc)  # the terms' own dependence on h (not through the logits)
        direct_w = torch.zeros_like(hc)  # ... and on W_y, added at each row's target
        if need_explicit or need_implicit:
            T_vec = torch.zeros_like(hc) if grad_m1 is None else grad_m1.to(acc).clone()
        if need_explicit:
            q, g_r_col = hc * hc, g_r[:, None]
            Q = g_r_col * q
            T_vec -= 2 * Q * m1
            row_const -= (Q * m2).sum(1)
            amount += g_r * y.z3 * (q * y.w * y.w).sum(1)
            direct_h += 2 * g_r_col * hc * (m2 - m1 * m1 - y.z2[:, None] * y.w * y.w)
            direct_w -= 2 * g_r_col * y.z2[:, None] * q * y.w
        if need_implicit:
            g_i_col = g_i[:, None]
            u = signs * hc
            T_vec += g_i_col * u
            amount += g_i * y.z2 * (u * y.w).sum(1)
            direct_h += g_i_col * signs * (m1 - y.c[:, None] * y.w)
            direct_w -= g_i_col * y.c[:, None] * u
        if T_vec is not None:
            row_const -= (T_vec * m1).sum(1)
        grad_h, grad_w, grad_b = passes.sweep(h, weight, bias, softcap, lse, target, amount, row_const, T_vec, Q,
                                              wants)
        if grad_h is not None:
            grad_h = (grad_h + direct_h).to(h.dtype)
        if grad_w is not None:
            grad_w = grad_w.index_add(0, target, direct_w).to(weight.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None, None


@_eager_under_compile
def streamed_softcap_terms(input, weight, bias, target, signs, seed, need_explicit, need_implicit, softcap, *,
                           row_block=None, vocab_chunk=None):
    """Per-row ``(ce, quadratic, sign_term, M1)`` of a softcapped head, as
    :func:`dropreg.reference.reference_softcap_terms`, streamed in PyTorch."""
    # streamed.default_blocks looked up per call: the test suite's small-tile variant patches it
    default_rows, default_chunk = streamed.default_blocks(input.shape[0], weight.shape[0])
    return _apply(input, weight, bias, target, signs, seed, need_explicit, need_implicit, softcap,
                  TorchPasses(row_block or default_rows, vocab_chunk or default_chunk))


@_eager_under_compile
def cpu_softcap_terms(input, weight, bias, target, signs, seed, need_explicit, need_implicit, softcap):
    """:func:`streamed_softcap_terms` with the C++ vocabulary passes (the ``"cpu"`` backend)."""
    load_cpp_library()  # built, or JIT-loaded on first use
    return _apply(input.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(), target,
                  signs, seed, need_explicit, need_implicit, softcap, CppPasses())


def _apply(input, weight, bias, target, signs, seed, need_explicit, need_implicit, softcap, passes):
    signs = implicit_signs(input, signs, seed, need_implicit)
    return StreamedSoftcapTerms.apply(input, weight, bias, target.contiguous(), signs, float(softcap),
                                      need_explicit, need_implicit, passes)
