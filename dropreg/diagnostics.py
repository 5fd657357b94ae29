"""Diagnostics for studying what dropout does to a trained network: flatness and condensation.

* Flatness (Zhang & Xu; Wei, Kakade & Ma): the top Hessian eigenvalue of the training loss by power iteration
  (:func:`top_hessian_eigenvalue`) and the Hessian trace by Hutchinson's estimator (:func:`hessian_trace`),
  both built on Hessian-vector products (:func:`hessian_vector_product`).
* Condensation (Zhang & Xu): the distribution of pairwise ``|cosine|`` between hidden units' input weight
  vectors and the fraction above a threshold (:func:`condensation`).

Hessian-vector products come in two kinds. ``method="autograd"`` is exact (double backward); it works for
losses made of differentiable PyTorch ops and dropreg's ``"reference"`` backend, while the fused backends refuse
double backward. ``method="finite-difference"`` (the default) takes the central difference of two gradients,
``(grad(theta + eps v) - grad(theta - eps v)) / (2 eps)``, so it works through every fused op. Its error is
``O(eps^2)`` truncation plus ``O(unit roundoff / eps)`` rounding; the default ``eps`` balances the two
(``eps = u^(1/3) * (1 + |theta|) / |v|``). Measured against exact products on a small tanh MLP
(tests/test_diagnostics.py, random directions): relative error 1e-10 to 1e-9 in float64 and about 1e-4 in
float32; through the fused ops in float64 below 1e-7 (use float64 parameters for diagnostics when possible).

``loss_fn`` is a closure that recomputes the loss from the current parameters; it must be deterministic (same
batch, dropout off or with fixed masks, fixed ``seed=`` for dropreg's random terms), or the products are noise.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

LossFn = Callable[[], Tensor]
METHODS = ("finite-difference", "autograd")


class HessianEigen(NamedTuple):
    value: float  # the eigenvalue of largest magnitude (power iteration's limit), with its sign
    vector: list[Tensor]  # unit-norm eigenvector, shaped like the parameters
    iterations: int
    converged: bool


class TraceEstimate(NamedTuple):
    value: float
    standard_error: float  # of the Hutchinson mean: sample standard deviation / sqrt(samples)
    samples: int


class Condensation(NamedTuple):
    abs_cosines: Tensor  # every pair i < j of non-zero rows, |cos(w_i, w_j)|
    fraction_above: float  # share of pairs with |cos| > threshold
    threshold: float


def _params(params) -> list[Tensor]:
    params = [p for p in params]
    if not params or not all(isinstance(p, Tensor) and p.requires_grad for p in params):
        raise ValueError("params: expected a non-empty sequence of tensors that require grad")
    return params


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    return sum((x.double() * y.double()).sum() for x, y in zip(a, b))


def _norm(a: Sequence[Tensor]) -> float:
    return float(_dot(a, a).sqrt())


def hessian_vector_product(loss_fn: LossFn, params: Sequence[Tensor], vector: Sequence[Tensor], *,
                           method: str = "finite-difference", eps: Optional[float] = None) -> list[Tensor]:
    """``H v`` for the Hessian of ``loss_fn()`` w.r.t. ``params`` (see the module docstring for the methods)."""
    params = _params(params)
    vector = list(vector)
    if len(vector) != len(params) or any(v.shape != p.shape for v, p in zip(vector, params)):
        raise ValueError("vector: expected one tensor per parameter, with the parameter's shape")
    if method == "autograd":
        grads = torch.autograd.grad(loss_fn(), params, create_graph=True)
        return [g.detach() for g in torch.autograd.grad(_dot(grads, vector), params, allow_unused=True,
                                                        materialize_grads=True)]
    if method != "finite-difference":
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    v_norm = _norm(vector)
    if v_norm == 0:
        return [torch.zeros_like(p) for p in params]
    if eps is None:
        unit_roundoff = torch.finfo(params[0].dtype).eps
        eps = unit_roundoff ** (1 / 3) * (1 + _norm([p.detach() for p in params])) / v_norm
    with torch.no_grad():
        for p, v in zip(params, vector):
            p.add_(v, alpha=eps)
    try:
        plus = torch.autograd.grad(loss_fn(), params, allow_unused=True, materialize_grads=True)
        with torch.no_grad():
            for p, v in zip(params, vector):
                p.add_(v, alpha=-2 * eps)
        minus = torch.autograd.grad(loss_fn(), params, allow_unused=True, materialize_grads=True)
    finally:
        with torch.no_grad():
            for p, v in zip(params, vector):
                p.add_(v, alpha=eps)  # back to theta (up to one rounding per element)
    return [(a - b) / (2 * eps) for a, b in zip(plus, minus)]


def _random_like(params: Sequence[Tensor], generator: Optional[torch.Generator], rademacher: bool) -> list[Tensor]:
    out = []
    for p in params:
        if rademacher:
            sample = torch.randint(0, 2, p.shape, generator=generator, dtype=torch.int64) * 2 - 1
        else:
            sample = torch.randn(p.shape, generator=generator, dtype=torch.float64)
        out.append(sample.to(device=p.device, dtype=p.dtype))
    return out


def _check_count(name: str, value, minimum: int, why: str = "") -> None:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name}: expected an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: expected at least {minimum}{why}, got {value}")


def top_hessian_eigenvalue(loss_fn: LossFn, params: Sequence[Tensor], *, iterations: int = 100,
                           tolerance: float = 1e-4, method: str = "finite-difference", eps: Optional[float] = None,
                           generator: Optional[torch.Generator] = None) -> HessianEigen:
    """Power iteration on Hessian-vector products: the eigenvalue of largest magnitude (for a minimum, the
    sharpness), stopping when the Rayleigh quotient changes by less than ``tolerance`` relative."""
    _check_count("iterations", iterations, 1)
    if not (isinstance(tolerance, numbers.Real) and tolerance >= 0):
        raise ValueError(f"tolerance: expected a non-negative float, got {tolerance!r}")
    params = _params(params)
    vector = _random_like(params, generator, rademacher=False)
    scale = _norm(vector)
    vector = [v / scale for v in vector]
    value = None
    for iteration in range(1, iterations + 1):
        product = hessian_vector_product(loss_fn, params, vector, method=method, eps=eps)
        new_value = float(_dot(vector, product))
        size = _norm(product)
        if size == 0:
            return HessianEigen(0.0, vector, iteration, True)
        vector = [h / size for h in product]
        if value is not None and abs(new_value - value) <= tolerance * abs(new_value):
            return HessianEigen(new_value, vector, iteration, True)
        value = new_value
    return HessianEigen(value, vector, iterations, False)


def hessian_trace(loss_fn: LossFn, params: Sequence[Tensor], *, samples: int = 100,
                  method: str = "finite-difference", eps: Optional[float] = None,
                  generator: Optional[torch.Generator] = None) -> TraceEstimate:
    """Hutchinson's estimator ``E[z^T H z]`` with Rademacher ``z``: unbiased, with its standard error."""
    _check_count("samples", samples, 2, why=" (for a standard error)")
    params = _params(params)
    values = []
    for _ in range(samples):
        z = _random_like(params, generator, rademacher=True)
        values.append(float(_dot(z, hessian_vector_product(loss_fn, params, z, method=method, eps=eps))))
    values = torch.tensor(values, dtype=torch.float64)
    return TraceEstimate(float(values.mean()), float(values.std()) / math.sqrt(samples), samples)


def condensation(weight: Tensor, *, threshold: float = 0.9) -> Condensation:
    """Pairwise ``|cosine|`` between the rows of ``weight`` (one row per hidden unit: its input weights, as in
    ``nn.Linear.weight`` or a gate block of ``nn.LSTM.weight_ih_l0``), and the fraction above ``threshold``.
    Rows that are exactly zero have no direction and are left out."""
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError("weight: expected a 2-D tensor (units x inputs)")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold: expected a value in [0, 1], got {threshold}")
    rows = weight.detach().double()
    norms = rows.norm(dim=1)
    rows = rows[norms > 0] / norms[norms > 0, None]
    first, second = torch.triu_indices(rows.shape[0], rows.shape[0], offset=1)
    cosines = (rows @ rows.T)[first, second].abs().clamp(max=1.0)
    fraction = float((cosines > threshold).double().mean()) if cosines.numel() else 0.0
    return Condensation(cosines, fraction, threshold)
