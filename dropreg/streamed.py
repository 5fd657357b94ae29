"""The ``"torch"`` backend: MATH.md's one-pass algorithm in chunked PyTorch, any device.

Forward streams vocabulary chunks per row block, keeping the online state (running max, L, A1, A2).
Backward recomputes the logits chunk by chunk and forms the logit gradient G without storing it.
Peak extra memory is O(row_block * vocab_chunk + (N + V) * d): never N x V.

Multiply-adds per row block and chunk, matching MATH.md's count (R rows, C vocabulary entries):
forward ``z = h W_c^T`` (RCd) and ``e @ [W_c | W_c*W_c]`` (2RCd); backward the z recompute (RCd),
``[T | gR' q] @ [W_c | W_c*W_c]^T`` (2RCd), ``G @ W_c`` (RCd), ``G^T H`` and ``S^T [T | gR' q]``
(3RCd). Terms that are switched off drop their share.
"""
from __future__ import annotations

import torch
from torch.profiler import record_function

from .reference import accumulation_dtype
from .signs import philox_signs

DEFAULT_ROW_BLOCK = 1024
TILE_ELEMENTS = 1 << 21  # one R x C fp32 tile is 8 MiB: large enough for GEMM speed, small next to N x V
MIN_VOCAB_CHUNK = 256


def _spans(total: int, step: int):
    for start in range(0, total, step):
        yield start, min(start + step, total)


def _logit_shift(running_max: torch.Tensor) -> torch.Tensor:
    # A row whose logits so far are all -inf has max -inf; shifting by it would give exp(-inf + inf) = NaN.
    return torch.where(running_max == float("-inf"), torch.zeros_like(running_max), running_max)


def _weight_chunk(weight, bias, v0, v1, acc, with_squares):
    w = weight[v0:v1].to(acc)
    stacked = torch.cat([w, w * w], dim=1) if with_squares else w
    b = None if bias is None else bias[v0:v1].to(acc)
    return w, stacked, b


def _chunk_logits(h, w, b):
    return h @ w.T if b is None else torch.addmm(b, h, w.T)


def forward_statistics(h, weight, bias, *, need_mean, need_second_moment, row_block, vocab_chunk):
    """Per-row ``lse``, and optionally ``mu = E_s[W]`` and ``m2 = E_s[W*W]``, in one streamed pass."""
    acc = accumulation_dtype(h.dtype)
    n_rows, dim = h.shape
    vocab = weight.shape[0]
    n_moments = (1 + int(need_second_moment)) if need_mean else 0
    lse = torch.empty(n_rows, dtype=acc, device=h.device)
    moments = torch.zeros(n_rows, n_moments * dim, dtype=acc, device=h.device)
    for r0, r1 in _spans(n_rows, row_block):
        h_block = h[r0:r1].to(acc)
        running_max = torch.full((r1 - r0,), float("-inf"), dtype=acc, device=h.device)
        running_sum = torch.zeros(r1 - r0, dtype=acc, device=h.device)
        acc_moments = moments[r0:r1]
        for v0, v1 in _spans(vocab, vocab_chunk):
            w, stacked, b = _weight_chunk(weight, bias, v0, v1, acc, need_second_moment)
            exp_logits = _chunk_logits(h_block, w, b)
            new_max = torch.maximum(running_max, exp_logits.amax(dim=1))
            shift = _logit_shift(new_max)
            rescale = torch.exp(running_max - shift)
            exp_logits.sub_(shift[:, None]).exp_()
            running_sum = running_sum * rescale + exp_logits.sum(dim=1)
            if n_moments:
                acc_moments.mul_(rescale[:, None]).addmm_(exp_logits, stacked)
            running_max = new_max
        lse[r0:r1] = _logit_shift(running_max) + running_sum.log()
        acc_moments.div_(running_sum[:, None])
    mean = moments[:, :dim] if need_mean else None
    second = moments[:, dim:] if need_second_moment else None
    return lse, mean, second


class StreamedTerms(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, target, signs, need_explicit, need_implicit, row_block, vocab_chunk):
        acc = accumulation_dtype(h.dtype)
        with record_function("dropreg::forward_stats"):
            lse, mu, m2 = forward_statistics(
                h, weight, bias, need_mean=need_explicit or need_implicit,
                need_second_moment=need_explicit, row_block=row_block, vocab_chunk=vocab_chunk)
        hc = h.to(acc)
        w_target = weight[target].to(acc)
        target_logit = (hc * w_target).sum(1)
        if bias is not None:
            target_logit = target_logit + bias[target].to(acc)
        ce = lse - target_logit
        quadratic = sign_term = torch.zeros_like(ce)
        var = None
        if need_explicit:
            var = m2 - mu * mu
            quadratic = (hc * hc * var).sum(1)
        if need_implicit:
            sign_term = (signs * hc * (mu - w_target)).sum(1)
        ctx.save_for_backward(h, weight, bias, target, signs, lse, mu, var)
        ctx.options = (need_explicit, need_implicit, row_block, vocab_chunk)
        return ce, quadratic, sign_term

    @staticmethod
    def backward(ctx, grad_ce, grad_quadratic, grad_sign_term):
        h, weight, bias, target, signs, lse, mu, var = ctx.saved_tensors
        need_explicit, need_implicit, row_block, vocab_chunk = ctx.options
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        acc = lse.dtype
        n_rows, dim = h.shape
        vocab = weight.shape[0]
        grad_h = torch.empty(n_rows, dim, dtype=acc, device=h.device) if want_h else None
        grad_w = torch.zeros(vocab, dim, dtype=acc, device=h.device) if want_w else None
        grad_b = torch.zeros(vocab, dtype=acc, device=h.device) if want_b else None
        modulated = need_explicit or need_implicit
        for r0, r1 in _spans(n_rows, row_block):
            h_block, y = h[r0:r1].to(acc), target[r0:r1]
            g_ce = grad_ce[r0:r1].to(acc)
            # Row-wise parts of G_v = s_v * (g_ce + gR'(r_v - Rt) + gI'(a_v - abar)) - g_ce [v = y]:
            # gR' r_v + gI' a_v = [T | gR' q] . [W_v | W_v*W_v] + const (MATH.md, GEMM-friendly form).
            row_const = g_ce.clone()
            parts_t = torch.zeros_like(h_block)
            left = None
            if need_explicit:
                g_r = grad_quadratic[r0:r1].to(acc)[:, None]
                mu_b, var_b = mu[r0:r1], var[r0:r1]
                q = h_block * h_block
                g_q = g_r * q
                parts_t -= 2 * g_q * mu_b
                row_const += (g_q * (mu_b * mu_b - var_b)).sum(1)
            if need_implicit:
                g_i = grad_sign_term[r0:r1].to(acc)[:, None]
                mu_b = mu[r0:r1]
                u = signs[r0:r1] * h_block
                parts_t += g_i * u
                row_const -= (g_i * mu_b * u).sum(1)
            if modulated:
                left = torch.cat([parts_t, g_q], dim=1) if need_explicit else parts_t
            grad_h_block = torch.zeros_like(h_block)
            for v0, v1 in _spans(vocab, vocab_chunk):
                w, stacked, b = _weight_chunk(weight, bias, v0, v1, acc, need_explicit)
                with record_function("dropreg::logit_gradient"):
                    probs = _chunk_logits(h_block, w, b).sub_(lse[r0:r1, None]).exp_()
                    if modulated:
                        g_logits = (left @ stacked.T).add_(row_const[:, None]).mul_(probs)
                    else:
                        g_logits = probs * g_ce[:, None]
                    in_chunk = (y >= v0) & (y < v1)
                    g_logits.scatter_add_(1, (y - v0).clamp(0, v1 - v0 - 1)[:, None],
                                          torch.where(in_chunk, -g_ce, 0.0)[:, None])
                if want_h:
                    with record_function("dropreg::grad_input"):
                        grad_h_block.addmm_(g_logits, w)
                if want_w:
                    with record_function("dropreg::grad_weight"):
                        g_w = g_logits.T @ h_block
                        if modulated:
                            spread = probs.T @ left  # S^T [T | gR' q]
                            g_w += spread[:, :dim]
                            if need_explicit:
                                g_w += 2 * w * spread[:, dim:]
                        grad_w[v0:v1] += g_w
                if want_b:
                    grad_b[v0:v1] += g_logits.sum(0)
            w_target = weight[y].to(acc)
            if want_h:
                if need_explicit:
                    grad_h_block += 2 * g_r * h_block * var[r0:r1]
                if need_implicit:
                    grad_h_block += g_i * signs[r0:r1] * (mu[r0:r1] - w_target)
                grad_h[r0:r1] = grad_h_block
            if want_w and need_implicit:
                grad_w.index_add_(0, y, -g_i * u)
        return (
            None if grad_h is None else grad_h.to(h.dtype),
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
            None, None, None, None, None, None,
        )


def default_blocks(n_rows: int, vocab: int) -> tuple[int, int]:
    row_block = max(1, min(n_rows, DEFAULT_ROW_BLOCK))
    vocab_chunk = max(1, min(vocab, max(MIN_VOCAB_CHUNK, TILE_ELEMENTS // row_block)))
    return row_block, vocab_chunk


def streamed_terms(input, weight, bias, target, signs, seed, need_explicit, need_implicit,
                   *, row_block=None, vocab_chunk=None):
    """Per-row ``(ce, quadratic, sign_term)``, as :func:`dropreg.reference.reference_terms`, streamed."""
    default_rows, default_chunk = default_blocks(input.shape[0], weight.shape[0])
    acc = accumulation_dtype(input.dtype)
    if need_implicit:
        if signs is None:
            signs = philox_signs(seed, input.shape[0], input.shape[1], device=input.device, dtype=acc)
        signs = signs.to(acc)
    else:
        signs = None
    return StreamedTerms.apply(input, weight, bias, target, signs, need_explicit, need_implicit,
                               row_block or default_rows, vocab_chunk or default_chunk)
