"""The explicit term is dropout's second-order effect: E_mask[ce(W dropout(h))] - ce(W h) ~= explicit.

The Taylor remainder is dominated by the third-order term. For Bernoulli dropout E[delta_j^3] is O(p)
like the variance, so the remainder does not vanish as p -> 0; relative to the explicit term it scales
with the size of h. Both tests below rest on that.
"""
import itertools

import pytest
import torch
import torch.nn.functional as F

import dropreg


def _expected_dropout_gap_exact(h, weight, target, p):
    """E_mask[ce(W h~)] - ce(W h) by summing over all 2^d masks with their probabilities (no sampling)."""
    d = h.shape[1]
    masks = torch.tensor(list(itertools.product([0.0, 1.0], repeat=d)), dtype=h.dtype)
    kept = masks.sum(1)
    prob = (1 - p) ** kept * p ** (d - kept)
    dropped = h[:, None, :] * masks[None] / (1 - p)
    vocab = weight.shape[0]
    losses = F.cross_entropy((dropped @ weight.T).reshape(-1, vocab), target.repeat_interleave(len(masks)),
                             reduction="none").reshape(h.shape[0], -1)
    return (losses * prob).sum(1) - F.cross_entropy(h @ weight.T, target, reduction="none")


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_exact_expectation_matches_explicit_term_as_h_shrinks(p):
    d, vocab, rows = 10, 9, 16
    weight = torch.randn(vocab, d, dtype=torch.float64) / d**0.5
    target = torch.randint(0, vocab, (rows,))
    direction = torch.randn(rows, d, dtype=torch.float64)
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
