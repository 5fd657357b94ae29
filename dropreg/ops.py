"""The fused ops, one autograd Function per op family, each written once over two parts:

* **passes** (a backend's :class:`dropreg.streamed.StreamedPasses`, :class:`dropreg.chunked.ChunkedPasses` or
  :class:`dropreg.cpp_passes.CppPasses`): the statistics pass and the gradient sweep over one slice of the
  vocabulary, carrying the backend's block plan;
* a **reducer** (:mod:`dropreg.reducers`): the identity for a head held whole, all-reduces over a process group for
  a head sliced over the vocabulary. A single process is a head with one slice.

The per-row algebra between them is :mod:`dropreg.rows`. Every op returns per-row terms without coefficients
(docs/math.md 6); the caller applies coefficients, masks ignored rows and reduces.
"""
from __future__ import annotations

import torch
from torch.profiler import record_function

from . import rows
from ._op_family import combined_upstream, first_order_only, gradients_wanted
from ._policy import accumulation_dtype, eager_under_compile
from .reducers import LOCAL



def _in_dtype(grad, like):
    return None if grad is None else grad.to(like.dtype)


class Terms(torch.autograd.Function):
    """Per-row ``(ce, quadratic, sign_term, mu, S)`` of a head, uncapped or softcapped (``softcap`` None or a float).
    Forward: the statistics pass and the target's pieces, merged over the slices (the target's from the slice that
    owns it, docs/math.md 12.6); backward: the gradient sweep, its grad_input summed over the slices.

    Uncapped, mu (None when neither term is on) is ``E_s[W]`` and the statistics are lse, mu, var (6.1). Capped
    (3.6), mu is ``M1`` and the statistics lse, M1, M2; ``S = sum_v omega_v z_v`` is label smoothing's part (3.7),
    summed over the slices (``omega``: this slice's weights; zeros without them, and always zeros uncapped)."""

    @staticmethod
    def forward(ctx, h, weight, bias, target, signs, omega, softcap, need_explicit, need_implicit, passes, reducer):
        ctx.options = (softcap, need_explicit, need_implicit, passes, reducer)
        ctx.set_materialize_grads(False)  # an output without a gradient (mu, S, often) arrives as None, not zeros
        if softcap is None:
            outputs, saved = uncapped_forward(h, weight, bias, target, signs, need_explicit, need_implicit, passes,
                                              reducer)
            ctx.save_for_backward(h, weight, bias, signs, *saved)
            return (*outputs, torch.zeros_like(outputs[0]))
        return _capped_forward(ctx, h, weight, bias, target, signs, omega, softcap, need_explicit, need_implicit,
                               passes, reducer)

    @staticmethod
    @first_order_only
    def backward(ctx, grad_ce, grad_quadratic, grad_sign_term, grad_mu, grad_smoothing_sum):
        if ctx.options[0] is None:
            h, weight, bias, signs, *saved = ctx.saved_tensors
            _, need_explicit, need_implicit, passes, reducer = ctx.options
            grads = uncapped_backward(h, weight, bias, signs, saved, (grad_ce, grad_quadratic, grad_sign_term),
                                      grad_mu, need_explicit, need_implicit, ctx.needs_input_grad[:3], passes, reducer)
        else:
            grads = _capped_backward(ctx, grad_ce, grad_quadratic, grad_sign_term, grad_mu, grad_smoothing_sum)
        return (*grads, None, None, None, None, None, None, None, None)


def uncapped_forward(h, weight, bias, target, signs, need_explicit, need_implicit, passes, reducer):
    """The uncapped head's forward (docs/math.md 6.1): ``((ce, quadratic, sign_term, mu), saved)``, ``saved`` what
    :func:`uncapped_backward` takes: ``(safe, owned, lse, mu, var, *extra)``. Also the body of the ``"cpu"``
    backend's registered op (dropreg/cpu_ops.py)."""
    acc = accumulation_dtype(h.dtype)
    safe, owned = reducer.localize(target)
    if owned is None:  # the head held whole: the passes finish each row's terms with its statistics
        with record_function("dropreg::forward_stats"):
            (ce, quadratic, sign_term), stats = passes.whole_head(h, weight, bias, safe, signs, need_explicit,
                                                                  need_implicit)
        return (ce, quadratic, sign_term, stats.mu), (safe, owned, stats.lse, stats.mu, stats.var, *stats.extra)
    with record_function("dropreg::forward_stats"):
        stats = passes.statistics(h, weight, bias, need_mu=need_explicit or need_implicit, need_m2=need_explicit)
    hc = h.to(acc)
    target_rows = weight[safe].to(acc)
    picked = [rows.target_logit(hc, weight, bias, safe, acc)]
    if need_implicit:  # u . W_y from the owning slice
        picked.append((signs * hc * target_rows).sum(1))
    lse, mu, var, picked = reducer.merge_moments(stats, rows.owned_only(owned, picked))
    ce, quadratic, sign_term = rows.terms(hc, signs, lse, mu, var, picked[0], picked[-1], need_explicit,
                                          need_implicit)
    return (ce, quadratic, sign_term, mu), (safe, owned, lse, mu, var, *stats.extra)


def uncapped_backward(h, weight, bias, signs, saved, upstream, grad_mu, need_explicit, need_implicit, wants, passes,
                      reducer):
    """``(grad_h, grad_w, grad_b)`` (None where not in ``wants``) of the uncapped head's per-row terms given their
    upstream gradients ``(grad_ce, grad_quadratic, grad_sign_term)`` (None: zero) and mu's (``grad_mu``)."""
    safe, owned, lse, mu, var, *extra = saved
    zero = torch.zeros_like(lse)
    upstream = [zero if g is None else g for g in upstream]
    grad_h_vocab, grad_h_rows, grad_w, grad_b = passes.terms_sweep(
        h, weight, bias, safe, owned, signs, lse, mu, var, *upstream, grad_mu, need_explicit, need_implicit, wants,
        tuple(extra))
    grad_h = None
    if grad_h_vocab is not None:
        grad_h = reducer.sum_partial(grad_h_vocab)
        grad_h = (grad_h if grad_h_rows is None else grad_h + grad_h_rows).to(h.dtype)
    return grad_h, _in_dtype(grad_w, weight), _in_dtype(grad_b, bias)


def _capped_forward(ctx, h, weight, bias, target, signs, omega, softcap, need_explicit, need_implicit, passes,
                    reducer):
    acc = accumulation_dtype(h.dtype)
    with record_function("dropreg::softcap_forward_stats"):
        lse, m1, m2, smoothing_sum = passes.capped_statistics(h, weight, bias, softcap, need_explicit or need_implicit,
                                                              need_explicit, omega)
    safe, owned = reducer.localize(target)
    hc = h.to(acc)
    picked = [rows.target_logit(hc, weight, bias, safe, acc)]
    picked += [p for p in rows.target_products(hc, weight[safe].to(acc), signs, need_explicit, need_implicit)
               if p is not None]
    picked = rows.owned_only(owned, picked)
    lse, moments, picked = reducer.merge(lse, [m for m in (m1, m2) if m is not None],
                                         picked + ([] if smoothing_sum is None else [smoothing_sum]))
    smoothing_sum = torch.zeros_like(lse) if smoothing_sum is None else picked.pop()
    m1, m2 = (moments + [None, None])[:2]
    y = rows.TargetValues(picked[0], picked[1] if need_explicit else None, picked[-1] if need_implicit else None,
                          softcap)
    ctx.save_for_backward(h, weight, bias, safe, owned, signs, omega, lse, m1, m2)
    ctx.target_values = y
    return (*rows.capped_terms(hc, signs, lse, m1, m2, y, need_explicit, need_implicit), m1, smoothing_sum)


def _capped_backward(ctx, grad_ce, grad_quadratic, grad_sign_term, grad_m1, grad_smoothing_sum):
    h, weight, bias, safe, owned, signs, omega, lse, m1, m2 = ctx.saved_tensors
    softcap, need_explicit, need_implicit, passes, reducer = ctx.options
    y = ctx.target_values
    acc = lse.dtype
    hc = h.to(acc)
    upstream = [torch.zeros_like(lse) if g is None else g.to(acc) for g in (grad_ce, grad_quadratic, grad_sign_term)]
    row_const, amount, T_vec, Q, direct_h = rows.capped_backward_rows(hc, signs, m1, m2, y, upstream, grad_m1,
                                                                      need_explicit, need_implicit)
    # Only the owning slice subtracts at the target (safe is its class 0 elsewhere, with amount 0).
    (amount,) = rows.owned_only(owned, [amount])
    grad_h, grad_w, grad_b = passes.capped_sweep(h, weight, bias, softcap, lse, safe, amount, row_const, T_vec, Q,
                                                 ctx.needs_input_grad[:3], omega,
                                                 rows.smoothing_upstream(omega, grad_smoothing_sum, lse))
    # The target row's own terms, on the rows whose target this slice owns.
    to_h, to_w = rows.capped_target_row_gradients(hc, signs, weight[safe].to(acc), y, upstream, need_explicit,
                                                  need_implicit)
    if owned is not None:
        to_h, to_w = (g * owned.to(acc)[:, None] for g in (to_h, to_w))
    if grad_h is not None:
        grad_h = (reducer.sum_partial(grad_h + to_h) + direct_h).to(h.dtype)
    if grad_w is not None:
        grad_w = grad_w.index_add(0, safe, to_w).to(weight.dtype)
    return grad_h, grad_w, _in_dtype(grad_b, bias)


class RDrop(torch.autograd.Function):
    """R-Drop's per-row ``(ce1, ce2, kl)`` with kl = (KL(p1||p2) + KL(p2||p1)) / 2 (docs/math.md 9): symKL =
    E_p1[D] - E_p2[D] with D = z1 - z2, two online softmaxes and one scalar accumulator each; with a softcap every
    logit is capped first (9.4). Per pass i, ``lse_i`` and ``E_pi[D]`` merge over the slices like any other row."""

    @staticmethod
    def forward(ctx, h1, h2, weight, bias, target, softcap, passes, reducer):
        outputs, saved = rdrop_forward(h1, h2, weight, bias, target, softcap, passes, reducer)
        ctx.save_for_backward(h1, h2, weight, bias, *saved)
        ctx.options = (softcap, passes, reducer)
        return outputs

    @staticmethod
    @first_order_only
    def backward(ctx, grad_ce1, grad_ce2, grad_kl):
        h1, h2, weight, bias, *saved = ctx.saved_tensors
        grads = rdrop_backward(h1, h2, weight, bias, saved, (grad_ce1, grad_ce2, grad_kl), ctx.needs_input_grad[:4],
                               *ctx.options)
        return (*grads, None, None, None, None)


def rdrop_forward(h1, h2, weight, bias, target, softcap, passes, reducer):
    """``((ce1, ce2, kl), saved)``, ``saved = (safe, owned, lse, expected_d)`` for :func:`rdrop_backward`."""
    acc = accumulation_dtype(h1.dtype)
    with record_function("dropreg::rdrop_forward_stats"):
        lse, expected_d = passes.rdrop_statistics(h1, h2, weight, bias, softcap)
    safe, owned = reducer.localize(target)
    picked = [torch.stack([rows.capped_logits(rows.target_logit(h.to(acc), weight, bias, safe, acc), softcap)[0]
                           for h in (h1, h2)])]
    lse, (expected_d,), (z_target,) = reducer.merge(lse, [expected_d.unsqueeze(-1)], rows.owned_only(owned, picked))
    expected_d = expected_d[..., 0].contiguous()
    lse = lse.contiguous()
    outputs = (lse[0] - z_target[0], lse[1] - z_target[1], 0.5 * (expected_d[0] - expected_d[1]))
    return outputs, (safe, owned, lse, expected_d)


def rdrop_backward(h1, h2, weight, bias, saved, upstream, wants, softcap, passes, reducer):
    """``(grad_h1, grad_h2, grad_w, grad_b)`` (None where not in ``wants``) given the upstream gradients of
    ``(ce1, ce2, kl)`` (None: zero)."""
    safe, owned, lse, expected_d = saved
    want_h1, want_h2 = wants[:2]
    zero = torch.zeros_like(lse[0])
    upstream = [zero if g is None else g for g in upstream]
    grad_h, grad_w, grad_b = passes.rdrop_sweep(h1, h2, weight, bias, safe, owned, lse, expected_d, *upstream, wants,
                                                softcap)
    if want_h1 or want_h2:
        grad_h = reducer.sum_partial(grad_h)
    return (grad_h[0].to(h1.dtype) if want_h1 else None, grad_h[1].to(h2.dtype) if want_h2 else None,
            _in_dtype(grad_w, weight), _in_dtype(grad_b, bias))


class SoftmaxMean(torch.autograd.Function):
    """``mu = W^T softmax(h W^T + b)`` per row, differentiable (docs/math.md 11.2): forward 2 NVd; backward 5 NVd,
    with ``gbar = dL/dmu``, ``G_v = s_v (W_v . gbar - mu . gbar)``, ``grad_input = G W``, ``grad_W = G^T h +
    S^T gbar``, ``grad_b = sum G``."""

    @staticmethod
    def forward(ctx, h, weight, bias, passes, reducer):
        mu, saved = softmax_mean_forward(h, weight, bias, passes, reducer)
        ctx.save_for_backward(h, weight, bias, *saved)
        ctx.options = (passes, reducer)
        return mu

    @staticmethod
    @first_order_only
    def backward(ctx, grad_mu):
        h, weight, bias, *saved = ctx.saved_tensors
        return (*softmax_mean_backward(h, weight, bias, saved, grad_mu, ctx.needs_input_grad[:3], *ctx.options),
                None, None)


def softmax_mean_forward(h, weight, bias, passes, reducer):
    """``(mu, saved)``, ``saved = (lse, mu, *extra)`` for :func:`softmax_mean_backward`."""
    with record_function("dropreg::softmax_mean_forward"):
        stats = passes.statistics(h, weight, bias, need_mu=True, need_m2=False)
    lse, mu, _, _ = reducer.merge_moments(stats, [])
    mu = mu.contiguous()
    return mu, (lse, mu, *stats.extra)


def softmax_mean_backward(h, weight, bias, saved, grad_mu, wants, passes, reducer):
    """``(grad_h, grad_w, grad_b)`` (None where not in ``wants``) given mu's upstream gradient."""
    lse, mu, *extra = saved
    grad_h, grad_w, grad_b = passes.softmax_mean_sweep(h, weight, bias, lse, mu, grad_mu, wants, tuple(extra))
    if grad_h is not None:
        grad_h = reducer.sum_partial(grad_h).to(h.dtype)
    return grad_h, _in_dtype(grad_w, weight), _in_dtype(grad_b, bias)


class CrossEntropyWithGrads(torch.autograd.Function):
    """Cross entropy alone (z-loss included) under a "mean"/"sum" reduction, its gradients formed in the forward
    by the passes' CE-only driver (3 NVd instead of 4, docs/math.md 7.1) and saved: the backward only scales them.
    Returns ``[sum_i row_weight_i ce_i, sum_i z_weight_i lse_i^2]``, differentiable as a sum."""

    @staticmethod
    def forward(ctx, h, weight, bias, target, row_weight, z_weight, wants, passes, softcap, smoothing_weights,
                smoothing_row_weight):
        loss, *grads = passes.ce_gradients(h, weight, bias, target, row_weight, wants, z_weight, softcap,
                                           smoothing_weights, smoothing_row_weight)
        # Kept in the parameters' dtypes: until the backward they live beside the activations. The inputs are
        # saved only to link first_order_only's guard to them.
        ctx.save_for_backward(h, weight, bias, *(_in_dtype(g, like) for g, like in zip(grads, (h, weight, bias))))
        ctx.has_z = z_weight is not None
        return loss

    @staticmethod
    @first_order_only
    def backward(ctx, grad_loss):
        scale = combined_upstream(grad_loss, ctx.has_z)
        return (*(None if g is None else g * scale.to(g.dtype) for g in ctx.saved_tensors[3:]),
                None, None, None, None, None, None, None, None)


# ------------------------------------------------------------------------------ entry points (the backend contract)
# Under torch.compile the entry points run eagerly (a graph break): Inductor did not finish compiling the chunk loops
# in minutes even at N=15, V=40, and the loops' GEMMs gain nothing from it.

@eager_under_compile
def linear_ce(passes, input, weight, bias, target, signs, seed, need_explicit, need_implicit, reducer=LOCAL):
    """Per-row ``(ce, quadratic, sign_term, mu)``, as :func:`dropreg.reference.reference_terms`; ``target`` holds the
    head's classes (global ones on a sliced head)."""
    input, weight, bias = passes.operands(input, weight, bias)
    signs = rows.implicit_signs(input, signs, seed, need_implicit)
    return Terms.apply(input, weight, bias, target, signs, None, None, need_explicit, need_implicit, passes,
                       reducer)[:4]


@eager_under_compile
def linear_ce_softcap(passes, input, weight, bias, target, signs, seed, need_explicit, need_implicit, softcap,
                      smoothing_weights=None, reducer=LOCAL):
    """Per-row ``(ce, quadratic, sign_term, M1, S)`` of a softcapped head, as
    :func:`dropreg.reference.reference_softcap_terms` (``S`` None without ``smoothing_weights``)."""
    input, weight, bias = passes.operands(input, weight, bias)
    signs = rows.implicit_signs(input, signs, seed, need_implicit)
    omega = None if smoothing_weights is None else smoothing_weights.detach().contiguous()
    *terms, smoothing_sum = Terms.apply(input, weight, bias, target.contiguous(), signs, omega, float(softcap),
                                        need_explicit, need_implicit, passes, reducer)
    return (*terms, None if omega is None else smoothing_sum)


@eager_under_compile
def rdrop(passes, input1, input2, weight, bias, target, softcap=None, reducer=LOCAL):
    """Per-row ``(ce1, ce2, kl)``, as :func:`dropreg.reference.reference_rdrop`."""
    input1, weight, bias = passes.operands(input1, weight, bias)
    input2 = passes.operands(input2, weight, bias)[0]
    return RDrop.apply(input1, input2, weight, bias, target, None if softcap is None else float(softcap), passes,
                       reducer)


@eager_under_compile
def softmax_mean(passes, input, weight, bias, reducer=LOCAL):
    """Per-row ``mu`` (N, d) in the accumulation dtype, as :func:`dropreg.reference.reference_softmax_mean`."""
    input, weight, bias = passes.operands(input, weight, bias)
    return SoftmaxMean.apply(input, weight, bias, passes, reducer)


@eager_under_compile
def ce_with_grads(passes, input, weight, bias, target, row_weight, z_weight=None, softcap=None,
                  smoothing_weights=None, smoothing_row_weight=None):
    """``[sum_i row_weight_i ce_i, sum_i z_weight_i lse_i^2]`` (accumulation dtype), differentiable; with
    ``smoothing_weights`` (a capped head's omega) the first also subtracts ``sum_i smoothing_row_weight_i S_i``
    (see dropreg/_dispatch.py)."""
    return CrossEntropyWithGrads.apply(input, weight, bias, target, row_weight, z_weight,
                                       gradients_wanted(input, weight, bias), passes, softcap, smoothing_weights,
                                       smoothing_row_weight)
