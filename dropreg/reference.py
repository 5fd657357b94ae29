"""The ``"reference"`` backend: materialized logits, written straight from docs/math.md.

This is the readable definition of the three per-row terms. It allocates several N x V tensors, so it
is meant for small problems and for checking the other backends; autograd provides its gradients.
"""
from __future__ import annotations

import torch

from ._policy import accumulation_dtype
from .signs import gumbel_noise, philox_signs
from .softcap import softcap_derivatives


def reference_terms(input, weight, bias, target, signs, seed, need_explicit, need_implicit, softcap=None):
    """Per-row ``(ce, quadratic, sign_term, mu)`` with no coefficients applied.

    ``quadratic = sum_j h_j^2 var_j`` and ``sign_term = sum_j sigma_j h_j (mu_j - W[y]_j)``.
    Terms that are not needed come back as zeros; ``mu = W^T s`` is None unless a term needs it.
    ``softcap``: the capped head of docs/math.md 3.6 (:func:`reference_softcap_terms`).
    """
    if softcap is not None:
        return reference_softcap_terms(input, weight, bias, target, signs, seed, need_explicit, need_implicit,
                                       softcap)[:4]
    acc = accumulation_dtype(input.dtype)
    h, w = input.to(acc), weight.to(acc)
    logits = h @ w.T
    if bias is not None:
        logits = logits + bias.to(acc)
    lse = torch.logsumexp(logits, dim=-1)
    ce = lse - logits.gather(1, target[:, None]).squeeze(1)
    zeros = torch.zeros_like(ce)
    if not (need_explicit or need_implicit):
        return ce, zeros, zeros, None
    probs = torch.softmax(logits, dim=-1)
    mu = probs @ w
    quadratic = zeros
    if need_explicit:
        var = probs @ (w * w) - mu * mu
        quadratic = (h * h * var).sum(-1)
    sign_term = zeros
    if need_implicit:
        if signs is None:
            signs = philox_signs(seed, h.shape[0], h.shape[1], device=h.device, dtype=acc)
        sign_term = (signs.to(acc) * h * (mu - w[target])).sum(-1)
    return ce, quadratic, sign_term, mu


def reference_softcap_terms(input, weight, bias, target, signs, seed, need_explicit, need_implicit, softcap,
                            smoothing_weights=None):
    """:func:`reference_terms` for a softcapped head (docs/math.md 3.6), materialized: ``mu`` is then
    ``M1 = W^T (s c)``, ``quadratic = sum_j q_j (M2_j - M1_j^2 - z2_y W_yj^2)`` with ``M2 = (W*W)^T (s (c^2 + z2))``,
    and ``sign_term = sum_j u_j (M1_j - c_y W_yj)``; fifth, label smoothing's ``S = z @ smoothing_weights``
    (docs/math.md 3.7; None without them)."""
    acc = accumulation_dtype(input.dtype)
    h, w = input.to(acc), weight.to(acc)
    raw = h @ w.T
    if bias is not None:
        raw = raw + bias.to(acc)
    logits, c, z2, _ = softcap_derivatives(raw, softcap)
    at_target = target[:, None]
    ce = torch.logsumexp(logits, dim=-1) - logits.gather(1, at_target).squeeze(1)
    smoothing_sum = None if smoothing_weights is None else logits @ smoothing_weights.detach().to(acc)
    zeros = torch.zeros_like(ce)
    if not (need_explicit or need_implicit):
        return ce, zeros, zeros, None, smoothing_sum
    probs = torch.softmax(logits, dim=-1)
    m1 = (probs * c) @ w
    quadratic = sign_term = zeros
    w_target = w[target]
    if need_explicit:
        m2 = (probs * (c * c + z2)) @ (w * w)
        quadratic = (h * h * (m2 - m1 * m1 - z2.gather(1, at_target) * w_target * w_target)).sum(-1)
    if need_implicit:
        if signs is None:
            signs = philox_signs(seed, h.shape[0], h.shape[1], device=h.device, dtype=acc)
        sign_term = (signs.to(acc) * h * (m1 - c.gather(1, at_target) * w_target)).sum(-1)
    return ce, quadratic, sign_term, m1, smoothing_sum


def reference_rdrop(input1, input2, weight, bias, target, softcap=None):
    """Per-row ``(ce1, ce2, kl)`` with ``kl = (KL(p1||p2) + KL(p2||p1)) / 2 = sum_v (p1 - p2)(z1 - z2) / 2``, of
    the logits capped to ``softcap * tanh(z / softcap)`` when ``softcap`` is given."""
    acc = accumulation_dtype(input1.dtype)
    w = weight.to(acc)
    logits = [h.to(acc) @ w.T for h in (input1, input2)]
    if bias is not None:
        logits = [z + bias.to(acc) for z in logits]
    if softcap is not None:
        logits = [softcap * torch.tanh(z / softcap) for z in logits]
    log_probs = [torch.log_softmax(z, dim=-1) for z in logits]
    ce1, ce2 = (-lp.gather(1, target[:, None]).squeeze(1) for lp in log_probs)
    kl = 0.5 * ((log_probs[0].exp() - log_probs[1].exp()) * (logits[0] - logits[1])).sum(-1)
    return ce1, ce2, kl


def reference_softmax_mean(input, weight, bias):
    """Per-row ``mu = W^T softmax(z)`` (N, d) in the accumulation dtype; autograd gives its gradients."""
    acc = accumulation_dtype(input.dtype)
    w = weight.to(acc)
    logits = input.to(acc) @ w.T
    if bias is not None:
        logits = logits + bias.to(acc)
    return torch.softmax(logits, dim=-1) @ w


@torch.no_grad()
def reference_sample_targets(input, weight, bias, samples, seed):
    """(samples, N) Gumbel-max draws ``argmax_v (z_v + g_v)`` on the materialized logits (dropreg.signs)."""
    acc = accumulation_dtype(input.dtype)
    logits = input.to(acc) @ weight.to(acc).T
    if bias is not None:
        logits = logits + bias.to(acc)
    rows = torch.arange(input.shape[0], device=input.device)
    return torch.stack([(logits.to(torch.float64) + gumbel_noise(seed, k, rows, 0, weight.shape[0])).argmax(dim=1)
                        for k in range(samples)]) if input.shape[0] else \
        torch.zeros(samples, 0, dtype=torch.int64, device=input.device)
