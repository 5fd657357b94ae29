"""Logit softcapping (Gemma 2's ``z = softcap * tanh(raw / softcap)``) for the ``"torch"`` and ``"cpu"`` backends:
docs/math.md 3.6. The per-row algebra is here, once; the two passes over the vocabulary are chunked PyTorch
(:class:`TorchPasses`) or the C++ ops of csrc/softcap.cpp (:class:`CppPasses`).

The cap makes every statistic weight vocabulary entry v by a function of its own raw logit: with ``c = dz/draw``,
``z2``, ``z3`` the higher derivatives and ``phi = c^2 + z2``, the forward streams ``M1 = sum_v s_v c_v W_v`` and
``M2 = sum_v s_v phi_v W_v^2`` (in place of ``mu`` and ``m2``) and the backward's logit gradient becomes
``G = s (c row_const + phi (T W^T) + psi (Q (W*W)^T)) - amount [v = y]`` with ``psi = c phi + 2 c z2 + z3``: the
same GEMMs as the uncapped path (docs/math.md 4.4), split where the uncapped path stacks them.

Label smoothing's part of a capped loss, ``-(eps/V) sum_v w_v z_v``, is not linear in the raw logits; its sums
and their dropout terms are :class:`CappedSmoothingSums`, a third streamed pass in PyTorch (docs/math.md 3.7).
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


class TargetValues:
    """Per row, what the terms need of the target class: the capped target logit ``z`` and its derivatives ``c``,
    ``z2``, ``z3`` (from the raw target logit), and the target row's products ``q_ww = sum_j h_j^2 W_yj^2`` (explicit
    term) and ``u_w = u . W_y`` with ``u = sigma * h`` (implicit term; None when unused). O(N d). On a sliced head the
    slice owning the target gives ``raw``, ``q_ww`` and ``u_w`` (docs/math.md 12.6)."""

    def __init__(self, raw, q_ww, u_w, softcap):
        self.raw, self.q_ww, self.u_w = raw, q_ww, u_w
        self.z, self.c, self.z2, self.z3 = softcap_derivatives(raw, softcap)


def target_products(hc, target_row, signs, need_explicit, need_implicit):
    """``(q_ww, u_w)`` of :class:`TargetValues` from the rows' target weight rows (None where the term is off)."""
    q_ww = (hc * hc * target_row * target_row).sum(1) if need_explicit else None
    u_w = (signs * hc * target_row).sum(1) if need_implicit else None
    return q_ww, u_w


def capped_terms(hc, signs, lse, m1, m2, y, need_explicit, need_implicit):
    """Per-row ``(ce, quadratic, sign_term)`` from the merged statistics (docs/math.md 3.6)."""
    ce = lse - y.z
    quadratic = sign_term = torch.zeros_like(ce)
    if need_explicit:
        quadratic = (hc * hc * (m2 - m1 * m1)).sum(1) - y.z2 * y.q_ww
    if need_implicit:
        sign_term = (signs * hc * m1).sum(1) - y.c * y.u_w
    return ce, quadratic, sign_term


def backward_row_terms(hc, signs, m1, m2, y, upstream, grad_m1, need_explicit, need_implicit):
    """What the vocabulary sweep needs, per row: ``(row_const, amount, T, Q)``, and the terms' own dependence on h
    (not through the logits) that involves no weight row: the part of grad_input every rank of a sliced head
    adds alike. ``upstream``: the three terms' gradients; dF/dlse = g_ce, dF/dM1 = T, dF/dM2 = Q,
    row_const = g_ce - T.M1 - Q.M2."""
    g_ce, g_r, g_i = upstream
    row_const = g_ce.clone()
    amount = g_ce * y.c  # what G loses at the target
    T_vec = Q = None
    direct_h = torch.zeros_like(hc)
    if need_explicit or need_implicit:
        T_vec = torch.zeros_like(hc) if grad_m1 is None else grad_m1.to(hc.dtype).clone()
    if need_explicit:
        Q = g_r[:, None] * hc * hc
        T_vec -= 2 * Q * m1
        row_const -= (Q * m2).sum(1)
        amount += g_r * y.z3 * y.q_ww
        direct_h += 2 * g_r[:, None] * hc * (m2 - m1 * m1)
    if need_implicit:
        T_vec += g_i[:, None] * signs * hc
        amount += g_i * y.z2 * y.u_w
        direct_h += g_i[:, None] * signs * m1
    if T_vec is not None:
        row_const -= (T_vec * m1).sum(1)
    return row_const, amount, T_vec, Q, direct_h


def target_row_gradients(hc, signs, target_row, y, upstream, need_explicit, need_implicit):
    """The terms' own dependence on the target's weight row: ``(to grad_input, to grad_W[y])`` per row."""
    _, g_r, g_i = upstream
    to_h, to_w = torch.zeros_like(hc), torch.zeros_like(hc)
    if need_explicit:
        scaled = 2 * (g_r * y.z2)[:, None] * hc * target_row
        to_h -= scaled * target_row
        to_w -= scaled * hc
    if need_implicit:
        scaled = (g_i * y.c)[:, None] * signs
        to_h -= scaled * target_row
        to_w -= scaled * hc
    return to_h, to_w


class TorchPasses:
    """The two vocabulary passes in chunked PyTorch (any device), ``row_block`` rows and ``vocab_chunk`` classes at a
    time. The C++ backend has the same two passes as ops (``dropreg::softcap_statistics``, ``softcap_gradient_sweep``,
    csrc/softcap.cpp): :class:`CppPasses`."""

    def __init__(self, row_block, vocab_chunk):
        self.row_block, self.vocab_chunk = row_block, vocab_chunk

    def statistics(self, h, weight, bias, softcap, need_m1, need_m2, omega=None):
        """Per row ``lse`` of the capped logits and, as asked, ``M1`` and ``M2`` (N x d each, else None) and label
        smoothing's ``S = sum_v omega_v z_v`` (None without ``omega``, docs/math.md 3.7)."""
        acc = accumulation_dtype(h.dtype)
        n_rows, dim = h.shape
        lse = torch.empty(n_rows, dtype=acc, device=h.device)
        smoothing_sum = None if omega is None else torch.zeros(n_rows, dtype=acc, device=h.device)
        m1 = torch.zeros(n_rows, dim, dtype=acc, device=h.device) if need_m1 else None
        m2 = torch.zeros(n_rows, dim, dtype=acc, device=h.device) if need_m2 else None
        for r0, r1 in _spans(n_rows, self.row_block):
            h_block = h[r0:r1].to(acc)
            softmax = OnlineSoftmax(r1 - r0, acc, h.device)
            for v0, v1 in _spans(weight.shape[0], self.vocab_chunk):
                w, _, b = _weight_chunk(weight, bias, v0, v1, acc, False)
                logits, c, z2, _ = softcap_derivatives(_chunk_logits(h_block, w, b), softcap)
                if omega is not None:
                    smoothing_sum[r0:r1] += logits @ omega[v0:v1].to(acc)
                rescale = softmax.absorb(logits)  # logits become exp(z - running max)
                if need_m1:
                    m1[r0:r1].mul_(rescale[:, None]).addmm_(logits * c, w)
                if need_m2:
                    m2[r0:r1].mul_(rescale[:, None]).addmm_(logits * (c * c + z2), w * w)
            lse[r0:r1] = softmax.lse()
            for moment in (m1, m2):
                if moment is not None:
                    moment[r0:r1] /= softmax.sum[:, None]
        return lse, m1, m2, smoothing_sum

    def sweep(self, h, weight, bias, softcap, lse, target, amount, row_const, T_vec, Q, wants, omega=None,
              grad_sum=None):
        """``(grad_h_vocab, grad_w, grad_b)``: ``sum_v G_v W_v``, ``G^T h + (s c)^T T + 2 W * (s phi)^T Q`` and
        ``sum_rows G`` (None where not wanted); with ``omega``, G includes S's ``grad_sum omega c``."""
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
                    if omega is not None:
                        g_logits += grad_sum[rows, None] * omega[v0:v1].to(acc) * c
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
    def statistics(h, weight, bias, softcap, need_m1, need_m2, omega=None):
        lse, m1, m2, smoothing_sum = torch.ops.dropreg.softcap_statistics(h, weight, bias, softcap, need_m1, need_m2,
                                                                          omega)
        return lse, (m1 if need_m1 else None), (m2 if need_m2 else None), (None if omega is None else smoothing_sum)

    @staticmethod
    def sweep(h, weight, bias, softcap, lse, target, amount, row_const, T_vec, Q, wants, omega=None, grad_sum=None):
        want_h, want_w, want_b = wants
        grads = torch.ops.dropreg.softcap_gradient_sweep(
            h, weight, bias, softcap, lse, target, amount, row_const, T_vec, Q, omega, grad_sum,
            [want_h, want_w, want_b])
        return tuple(g if wanted else None for g, wanted in zip(grads, wants))


class CappedSmoothingSums(torch.autograd.Function):
    """Label smoothing's streamed part of a capped head (docs/math.md 3.7), per row: ``S = sum_v omega_v z_v``, and
    the two dropout terms of ``S``, ``Sq = q . K2`` and ``Ss = u . K1``, with ``omega_v = (eps / V) w_v``
    (:meth:`dropreg.loss_options.LossOptions.capped_smoothing_weights`), ``K1 = sum_v omega_v c_v W_v``,
    ``K2 = sum_v omega_v z2_v W_v^2``, ``q = h*h``, ``u = sigma*h``. Chunked PyTorch on any device; the backward
    recomputes the capped logits chunk by chunk.
    ``need_sum=False`` leaves ``S`` (zeros) to the capped head's own passes, which form it at no GEMM's cost."""

    @staticmethod
    def forward(ctx, h, weight, bias, omega, signs, softcap, need_sum, need_explicit, need_implicit, blocks):
        acc = accumulation_dtype(h.dtype)
        n_rows, dim = h.shape
        total = torch.zeros(n_rows, dtype=acc, device=h.device)
        k1 = torch.zeros(n_rows, dim, dtype=acc, device=h.device) if need_implicit else None
        k2 = torch.zeros(n_rows, dim, dtype=acc, device=h.device) if need_explicit else None
        for r0, r1, _, _, h_block, w, b, omega_chunk in _smoothing_chunks(h, weight, bias, omega, acc, blocks):
            with record_function("dropreg::capped_smoothing_sums"):
                z, c, z2, _ = softcap_derivatives(_chunk_logits(h_block, w, b), softcap)
                if need_sum:
                    total[r0:r1] += z @ omega_chunk
                if k1 is not None:
                    k1[r0:r1].addmm_(c * omega_chunk, w)
                if k2 is not None:
                    k2[r0:r1].addmm_(z2 * omega_chunk, w * w)
        hc = h.to(acc)
        sq = (hc * hc * k2).sum(1) if k2 is not None else torch.zeros_like(total)
        ss = (signs * hc * k1).sum(1) if k1 is not None else torch.zeros_like(total)
        ctx.save_for_backward(h, weight, bias, omega, signs, k1, k2)
        ctx.options = (softcap, need_sum, blocks)
        return total, sq, ss

    @staticmethod
    @first_order_only
    def backward(ctx, grad_total, grad_sq, grad_ss):
        h, weight, bias, omega, signs, k1, k2 = ctx.saved_tensors
        softcap, need_sum, blocks = ctx.options
        acc = accumulation_dtype(h.dtype)
        hc = h.to(acc)
        g_total = None if grad_total is None or not need_sum else grad_total.to(acc)
        # dF/dK1 = g_ss u and dF/dK2 = g_sq q per row; None where the term is off or gets no gradient
        A = None if k1 is None or grad_ss is None else grad_ss.to(acc)[:, None] * signs * hc
        B = None if k2 is None or grad_sq is None else grad_sq.to(acc)[:, None] * hc * hc
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros_like(hc) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=h.device) if want_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=acc, device=h.device) if want_b else None
        for r0, r1, v0, v1, h_block, w, b, omega_chunk in _smoothing_chunks(h, weight, bias, omega, acc, blocks):
            with record_function("dropreg::capped_smoothing_gradient"):
                _, c, z2, z3 = softcap_derivatives(_chunk_logits(h_block, w, b), softcap)
                g_logits = c * g_total[r0:r1, None] if g_total is not None else torch.zeros_like(c)
                if A is not None:
                    g_logits += z2 * (A[r0:r1] @ w.T)
                if B is not None:
                    g_logits += z3 * (B[r0:r1] @ (w * w).T)
                g_logits *= omega_chunk
            if want_h:
                grad_h[r0:r1].addmm_(g_logits, w)
            if want_w:
                g_w = g_logits.T @ h_block
                if A is not None:
                    g_w += (c * omega_chunk).T @ A[r0:r1]
                if B is not None:
                    g_w += 2 * w * ((z2 * omega_chunk).T @ B[r0:r1])
                grad_w[v0:v1] += g_w
            if want_b:
                grad_b[v0:v1] += g_logits.sum(0)
        if want_h:
            if A is not None:
                grad_h += grad_ss.to(acc)[:, None] * signs * k1
            if B is not None:
                grad_h += 2 * grad_sq.to(acc)[:, None] * hc * k2
            grad_h = grad_h.to(h.dtype)
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None, None, None, None)


def _smoothing_chunks(h, weight, bias, omega, acc, blocks):
    """``(r0, r1, v0, v1, h rows, W chunk, b chunk, omega chunk)`` over row blocks and vocabulary chunks, in ``acc``."""
    row_block, vocab_chunk = blocks
    for r0, r1 in _spans(h.shape[0], row_block):
        h_block = h[r0:r1].to(acc)
        for v0, v1 in _spans(weight.shape[0], vocab_chunk):
            w, _, b = _weight_chunk(weight, bias, v0, v1, acc, False)
            yield r0, r1, v0, v1, h_block, w, b, omega[v0:v1].to(acc)


@_eager_under_compile
def capped_smoothing_sums(h, weight, bias, omega, signs, softcap, need_sum, need_explicit, need_implicit):
    """Per row ``(S, Sq, Ss)`` of :class:`CappedSmoothingSums` over this head's classes (a slice's part on a
    vocabulary-parallel head: all three are sums over the classes)."""
    blocks = streamed.default_blocks(h.shape[0], weight.shape[0])
    return CappedSmoothingSums.apply(h, weight, bias, omega.detach(), signs, float(softcap), need_sum, need_explicit,
                                     need_implicit, blocks)


class StreamedSoftcapTerms(torch.autograd.Function):
    """Per-row ``(ce, quadratic, sign_term, M1, S)`` of a capped head; ``passes`` runs the two vocabulary passes.
    ``S = sum_v omega_v z_v`` is label smoothing's part (docs/math.md 3.7), zeros without ``omega``."""

    @staticmethod
    def forward(ctx, h, weight, bias, target, signs, omega, softcap, need_explicit, need_implicit, passes):
        acc = accumulation_dtype(h.dtype)
        with record_function("dropreg::softcap_forward_stats"):
            lse, m1, m2, smoothing_sum = passes.statistics(h, weight, bias, softcap, need_explicit or need_implicit,
                                                           need_explicit, omega)
        hc = h.to(acc)
        y = TargetValues(target_logit(hc, weight, bias, target, acc),
                         *target_products(hc, weight[target].to(acc), signs, need_explicit, need_implicit), softcap)
        ctx.save_for_backward(h, weight, bias, target, signs, omega, lse, m1, m2)
        ctx.options = (softcap, y, need_explicit, need_implicit, passes)
        if smoothing_sum is None:
            smoothing_sum = torch.zeros_like(lse)
        return (*capped_terms(hc, signs, lse, m1, m2, y, need_explicit, need_implicit), m1, smoothing_sum)

    @staticmethod
    @first_order_only
    def backward(ctx, grad_ce, grad_quadratic, grad_sign_term, grad_m1, grad_smoothing_sum):
        h, weight, bias, target, signs, omega, lse, m1, m2 = ctx.saved_tensors
        softcap, y, need_explicit, need_implicit, passes = ctx.options
        acc = lse.dtype
        hc = h.to(acc)
        upstream = [torch.zeros_like(lse) if g is None else g.to(acc)
                    for g in (grad_ce, grad_quadratic, grad_sign_term)]
        row_const, amount, T_vec, Q, direct_h = backward_row_terms(hc, signs, m1, m2, y, upstream, grad_m1,
                                                                   need_explicit, need_implicit)
        grad_sum = smoothing_upstream(omega, grad_smoothing_sum, lse)
        grad_h, grad_w, grad_b = passes.sweep(h, weight, bias, softcap, lse, target, amount, row_const,
                                              T_vec, Q, ctx.needs_input_grad[:3], omega, grad_sum)
        to_h, to_w = target_row_gradients(hc, signs, weight[target].to(acc), y, upstream, need_explicit,
                                          need_implicit)
        if grad_h is not None:
            grad_h = (grad_h + direct_h + to_h).to(h.dtype)
        if grad_w is not None:
            grad_w = grad_w.index_add(0, target, to_w).to(weight.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None, None, None


def smoothing_upstream(omega, grad_smoothing_sum, like):
    """dF/dS per row for the sweep (None without smoothing; zeros when S got no gradient)."""
    if omega is None:
        return None
    return torch.zeros_like(like) if grad_smoothing_sum is None else grad_smoothing_sum.to(like.dtype)


@_eager_under_compile
def streamed_softcap_terms(input, weight, bias, target, signs, seed, need_explicit, need_implicit, softcap,
                           smoothing_weights=None, *, row_block=None, vocab_chunk=None):
    """Per-row ``(ce, quadratic, sign_term, M1, S)`` of a softcapped head, as
    :func:`dropreg.reference.reference_softcap_terms`, streamed in PyTorch (``S`` None without
    ``smoothing_weights``)."""
    # streamed.default_blocks looked up per call: the test suite's small-tile variant patches it
    default_rows, default_chunk = streamed.default_blocks(input.shape[0], weight.shape[0])
    return _apply(input, weight, bias, target, signs, seed, need_explicit, need_implicit, softcap, smoothing_weights,
                  TorchPasses(row_block or default_rows, vocab_chunk or default_chunk))


@_eager_under_compile
def cpu_softcap_terms(input, weight, bias, target, signs, seed, need_explicit, need_implicit, softcap,
                      smoothing_weights=None):
    """:func:`streamed_softcap_terms` with the C++ vocabulary passes (the ``"cpu"`` backend)."""
    load_cpp_library()  # built, or JIT-loaded on first use
    return _apply(input.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(), target,
                  signs, seed, need_explicit, need_implicit, softcap, smoothing_weights, CppPasses())


def _apply(input, weight, bias, target, signs, seed, need_explicit, need_implicit, softcap, smoothing_weights,
           passes):
    signs = implicit_signs(input, signs, seed, need_implicit)
    omega = None if smoothing_weights is None else smoothing_weights.detach().contiguous()
    *terms, smoothing_sum = StreamedSoftcapTerms.apply(input, weight, bias, target.contiguous(), signs, omega,
                                                       float(softcap), need_explicit, need_implicit, passes)
    return (*terms, None if omega is None else smoothing_sum)
