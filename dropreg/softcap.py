"""The softcapped head's passes in chunked PyTorch (Gemma 2's ``z = softcap tanh(raw / softcap)``, docs/math.md 3.6):
:func:`capped_statistics` and :func:`capped_sweep`, which :class:`dropreg.ops.Terms` runs with a cap.

The cap makes every statistic weight vocabulary entry v by a function of its own raw logit: with ``c = dz/draw``,
``z2``, ``z3`` the higher derivatives and ``phi = c^2 + z2``, the forward streams ``M1 = sum_v s_v c_v W_v`` and
``M2 = sum_v s_v phi_v W_v^2`` (in place of ``mu`` and ``m2``) and the backward's logit gradient becomes
``G = s (c row_const + phi (T W^T) + psi (Q (W*W)^T)) - amount [v = y]`` with ``psi = c phi + 2 c z2 + z3``: the
same GEMMs as the uncapped path (docs/math.md 4.4), split where the uncapped path stacks them.

Label smoothing's part of a capped loss, ``-(eps/V) sum_v w_v z_v``, is not linear in the raw logits; its sums and
their dropout terms are :class:`CappedSmoothingSums`, a streamed pass of its own (docs/math.md 3.7).
"""
from __future__ import annotations

import torch
from torch.profiler import record_function

from ._op_family import first_order_only
from ._policy import accumulation_dtype, eager_under_compile
from .plan import default_blocks
from .rows import softcap_derivatives
from .tiles import OnlineSoftmax, chunk_logits, gradient_buffers, spans, subtract_at_target, weight_chunk


def capped_statistics(h, weight, bias, softcap, need_m1, need_m2, omega, row_block, vocab_chunk):
    """Per row ``lse`` of the capped logits and, as asked, ``M1`` and ``M2`` (N x d each, else None) and label
    smoothing's ``S = sum_v omega_v z_v`` (None without ``omega``, docs/math.md 3.7)."""
    acc = accumulation_dtype(h.dtype)
    n_rows, dim = h.shape
    lse = torch.empty(n_rows, dtype=acc, device=h.device)
    smoothing_sum = None if omega is None else torch.zeros(n_rows, dtype=acc, device=h.device)
    m1 = torch.zeros(n_rows, dim, dtype=acc, device=h.device) if need_m1 else None
    m2 = torch.zeros(n_rows, dim, dtype=acc, device=h.device) if need_m2 else None
    for r0, r1 in spans(n_rows, row_block):
        h_block = h[r0:r1].to(acc)
        softmax = OnlineSoftmax(r1 - r0, acc, h.device)
        for v0, v1 in spans(weight.shape[0], vocab_chunk):
            w, _, b = weight_chunk(weight, bias, v0, v1, acc, False)
            logits, c, z2, _ = softcap_derivatives(chunk_logits(h_block, w, b), softcap)
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


def capped_sweep(h, weight, bias, softcap, lse, target, amount, row_const, T_vec, Q, wants, omega, grad_sum, row_block,
                 vocab_chunk):
    """``(grad_h_vocab, grad_w, grad_b)``: ``sum_v G_v W_v``, ``G^T h + (s c)^T T + 2 W * (s phi)^T Q`` and
    ``sum_rows G`` (None where not wanted); with ``omega``, G includes S's ``grad_sum omega c``."""
    want_h, want_w, want_b = wants
    acc = lse.dtype
    n_rows, dim = h.shape
    vocab = weight.shape[0]
    grad_h, grad_w, grad_b = gradient_buffers(wants, n_rows, vocab, dim, acc, h.device)
    for r0, r1 in spans(n_rows, row_block):
        h_block, rows = h[r0:r1].to(acc), slice(r0, r1)
        T_rows = None if T_vec is None else T_vec[rows]
        Q_rows = None if Q is None else Q[rows]
        for v0, v1 in spans(vocab, vocab_chunk):
            w, _, b = weight_chunk(weight, bias, v0, v1, acc, False)
            with record_function("dropreg::softcap_logit_gradient"):
                logits, c, z2, z3 = softcap_derivatives(chunk_logits(h_block, w, b), softcap)
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
                subtract_at_target(g_logits, target[rows], v0, v1, amount[rows])
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
                z, c, z2, _ = softcap_derivatives(chunk_logits(h_block, w, b), softcap)
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
                _, c, z2, z3 = softcap_derivatives(chunk_logits(h_block, w, b), softcap)
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
    for r0, r1 in spans(h.shape[0], row_block):
        h_block = h[r0:r1].to(acc)
        for v0, v1 in spans(weight.shape[0], vocab_chunk):
            w, _, b = weight_chunk(weight, bias, v0, v1, acc, False)
            yield r0, r1, v0, v1, h_block, w, b, omega[v0:v1].to(acc)


@eager_under_compile  # a graph break: Inductor gains nothing on the chunk loops
def capped_smoothing_sums(h, weight, bias, omega, signs, softcap, need_sum, need_explicit, need_implicit):
    """Per row ``(S, Sq, Ss)`` of :class:`CappedSmoothingSums` over this head's classes (a slice's part on a
    vocabulary-parallel head: all three are sums over the classes)."""
    blocks = default_blocks(h.shape[0], weight.shape[0])
    return CappedSmoothingSums.apply(h, weight, bias, omega.detach(), signs, float(softcap), need_sum, need_explicit,
                                     need_implicit, blocks)
