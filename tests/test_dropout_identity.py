"""The terms are dropout's effects: the explicit term its second-order loss change, the implicit term's
spread that of its first-order one (docs/math.md).

The Taylor remainder is dominated by the third-order term. For Bernoulli dropout E[delta_j^3] is O(p)
like the variance, so the remainder does not vanish as p -> 0; relative to the explicit term it scales
with the size of h. The two expectation tests below rest on that.
"""
import itertools

import pytest
import torch
import torch.nn.functional as F

import dropreg
from checks import seeded_generator


def _all_masks(d, p, dtype=torch.float64):
    """Every keep-mask of d units and its probability under Bernoulli(1 - p) keeping."""
    masks = torch.tensor(list(itertools.product([0.0, 1.0], repeat=d)), dtype=dtype)
    kept = masks.sum(1)
    return masks, (1 - p) ** kept * p ** (d - kept)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_default_coefficients_are_dropout_moments(p):
    """Exact identities (all 2^d masks and all 2^d sign vectors enumerated, no sampling), per row with
    delta = dropout(h) - h, g = dce/dh and H = d^2 ce/dh^2 from autograd:

    * explicit (default coefficient) = E_mask[delta^T H delta] / 2, the second-order Taylor term;
    * Var_signs[implicit] (default coefficient) = Var_mask[g . delta], the first-order term's variance.
    Checks both coefficients and both terms' structure; float64, so the tolerance is rounding-level."""
    d, vocab, rows = 6, 9, 4
    h = torch.randn(rows, d, dtype=torch.float64)
    weight = torch.randn(vocab, d, dtype=torch.float64) / d**0.5
    bias = torch.randn(vocab, dtype=torch.float64)
    target = torch.randint(0, vocab, (rows,))
    masks, prob = _all_masks(d, p)
    second_order, first_order_var = [], []
    for n in range(rows):
        def ce(h_row, n=n):
            return F.cross_entropy((weight @ h_row + bias)[None], target[n:n + 1])
        g = torch.autograd.functional.jacobian(ce, h[n])
        hessian = torch.autograd.functional.hessian(ce, h[n])
        delta = h[n] * masks / (1 - p) - h[n]
        second_order.append((prob * ((delta @ hessian) * delta).sum(1)).sum() / 2)
        first = delta @ g
        first_order_var.append((prob * first**2).sum() - (prob * first).sum() ** 2)
    explicit = dropreg.linear_cross_entropy(h, weight, target, linear_bias=bias, p=p, implicit=False,
                                            reduction="none").explicit
    torch.testing.assert_close(explicit, torch.stack(second_order), rtol=1e-10, atol=1e-14)

    signs = masks * 2 - 1  # every sign vector, uniformly
    implicit = dropreg.linear_cross_entropy(h.repeat_interleave(len(signs), 0), weight,
                                            target.repeat_interleave(len(signs)), linear_bias=bias, p=p,
                                            explicit=False, signs=signs.repeat(rows, 1), reduction="none")
    implicit_var = implicit.implicit.reshape(rows, -1).var(1, correction=0)
    torch.testing.assert_close(implicit_var, torch.stack(first_order_var), rtol=1e-10, atol=1e-14)


def _expected_dropout_gap_exact(h, weight, target, p):
    """E_mask[ce(W h~)] - ce(W h) by summing over all 2^d masks with their probabilities (no sampling)."""
    d = h.shape[1]
    masks, prob = _all_masks(d, p, h.dtype)
    dropped = h[:, None, :] * masks[None] / (1 - p)
    vocab = weight.shape[0]
    losses = F.cross_entropy((dropped @ weight.T).reshape(-1, vocab), target.repeat_interleave(len(masks)),
                             reduction="none").reshape(h.shape[0], -1)
    return (losses * prob).sum(1) - F.cross_entropy(h @ weight.T, target, reduction="none")


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_exact_expectation_matches_explicit_term_as_h_shrinks(p):
    # Exact expectations, but the thresholds below hold for typical draws, not every draw: the inputs come
    # from a fixed seed so that the test is deterministic (no false-failure rate to state).
    gen = seeded_generator(2020)
    d, vocab, rows = 10, 9, 16
    weight = torch.randn(vocab, d, dtype=torch.float64, generator=gen) / d**0.5
    target = torch.randint(0, vocab, (rows,), generator=gen)
    direction = torch.randn(rows, d, dtype=torch.float64, generator=gen)
    remainders = []
    for alpha in (0.4, 0.025):
        h = alpha * direction
        explicit = dropreg.linear_cross_entropy(h, weight, target, p=p, implicit=False, reduction="none").explicit
        remainders.append((_expected_dropout_gap_exact(h, weight, target, p) / explicit - 1).abs())
    large, small = remainders
    # remainder / explicit ~ c1 * alpha: 16x smaller h must shrink it far more than 4x, and leave < 5%.
    assert small.max() < 0.05, small
    assert small.mean() < 0.25 * large.mean(), (small.mean(), large.mean())


def test_monte_carlo_dropout_matches_explicit_term():
    """Real dropout masks at d=64 with the first-order term removed as a control variate.

    ``g . delta`` has mean exactly zero, so subtracting it leaves the estimate unbiased and removes most of
    its noise. Tolerance: 4 standard errors plus 3% for the Taylor remainder (about 1% at this scale).
    False-failure rate: masks come from the fresh per-test seed; with the remainder inside the 3%, a correct
    implementation fails only if one of the 8 row means lands beyond 4 standard errors (the mean of 20000
    samples is normal to good accuracy): at most 8 * P(|Z| > 4) = 8 * 6.3e-5 = 5e-4 per run.
    """
    d, vocab, rows, n_masks, p = 64, 50, 8, 20000, 0.05
    weight = torch.randn(vocab, d, dtype=torch.float64) / d**0.5
    h = torch.randn(rows, d, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, vocab, (rows,))
    clean = F.cross_entropy(h @ weight.T, target, reduction="none")
    (grad,) = torch.autograd.grad(clean.sum(), h)
    h, clean = h.detach(), clean.detach()
    delta = F.dropout(h.expand(n_masks, rows, d), p=p, training=True) - h
    dropped = F.cross_entropy(((h + delta) @ weight.T).reshape(-1, vocab), target.repeat(n_masks),
                              reduction="none").reshape(n_masks, rows)
    samples = dropped - clean - (grad * delta).sum(-1)
    estimate, stderr = samples.mean(0), samples.std(0) / n_masks**0.5
    explicit = dropreg.linear_cross_entropy(h, weight, target, p=p, implicit=False, reduction="none").explicit
    assert torch.all((estimate - explicit).abs() <= 4 * stderr + 0.03 * explicit), (estimate / explicit)
