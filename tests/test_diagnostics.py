"""dropreg.diagnostics against exact Hessians (torch.autograd.functional.hessian) on small models."""
import math

import pytest
import torch
import torch.nn.functional as F

import dropreg
from checks import seeded_generator
from dropreg import diagnostics

SHAPES = [(4, 3), (4,), (5, 4)]  # W1, b1, W2 of a tiny tanh MLP


def _mlp_problem(dtype=torch.float64, seed=0):
    generator = seeded_generator(seed)
    # drawn in float64 and rounded, so every dtype sees the same problem
    params = [torch.randn(*shape, dtype=torch.float64, generator=generator).to(dtype).requires_grad_()
              for shape in SHAPES]
    x = torch.randn(6, 3, dtype=torch.float64, generator=generator).to(dtype)
    y = torch.randint(0, 5, (6,), generator=generator)

    def loss_of(w1, b1, w2):
        return F.cross_entropy(torch.tanh(x @ w1.T + b1) @ w2.T, y)

    return params, (lambda: loss_of(*params)), loss_of


def _exact_hessian(loss_of, params):
    sizes = [p.numel() for p in params]

    def flat_loss(theta):
        pieces = torch.split(theta, sizes)
        return loss_of(*[piece.reshape(p.shape) for piece, p in zip(pieces, params)])

    theta = torch.cat([p.detach().reshape(-1) for p in params])
    return torch.autograd.functional.hessian(flat_loss, theta)


def _flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


@pytest.mark.parametrize("method,tolerance", [("autograd", 1e-12), ("finite-difference", 1e-7)])
def test_hessian_vector_product_matches_the_exact_hessian(method, tolerance):
    params, loss_fn, loss_of = _mlp_problem()
    hessian = _exact_hessian(loss_of, params)
    vector = [torch.randn_like(p) for p in params]
    before = [p.detach().clone() for p in params]
    product = _flat(diagnostics.hessian_vector_product(loss_fn, params, vector, method=method))
    exact = hessian @ _flat(vector)
    assert float((product - exact).norm() / exact.norm()) < tolerance
    for p, b in zip(params, before):  # parameters are restored (to within one rounding)
        torch.testing.assert_close(p.detach(), b, rtol=1e-15, atol=1e-15)


def test_finite_difference_error_is_as_stated():
    """The module docstring states the finite-difference error: 1e-10..1e-9 relative in float64, ~1e-4 in float32."""
    params, loss_fn, loss_of = _mlp_problem()
    hessian = _exact_hessian(loss_of, params)
    vector = [torch.randn_like(p) for p in params]
    exact = hessian @ _flat(vector)
    error64 = float((_flat(diagnostics.hessian_vector_product(loss_fn, params, vector)) - exact).norm() / exact.norm())
    params32, loss32, _ = _mlp_problem(torch.float32)
    product32 = _flat(diagnostics.hessian_vector_product(loss32, params32, [v.float() for v in vector]))
    error32 = float((product32.double() - exact).norm() / exact.norm())
    print(f"finite-difference HVP relative error: float64 {error64:.1e}, float32 {error32:.1e}")
    assert error64 < 1e-7 and error32 < 1e-2, (error64, error32)


def test_finite_differences_through_the_fused_ops():
    """HVPs of a loss with both dropout terms through the C++/streamed backends (which refuse double backward)
    match the exact product of the same loss on the "reference" backend (plain autograd)."""
    generator = seeded_generator(3)
    h = torch.randn(6, 4, dtype=torch.float64, generator=generator)
    w = (torch.randn(11, 4, dtype=torch.float64, generator=generator) / 2).requires_grad_()
    y = torch.randint(0, 11, (6,), generator=generator)
    vector = [torch.randn(11, 4, dtype=torch.float64, generator=generator)]

    def loss_for(backend):
        return lambda: dropreg.linear_cross_entropy(h, w, y, p=0.3, seed=5, backend=backend).loss

    exact = diagnostics.hessian_vector_product(loss_for("reference"), [w], vector, method="autograd")[0]
    for backend in ("torch", "cpu") if torch.get_default_device().type == "cpu" else ("torch",):
        with pytest.raises(RuntimeError, match="double backward"):
            diagnostics.hessian_vector_product(loss_for(backend), [w], vector, method="autograd")
        approx = diagnostics.hessian_vector_product(loss_for(backend), [w], vector)[0]
        assert float((approx - exact).norm() / exact.norm()) < 1e-7, backend


def test_top_eigenvalue_matches_the_exact_spectrum():
    params, loss_fn, loss_of = _mlp_problem(seed=1)
    eigenvalues = torch.linalg.eigvalsh(_exact_hessian(loss_of, params))
    largest = float(eigenvalues[eigenvalues.abs().argmax()])
    result = diagnostics.top_hessian_eigenvalue(loss_fn, params, iterations=500, tolerance=1e-10,
                                                method="autograd", generator=seeded_generator(0))
    assert result.converged
    assert abs(result.value - largest) <= 1e-6 * abs(largest)
    fd = diagnostics.top_hessian_eigenvalue(loss_fn, params, iterations=500, tolerance=1e-10,
                                            generator=seeded_generator(0))
    assert abs(fd.value - largest) <= 1e-5 * abs(largest)


def test_hutchinson_trace_is_unbiased():
    """400 Rademacher probes (seeded). A fresh seed would exceed the 5-standard-error bound with probability
    about 6e-7 (normal approximation)."""
    params, loss_fn, loss_of = _mlp_problem(seed=2)
    exact = float(torch.trace(_exact_hessian(loss_of, params)))
    estimate = diagnostics.hessian_trace(loss_fn, params, samples=400, method="autograd",
                                         generator=seeded_generator(4))
    assert abs(estimate.value - exact) < 5 * estimate.standard_error + 1e-12, (estimate, exact)
    assert estimate.standard_error > 0


def test_condensation():
    weight = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 0.0], [-1.0, 0.01]])
    result = diagnostics.condensation(weight, threshold=0.9)
    # non-zero rows 0, 1, 2, 4: pairs (0,1) 1, (0,2) 0, (0,4) ~1, (1,2) 0, (1,4) ~1, (2,4) ~0.01
    assert result.abs_cosines.numel() == 6
    assert result.fraction_above == pytest.approx(3 / 6)
    random = diagnostics.condensation(torch.randn(200, 64))
    assert random.fraction_above == 0.0 and float(random.abs_cosines.max()) < 0.9
    with pytest.raises(ValueError, match="^weight"):
        diagnostics.condensation(torch.randn(3))
    with pytest.raises(ValueError, match="^threshold"):
        diagnostics.condensation(torch.randn(3, 2), threshold=2.0)


def test_bad_arguments():
    params, loss_fn, _ = _mlp_problem()
    with pytest.raises(ValueError, match="^method"):
        diagnostics.hessian_vector_product(loss_fn, params, [torch.zeros_like(p) for p in params], method="exact")
    with pytest.raises(ValueError, match="^vector"):
        diagnostics.hessian_vector_product(loss_fn, params, [torch.zeros(2)])
    with pytest.raises(ValueError, match="^params"):
        diagnostics.hessian_trace(loss_fn, [torch.zeros(3)])
    assert math.isfinite(diagnostics.hessian_trace(loss_fn, params, samples=2).value)
    for kwargs, error, argument in ((dict(samples=1), ValueError, "samples"), (dict(samples=2.5), TypeError, "samples")):
        with pytest.raises(error, match=rf"^{argument}:"):
            diagnostics.hessian_trace(loss_fn, params, **kwargs)
    for kwargs, error, argument in ((dict(iterations=0), ValueError, "iterations"),
                                    (dict(tolerance=-1.0), ValueError, "tolerance")):
        with pytest.raises(error, match=rf"^{argument}:"):
            diagnostics.top_hessian_eigenvalue(loss_fn, params, **kwargs)
