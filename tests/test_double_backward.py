"""Second derivatives through the fused ops are refused with a clear error, never silently wrong.

The hand-written backward passes are not themselves differentiable. Without a guard, torch would return a
Hessian-vector product that misses the fused op's part (zeros for the C++ ops, with only a deprecation
warning; a partial graph for the autograd.Functions), which is silent garbage."""
import pytest
import torch

import dropreg


def _losses(h, h2, w, b, y, backend):
    return {
        "linear_cross_entropy": lambda: dropreg.linear_cross_entropy(h, w, y, linear_bias=b, seed=0,
                                                                     backend=backend).loss,
        "ce_only": lambda: dropreg.linear_cross_entropy(h, w, y, linear_bias=b, explicit=False, implicit=False,
                                                        backend=backend).loss,
        "rdrop": lambda: dropreg.rdrop_linear_cross_entropy(h, h2, w, y, linear_bias=b, backend=backend).loss,
        "softmax_mean": lambda: dropreg.softmax_mean(h, w, linear_bias=b, backend=backend).pow(2).sum(),
    }


@pytest.mark.parametrize("op", ["linear_cross_entropy", "ce_only", "rdrop", "softmax_mean"])
@pytest.mark.parametrize("wrt", ["input", "weight"])
def test_double_backward_raises(backend, op, wrt):
    if backend == "reference":
        pytest.skip("the reference backend is plain autograd: its double backward is exact")
    h = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    h2 = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(9, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 9, (5,))
    # an extra differentiable path to h, so that a missing term could hide behind a non-None result
    loss = _losses(h, h2, w, b, y, backend)[op]() + (h ** 2).sum()
    grads = torch.autograd.grad(loss, (h, w), create_graph=True)
    # first-order results are unchanged by the guard
    reference = torch.autograd.grad(_losses(h, h2, w, b, y, "reference")[op]() + (h ** 2).sum(), (h, w))
    for ours, ref in zip(grads, reference):
        torch.testing.assert_close(ours.detach(), ref, rtol=1e-10, atol=1e-12)
    target = h if wrt == "input" else w
    with pytest.raises(RuntimeError, match="double backward through dropreg's fused ops is not implemented"):
        torch.autograd.grad(sum(g.sum() for g in grads), target)


def test_reference_double_backward_is_available():
    h = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 3, dtype=torch.float64)
    y = torch.randint(0, 7, (4,))
    loss = dropreg.linear_cross_entropy(h, w, y, seed=0, backend="reference").loss
    (g,) = torch.autograd.grad(loss, h, create_graph=True)
    (hv,) = torch.autograd.grad(g.sum(), h)
    assert torch.isfinite(hv).all() and hv.abs().sum() > 0
