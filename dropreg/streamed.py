"""The ``"torch"`` backend's passes (:class:`StreamedPasses`): docs/math.md's one-pass algorithm in chunked PyTorch,
any device.

Forward streams vocabulary chunks per row block, keeping the online state (running max, L, A1, A2).
Backward recomputes the logits chunk by chunk and forms the logit gradient G without storing it.
Peak extra memory is O(row_block * vocab_chunk + (N + V) * d): never N x V.

Multiply-adds per row block and chunk, matching docs/math.md's count (R rows, C vocabulary entries):
forward ``z = h W_c^T`` (RCd) and ``e @ [W_c | W_c*W_c]`` (2RCd); backward the z recompute (RCd),
``[T | gR' q] @ [W_c | W_c*W_c]^T`` (2RCd), ``G @ W_c`` (RCd), ``G^T H`` and ``S^T [T | gR' q]``
(3RCd). Terms that are switched off drop their share.
"""
from __future__ import annotations

import torch
from torch.profiler import record_function

from ._policy import accumulation_dtype, eager_under_compile
from .plan import DEFAULT_PLAN, BlockPlan, ce_only_blocks, default_blocks
from .rows import (SliceStatistics, capped_logits, capped_slope, input_row_gradient, logit_shift, whole_head_terms,
                   row_modulation, softmax_mean_modulation)
from .signs import gumbel_noise
from .softcap import capped_statistics, capped_sweep
from .tiles import OnlineSoftmax, chunk_logits, spans, subtract_at_target, weight_chunk


def online_state(h, need_mu, need_m2):
    """Empty per-row ``(m, L, [A1 | A2])`` in the accumulation dtype for the rows of ``h`` (moments zeroed)."""
    acc = accumulation_dtype(h.dtype)
    n_moments = (1 + int(need_m2)) if need_mu else 0
    return (torch.empty(h.shape[0], dtype=acc, device=h.device), torch.empty(h.shape[0], dtype=acc, device=h.device),
            torch.zeros(h.shape[0], n_moments * h.shape[1], dtype=acc, device=h.device))


def partial_statistics(h, weight, bias, *, need_mu, need_m2, row_block, vocab_chunk):
    """Per-row online state over ``weight``'s rows (docs/math.md 6.1): running max ``m``,
    ``L = sum exp(z - m)`` and the unnormalized moments ``[A1 | A2]`` (empty unless ``need_mu``).

    States of disjoint vocabulary ranges merge by rescaling (6.2): the vocabulary-parallel path relies on it."""
    acc = accumulation_dtype(h.dtype)
    n_rows, dim = h.shape
    vocab = weight.shape[0]
    row_max, exp_sum, moments = online_state(h, need_mu, need_m2)
    for r0, r1 in spans(n_rows, row_block):
        h_block = h[r0:r1].to(acc)
        softmax = OnlineSoftmax(r1 - r0, acc, h.device)
        acc_moments = moments[r0:r1]
        for v0, v1 in spans(vocab, vocab_chunk):
            w, stacked, b = weight_chunk(weight, bias, v0, v1, acc, need_m2)
            exp_logits = chunk_logits(h_block, w, b)
            rescale = softmax.absorb(exp_logits)
            if need_mu:
                acc_moments.mul_(rescale[:, None]).addmm_(exp_logits, stacked)
        row_max[r0:r1] = softmax.max
        exp_sum[r0:r1] = softmax.sum
    return row_max, exp_sum, moments


def finish_statistics(row_max, exp_sum, moments, dim, *, need_mu, need_m2):
    """``(lse, mu, m2)`` from a (merged) online state: ``lse = m + log L``, moments divided by ``L``."""
    lse = logit_shift(row_max) + exp_sum.log()
    moments = moments / exp_sum[:, None]
    mu = moments[:, :dim] if need_mu else None
    m2 = moments[:, dim:] if need_m2 else None
    return lse, mu, m2


def forward_statistics(h, weight, bias, *, need_mu, need_m2, row_block, vocab_chunk):
    """Per-row ``lse``, and optionally ``mu = E_s[W]`` and ``m2 = E_s[W*W]``, in one streamed pass."""
    state = partial_statistics(h, weight, bias, need_mu=need_mu, need_m2=need_m2, row_block=row_block,
                               vocab_chunk=vocab_chunk)
    return finish_statistics(*state, h.shape[1], need_mu=need_mu, need_m2=need_m2)


def logit_gradient_sweep(h_block, weight, bias, lse, target, g_ce, T_stack, row_const, with_squares, vocab_chunk,
                         wants, grad_w=None, grad_b=None):
    """One row block's backward over every vocabulary chunk: ``(grad_input or None, grad_w, grad_b)``.

    Per chunk: ``G = s * (T_stack @ [W_c | W_c*W_c]^T + row_const) - g_ce [v = y]``, or ``G = s * row_const - g_ce
    [v = y]`` when ``T_stack`` is None; then ``grad_input = G W``, ``grad_w += G^T h + S^T T_stack[:, :d] (+ 2 W_c *
    S^T T_stack[:, d:])`` and ``grad_b += sum_rows G`` into the given buffers (zeroed ones when wanted and None).
    ``target=None`` skips the target correction (softmax_mean's backward has none), as does a target of -1.
    :func:`dropreg.cpp_passes.cpp_logit_gradient_sweep` is the same contract on the C++ kernels.
    """
    want_h, want_w, want_b = wants
    acc = lse.dtype
    dim = h_block.shape[1]
    grad_h_block = torch.zeros_like(h_block) if want_h else None
    if want_w and grad_w is None:
        grad_w = torch.zeros(weight.shape[0], dim, dtype=acc, device=h_block.device)
    if want_b and grad_b is None:
        grad_b = torch.zeros(weight.shape[0], dtype=acc, device=h_block.device)
    for v0, v1 in spans(weight.shape[0], vocab_chunk):
        w, stacked, b = weight_chunk(weight, bias, v0, v1, acc, with_squares)
        with record_function("dropreg::logit_gradient"):
            probs = chunk_logits(h_block, w, b).sub_(lse[:, None]).exp_()
            if T_stack is not None:
                g_logits = (T_stack @ stacked.T).add_(row_const[:, None]).mul_(probs)
            else:
                g_logits = probs * row_const[:, None]
            if target is not None:
                subtract_at_target(g_logits, target, v0, v1, g_ce)
        if want_h:
            with record_function("dropreg::grad_input"):
                grad_h_block.addmm_(g_logits, w)
        if want_w:
            with record_function("dropreg::grad_weight"):
                g_w = g_logits.T @ h_block
                if T_stack is not None:
                    st_T_stack = probs.T @ T_stack  # S^T [T | gR' q]
                    g_w += st_T_stack[:, :dim]
                    if with_squares:
                        g_w += 2 * w * st_T_stack[:, dim:]
                grad_w[v0:v1] += g_w
        if want_b:
            grad_b[v0:v1] += g_logits.sum(0)
    return grad_h_block, grad_w, grad_b


def terms_backward(h, weight, bias, target, signs, lse, mu, var, grad_ce, grad_quadratic, grad_sign_term,
                   need_explicit, need_implicit, row_block, vocab_chunk, wants, owns_target=None, grad_mu=None,
                   sweep=logit_gradient_sweep):
    """The backward of the three per-row terms over ``weight``'s rows, given the per-row globals lse, mu, var, and
    of mu itself when ``grad_mu`` (its upstream gradient, N x d) is given; each row block's vocabulary part is
    ``sweep`` (:func:`logit_gradient_sweep`'s contract).

    Returns ``(grad_h_vocab, grad_h_rows, grad_w, grad_b)`` in the accumulation dtype, ``grad_h = grad_h_vocab +
    grad_h_rows``: ``grad_h_vocab = W^T G - g_I sigma W[y]`` sums over vocabulary ranges, ``grad_h_rows =
    2 g_R h var + g_I sigma mu`` needs only the per-row globals. ``owns_target`` (bool per row, None: all) marks
    the rows whose target lies in ``weight``; ``target`` indexes ``weight`` on those rows only.
    """
    want_h, want_w, want_b = wants
    acc = lse.dtype
    n_rows, dim = h.shape
    grad_h = torch.empty(n_rows, dim, dtype=acc, device=h.device) if want_h else None
    grad_h_rows = torch.zeros(n_rows, dim, dtype=acc, device=h.device) if want_h else None
    grad_w = grad_b = None
    if owns_target is not None:
        sweep_target = torch.where(owns_target, target, torch.full_like(target, -1))  # -1: in no chunk
        target = torch.where(owns_target, target, torch.zeros_like(target))
    else:
        sweep_target = target
    for r0, r1 in spans(n_rows, row_block):
        h_block, y = h[r0:r1].to(acc), target[r0:r1]
        g_ce = grad_ce[r0:r1].to(acc)
        rows = row_modulation(h_block, g_ce, mu, var, signs, grad_quadratic, grad_sign_term, grad_mu, r0, r1,
                              need_explicit, need_implicit)
        grad_h_block, grad_w, grad_b = sweep(h_block, weight, bias, lse[r0:r1], sweep_target[r0:r1], g_ce,
                                             rows.T_stack, rows.row_const, need_explicit, vocab_chunk, wants, grad_w,
                                             grad_b)
        if need_implicit:
            g_i_owned = rows.g_i if owns_target is None else rows.g_i * owns_target[r0:r1, None]
        if want_h:
            grad_h_rows[r0:r1] = input_row_gradient(h_block, signs[r0:r1] if need_implicit else None,
                                                    mu[r0:r1] if need_implicit else None,
                                                    var[r0:r1] if need_explicit else None,
                                                    grad_quadratic[r0:r1].to(acc), grad_sign_term[r0:r1].to(acc),
                                                    need_explicit, need_implicit)
            if need_implicit:
                grad_h_block -= g_i_owned * signs[r0:r1] * weight[y].to(acc)
            grad_h[r0:r1] = grad_h_block
        if want_w and need_implicit:  # the implicit term's target scatter
            grad_w.index_add_(0, y, -g_i_owned * rows.u)
    return (grad_h, grad_h_rows, *_zeros_if_no_rows(wants, grad_w, grad_b, weight, acc))


def _zeros_if_no_rows(wants, grad_w, grad_b, weight, acc):
    """``(grad_w, grad_b)`` as the sweeps left them, zeros where wanted but no row block ran (N = 0)."""
    if wants[1] and grad_w is None:
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device)
    if wants[2] and grad_b is None:
        grad_b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device)
    return grad_w, grad_b


def ce_with_grads(h, weight, bias, target, row_weight, wants, block_rows, vocab_chunk, z_weight=None, softcap=None,
                  smoothing_weights=None, smoothing_row_weight=None):
    """CE only: ``sum_i row_weight_i ce_i`` (``+ z_weight_i lse_i^2`` when ``z_weight`` is given: the z-loss) and
    its gradients formed in the same pass (docs/math.md, "CE only").

    Per row block: ``z = h W^T (+ b)`` chunk by chunk into a block x V workspace (1 NVd), ``lse``, then in place
    ``G = (row_weight + 2 z_weight lse) s - row_weight e_y``, ``grad_input = G W`` (1 NVd) and ``grad_W += G^T h``
    (1 NVd): 3 NVd, no recompute. Returns ``(loss, grad_h, grad_w, grad_b)`` in the accumulation dtype, ``loss`` the
    pair ``[sum row_weight ce, sum z_weight lse^2]`` and the gradients those of its sum; unwanted gradients are
    None.

    ``softcap``: the logits are capped, ``z = softcap tanh(r / softcap)``, and the logit gradient is multiplied by
    ``dz/dr = 1 - (z / softcap)^2`` (docs/math.md 7.1). ``smoothing_weights`` ``omega`` (V) with
    ``smoothing_row_weight`` ``rs`` (N): ``loss[0]`` also subtracts ``sum_i rs_i S_i``, ``S_i = sum_v omega_v z_iv``
    (label smoothing's part of a capped head, docs/math.md 3.7), and ``G`` gets ``-rs omega`` before the cap's factor.
    """
    acc = accumulation_dtype(h.dtype)
    want_h, want_w, want_b = wants
    n_rows, dim = h.shape
    vocab = weight.shape[0]
    device = h.device
    omega = None if smoothing_weights is None else smoothing_weights.to(acc)
    loss = torch.zeros(2, dtype=acc, device=device)
    grad_h = torch.empty(n_rows, dim, dtype=acc, device=device) if want_h else None
    grad_w = torch.zeros(vocab, dim, dtype=acc, device=device) if want_w else None
    grad_b = torch.zeros(vocab, dtype=acc, device=device) if want_b else None
    logits = torch.empty(min(block_rows, n_rows), vocab, dtype=acc, device=device)
    for r0, r1 in spans(n_rows, block_rows):
        h_block, y, w_row = h[r0:r1].to(acc), target[r0:r1], row_weight[r0:r1].to(acc)
        z = logits[:r1 - r0]
        with record_function("dropreg::ce_logits"):
            for v0, v1 in spans(vocab, vocab_chunk):
                w, _, b = weight_chunk(weight, bias, v0, v1, acc, False)
                z[:, v0:v1] = capped_logits(chunk_logits(h_block, w, b), softcap)[0]
            target_logit = z.gather(1, y[:, None]).squeeze(1)
            if omega is not None:  # before the uncapped z turns into exp(z - shift)
                smoothing_row = smoothing_row_weight[r0:r1].to(acc)
                loss[0] -= torch.where(smoothing_row != 0, smoothing_row * (z @ omega), 0.0).sum()
            shift = logit_shift(z.amax(dim=1))
            if softcap is None:
                # lse in place (torch.logsumexp would allocate a second block x V buffer): z becomes exp(z - shift)
                lse = shift + z.sub_(shift[:, None]).exp_().sum(dim=1).log()
            else:  # the capped logits stay: the gradient needs them for the cap's derivative
                lse = shift + sum(torch.exp(z[:, v0:v1] - shift[:, None]).sum(dim=1)
                                  for v0, v1 in spans(vocab, vocab_chunk)).log()
            softmax_scale = add_ce_loss(loss, lse, lse - target_logit, w_row,
                                        None if z_weight is None else z_weight[r0:r1].to(acc))
        if not any(wants):
            continue
        with record_function("dropreg::ce_gradients"):
            if softcap is None:
                z.mul_((softmax_scale * torch.exp(shift - lse))[:, None])  # G = (w + 2 zw lse) s ...
                if omega is not None:
                    z.sub_(smoothing_row[:, None] * omega)
                z.scatter_add_(1, y[:, None], -w_row[:, None])     # ... - w * e_y
            else:  # G = ((w + 2 zw lse) s - rs omega - w e_y) (1 - (z / softcap)^2), chunk by chunk in place
                target_slope = capped_slope(target_logit, softcap)
                for v0, v1 in spans(vocab, vocab_chunk):
                    capped = z[:, v0:v1]
                    g = softmax_scale[:, None] * torch.exp(capped - lse[:, None])
                    if omega is not None:
                        g -= smoothing_row[:, None] * omega[v0:v1]
                    capped.copy_(g.mul_(capped_slope(capped, softcap)))
                z.scatter_add_(1, y[:, None], -(w_row * target_slope)[:, None])
            grad_h_block = torch.zeros_like(h_block) if want_h else None
            for v0, v1 in spans(vocab, vocab_chunk):
                g = z[:, v0:v1]
                if want_h:
                    w, _, _ = weight_chunk(weight, None, v0, v1, acc, False)
                    grad_h_block.addmm_(g, w)
                if want_w:
                    grad_w[v0:v1].addmm_(g.T, h_block)
                if want_b:
                    grad_b[v0:v1] += g.sum(0)
            if want_h:
                grad_h[r0:r1] = grad_h_block
    return loss, grad_h, grad_w, grad_b


def add_ce_loss(loss, lse, ce, w_row, z_row):
    """Adds a row block's ``sum w ce`` (and ``sum zw lse^2``) to the CE-only path's ``loss`` pair; returns the factor
    of the softmax in ``G = (w + 2 zw lse) s - w e_y``. Rows of weight 0 add exactly 0 (their ce may be NaN)."""
    loss[0] += torch.where(w_row != 0, w_row * ce, torch.zeros_like(ce)).sum()
    if z_row is None:
        return w_row
    loss[1] += torch.where(z_row != 0, z_row * lse * lse, torch.zeros_like(lse)).sum()
    return w_row + 2 * z_row * lse


def rdrop_partial_statistics(h1, h2, weight, bias, row_block, vocab_chunk, softcap=None):
    """Per pass i and row, over ``weight``'s rows: running max ``m_i``, ``L_i = sum exp(z_i - m_i)`` and
    ``B_i = sum exp(z_i - m_i) D`` with ``D = z1 - z2``; each ``(2, N)``. Ranges merge by rescaling
    (docs/math.md 9.2). ``softcap``: of the capped logits."""
    acc = accumulation_dtype(h1.dtype)
    n_rows, vocab = h1.shape[0], weight.shape[0]
    row_max = torch.empty(2, n_rows, dtype=acc, device=h1.device)
    exp_sum = torch.empty(2, n_rows, dtype=acc, device=h1.device)
    weighted_d = torch.empty(2, n_rows, dtype=acc, device=h1.device)
    for r0, r1 in spans(n_rows, row_block):
        blocks = (h1[r0:r1].to(acc), h2[r0:r1].to(acc))
        softmaxes = [OnlineSoftmax(r1 - r0, acc, h1.device) for _ in blocks]
        partial_d = [torch.zeros(r1 - r0, dtype=acc, device=h1.device) for _ in blocks]
        for v0, v1 in spans(vocab, vocab_chunk):
            w, _, b = weight_chunk(weight, bias, v0, v1, acc, False)
            logits = [capped_logits(chunk_logits(h, w, b), softcap)[0] for h in blocks]
            diff = logits[0] - logits[1]
            for i in range(2):
                rescale = softmaxes[i].absorb(logits[i])
                partial_d[i] = partial_d[i] * rescale + (logits[i] * diff).sum(1)
        for i in range(2):
            row_max[i, r0:r1] = softmaxes[i].max
            exp_sum[i, r0:r1] = softmaxes[i].sum
            weighted_d[i, r0:r1] = partial_d[i]
    return row_max, exp_sum, weighted_d


def rdrop_backward(h1, h2, weight, bias, target, lse, expected_d, grad_ce1, grad_ce2, grad_kl, row_block, vocab_chunk,
                   wants, softcap=None):
    """R-Drop's backward over ``weight``'s rows given the per-row globals lse and E_p[D] (each ``(2, N)``), of the
    capped logits with ``softcap``.

    Returns ``(grad_h (2, N, d), grad_w, grad_b)`` in the accumulation dtype; ``grad_h`` is ``W^T G`` for these rows of
    W only. A target outside ``[0, weight.shape[0])`` (e.g. -1) gets no target correction here."""
    want_h1, want_h2, want_w, want_b = wants
    acc = lse.dtype
    n_rows, dim = h1.shape
    vocab = weight.shape[0]
    grad_h = torch.zeros(2, n_rows, dim, dtype=acc, device=h1.device)
    grad_w = torch.zeros(vocab, dim, dtype=acc, device=h1.device) if want_w else None
    grad_b = torch.zeros(vocab, dtype=acc, device=h1.device) if want_b else None
    for r0, r1 in spans(n_rows, row_block):
        y = target[r0:r1]
        blocks = (h1[r0:r1].to(acc), h2[r0:r1].to(acc))
        g_ce = (grad_ce1[r0:r1].to(acc), grad_ce2[r0:r1].to(acc))
        half_kl = 0.5 * grad_kl[r0:r1].to(acc)[:, None]
        for v0, v1 in spans(vocab, vocab_chunk):
            w, _, b = weight_chunk(weight, bias, v0, v1, acc, False)
            with record_function("dropreg::rdrop_logit_gradient"):
                (z1, c1), (z2, c2) = (capped_logits(chunk_logits(h, w, b), softcap) for h in blocks)
                diff = z1 - z2
                p1 = z1.sub_(lse[0, r0:r1, None]).exp_()
                p2 = z2.sub_(lse[1, r0:r1, None]).exp_()
                # d symKL/dz1 = p1 (D - E_p1 D) + p1 - p2;  d symKL/dz2 = -p2 (D - E_p2 D) - (p1 - p2)
                g1 = p1 * (g_ce[0][:, None] + half_kl * (diff - expected_d[0, r0:r1, None] + 1)) - half_kl * p2
                g2 = p2 * (g_ce[1][:, None] - half_kl * (diff - expected_d[1, r0:r1, None] - 1)) - half_kl * p1
                subtract_at_target(g1, y, v0, v1, g_ce[0])
                subtract_at_target(g2, y, v0, v1, g_ce[1])
                if softcap is not None:  # from the capped logits to the raw ones
                    g1.mul_(c1)
                    g2.mul_(c2)
            with record_function("dropreg::grad_input"):
                if want_h1:
                    grad_h[0, r0:r1].addmm_(g1, w)
                if want_h2:
                    grad_h[1, r0:r1].addmm_(g2, w)
            if want_w:
                with record_function("dropreg::grad_weight"):
                    grad_w[v0:v1].addmm_(g1.T, blocks[0]).addmm_(g2.T, blocks[1])
            if want_b:
                grad_b[v0:v1] += g1.sum(0) + g2.sum(0)
    return grad_h, grad_w, grad_b


def softmax_mean_backward(h, weight, bias, lse, mu, grad_mu, row_block, vocab_chunk, wants,
                          sweep=logit_gradient_sweep):
    """softmax_mean's backward over ``weight``'s rows given the per-row globals lse and mu: ``(grad_h, grad_w, grad_b)``
    in the accumulation dtype, ``grad_h = W^T G`` for these rows of W only (the sweep with ``T = gbar``,
    ``row_const = -mu . gbar`` and no target, docs/math.md 11.2)."""
    acc = lse.dtype
    n_rows, dim = h.shape
    grad_h = torch.empty(n_rows, dim, dtype=acc, device=h.device) if wants[0] else None
    grad_w = grad_b = None
    for r0, r1 in spans(n_rows, row_block):
        rows = softmax_mean_modulation(grad_mu[r0:r1].to(acc), mu[r0:r1])
        grad_h_block, grad_w, grad_b = sweep(h[r0:r1].to(acc), weight, bias, lse[r0:r1], None, None, rows.T_stack,
                                             rows.row_const, False, vocab_chunk, wants, grad_w, grad_b)
        if wants[0]:
            grad_h[r0:r1] = grad_h_block
    return (grad_h, *_zeros_if_no_rows(wants, grad_w, grad_b, weight, acc))


@eager_under_compile
@torch.no_grad()
def streamed_sample_targets(input, weight, bias, samples, seed, *, row_block=None, vocab_chunk=None):
    """(samples, N) classes drawn from each row's softmax by Gumbel-max over vocabulary chunks (dropreg.signs)."""
    return gumbel_max(input, weight, bias, samples, seed, row_block=row_block, vocab_chunk=vocab_chunk)[1]


@torch.no_grad()
def gumbel_max(input, weight, bias, samples, seed, *, class_offset=0, row_block=None, vocab_chunk=None):
    """Per draw and row, the best Gumbel score over ``weight``'s rows and its class: ``(best (samples, N) float64,
    drawn (samples, N) int64)``. Row v of ``weight`` is class ``class_offset + v``, which keys its noise."""
    default_rows, default_chunk = default_blocks(input.shape[0], weight.shape[0])
    row_block, vocab_chunk = row_block or default_rows, vocab_chunk or default_chunk
    acc = accumulation_dtype(input.dtype)
    n_rows = input.shape[0]
    drawn = torch.zeros(samples, n_rows, dtype=torch.int64, device=input.device)
    best = torch.full((samples, n_rows), float("-inf"), dtype=torch.float64, device=input.device)
    for r0, r1 in spans(n_rows, row_block):
        h_block = input[r0:r1].to(acc)
        rows = torch.arange(r0, r1, device=input.device)
        for v0, v1 in spans(weight.shape[0], vocab_chunk):
            w, _, b = weight_chunk(weight, bias, v0, v1, acc, False)
            logits = chunk_logits(h_block, w, b).to(torch.float64)
            for k in range(samples):
                noise = gumbel_noise(seed, k, rows, class_offset + v0, class_offset + v1)
                top, where = (logits + noise).max(dim=1)
                better = top > best[k, r0:r1]  # strict: the lowest class wins a tie, as one argmax would
                best[k, r0:r1] = torch.where(better, top, best[k, r0:r1])
                drawn[k, r0:r1] = torch.where(better, where + v0 + class_offset, drawn[k, r0:r1])
    return best, drawn


class StreamedPasses:
    """The ``"torch"`` backend's passes (the contract of dropreg/ops.py), with its block plan: chunked PyTorch on any
    device. ``row_block`` rows and ``vocab_chunk`` classes at a time (the plan's, else :func:`default_blocks`)."""

    name = "torch"

    def __init__(self, plan: BlockPlan = DEFAULT_PLAN):
        self.plan = plan

    def with_plan(self, plan: BlockPlan) -> "StreamedPasses":
        return type(self)(plan)

    @staticmethod
    def operands(input, weight, bias):
        return input, weight, bias

    def blocks(self, n_rows: int, vocab: int) -> tuple[int, int]:
        return self.plan.blocks(default_blocks(n_rows, vocab))

    def ce_blocks(self, n_rows: int, vocab: int, dtype, device) -> tuple[int, int]:
        return self.plan.ce_blocks(ce_only_blocks(n_rows, vocab, dtype, device))

    def statistics(self, h, weight, bias, *, need_mu, need_m2) -> SliceStatistics:
        lse, mu, m2 = forward_statistics(h, weight, bias, need_mu=need_mu, need_m2=need_m2,
                                         **self._blocks_of(h, weight))
        return SliceStatistics(lse, mu, m2=m2)

    def whole_head(self, h, weight, bias, target, signs, need_explicit, need_implicit):
        """A head held whole: per-row ``(ce, quadratic, sign_term)`` and its :class:`SliceStatistics` with ``var``
        (what the backward takes)."""
        stats = self.statistics(h, weight, bias, need_mu=need_explicit or need_implicit, need_m2=need_explicit)
        var = stats.var if stats.var is not None or stats.m2 is None else stats.m2 - stats.mu * stats.mu
        stats = stats._replace(m2=None, var=var)
        return whole_head_terms(h, weight, bias, target, signs, stats.lse, stats.mu, var, need_explicit,
                                need_implicit), stats

    def terms_sweep(self, h, weight, bias, target, owned, signs, lse, mu, var, grad_ce, grad_quadratic,
                    grad_sign_term, grad_mu, need_explicit, need_implicit, wants, extra):
        row_block, vocab_chunk = self.blocks(h.shape[0], weight.shape[0])
        return terms_backward(h, weight, bias, target, signs, lse, mu, var, grad_ce, grad_quadratic, grad_sign_term,
                              need_explicit, need_implicit, row_block, vocab_chunk, wants, owns_target=owned,
                              grad_mu=grad_mu)

    def softmax_mean_sweep(self, h, weight, bias, lse, mu, grad_mu, wants, extra):
        return softmax_mean_backward(h, weight, bias, lse, mu, grad_mu, *self.blocks(h.shape[0], weight.shape[0]),
                                     wants)

    def rdrop_statistics(self, h1, h2, weight, bias, softcap):
        row_max, exp_sum, weighted_d = rdrop_partial_statistics(h1, h2, weight, bias,
                                                                *self.blocks(h1.shape[0], weight.shape[0]), softcap)
        return logit_shift(row_max) + exp_sum.log(), weighted_d / exp_sum

    def rdrop_sweep(self, h1, h2, weight, bias, target, owned, lse, expected_d, grad_ce1, grad_ce2, grad_kl, wants,
                    softcap):
        if owned is not None:
            target = torch.where(owned, target, torch.full_like(target, -1))  # -1: no target correction here
        return rdrop_backward(h1, h2, weight, bias, target, lse, expected_d, grad_ce1, grad_ce2, grad_kl,
                              *self.blocks(h1.shape[0], weight.shape[0]), wants, softcap)

    def capped_statistics(self, h, weight, bias, softcap, need_m1, need_m2, omega=None):
        return capped_statistics(h, weight, bias, softcap, need_m1, need_m2, omega,
                                 *self.blocks(h.shape[0], weight.shape[0]))

    def capped_sweep(self, h, weight, bias, softcap, lse, target, amount, row_const, T_vec, Q, wants, omega=None,
                     grad_sum=None):
        return capped_sweep(h, weight, bias, softcap, lse, target, amount, row_const, T_vec, Q, wants, omega,
                            grad_sum, *self.blocks(h.shape[0], weight.shape[0]))

    def ce_gradients(self, h, weight, bias, target, row_weight, wants, z_weight=None, softcap=None,
                     smoothing_weights=None, smoothing_row_weight=None):
        """Cross entropy alone with its gradients formed in the forward: :func:`ce_with_grads`."""
        return ce_with_grads(h, weight, bias, target, row_weight, wants,
                             *self.ce_blocks(h.shape[0], weight.shape[0], h.dtype, h.device), z_weight, softcap,
                             smoothing_weights, smoothing_row_weight)

    def sample_targets(self, input, weight, bias, samples, seed):
        return streamed_sample_targets(input, weight, bias, samples, seed,
                                       **self._blocks_of(input, weight))

    def _blocks_of(self, h, weight) -> dict:
        row_block, vocab_chunk = self.blocks(h.shape[0], weight.shape[0])
        return {"row_block": row_block, "vocab_chunk": vocab_chunk}
