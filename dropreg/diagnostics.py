"""Diagnostics for studying what dropout does to a trained network: flatness and condensation.

* Flatness (Zhang & Xu; Wei, Kakade & Ma): the largest *algebraic* Hessian eigenvalue of the training loss by
  Lanczos (:func:`top_hessian_eigenvalue`) and the Hessian trace by Hutchinson's estimator
  (:func:`hessian_trace`), both built on Hessian-vector products (:func:`hessian_vector_product`).
* Condensation (Zhang & Xu): the distribution of pairwise ``|cosine|`` between hidden units' input weight
  vectors and the fraction above a threshold (:func:`condensation`).

Hessian-vector products come in two kinds. ``method="autograd"`` (the default) is exact (double backward); it
works for losses made of differentiable PyTorch ops (``F.cross_entropy``, and ``nn.LSTM`` on the CPU: cuDNN's RNN
backward has no double backward) and dropreg's ``"reference"`` backend, while the fused backends refuse double
backward with an error saying so.
``method="finite-difference"`` takes the central difference of two gradients,
``(grad(theta + eps v) - grad(theta - eps v)) / (2 eps)``, so it works through every fused op. Its error is
``O(eps^2)`` truncation plus ``O(unit roundoff / eps)`` rounding. The default step is scaled per parameter
block, ``eps = u^(1/3) * min_b (1 + |theta_b|) / |v_b|``: no block moves by more than ``u^(1/3)`` of its own
size, so a large block (an embedding) does not set a step that is coarse for the small ones. Measured against
exact products (tests/test_diagnostics.py): relative error below 1e-7 in float64 on a tanh MLP and through the
fused ops, below 1e-2 in float32 on a tanh MLP and on a small LSTM language model.

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
    value: float  # the largest algebraic eigenvalue (the Ritz value at the top of the Lanczos spectrum)
    vector: list[Tensor]  # its unit-norm Ritz vector, shaped like the parameters
    iterations: int  # Hessian-vector products taken
    converged: bool  # residual <= tolerance * |value|, or the Krylov space became invariant
    residual: float  # Lanczos's estimate of |H y - value y| for the Ritz vector y (beta_k |s_k|): with exact
    # products some eigenvalue lies within it of value; it does not include the products' own error


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
                           method: str = "autograd", eps: Optional[float] = None) -> list[Tensor]:
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
    if eps is not None and not (isinstance(eps, numbers.Real) and eps > 0):
        raise ValueError(f"eps: expected a positive float, got {eps!r}")
    v_norm = _norm(vector)
    if v_norm == 0:
        return [torch.zeros_like(p) for p in params]
    if eps is None:  # per block: no block moves by more than u^(1/3) of its own size
        unit_roundoff = torch.finfo(params[0].dtype).eps
        eps = unit_roundoff ** (1 / 3) * min((1 + _norm([p.detach()])) / _norm([v])
                                             for p, v in zip(params, vector) if _norm([v]) > 0)
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


def _flatten(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.detach().reshape(-1).double().cpu() for t in tensors])


def _unflatten(flat: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
    pieces = torch.split(flat, [p.numel() for p in params])
    return [piece.reshape(p.shape).to(device=p.device, dtype=p.dtype) for piece, p in zip(pieces, params)]


def top_hessian_eigenvalue(loss_fn: LossFn, params: Sequence[Tensor], *, iterations: int = 60,
                           tolerance: float = 1e-3, method: str = "autograd", eps: Optional[float] = None,
                           generator: Optional[torch.Generator] = None) -> HessianEigen:
    """The largest *algebraic* Hessian eigenvalue (the sharpness at a minimum; at a saddle still the top of the
    spectrum, not a negative eigenvalue of larger magnitude as power iteration would give), by Lanczos with full
    reorthogonalization in float64 on the flattened parameters. Stops when Lanczos's estimate of the Ritz pair's
    residual ``|H y - value y|`` is at most ``tolerance * |value|``, or after ``iterations`` products
    (``converged=False``).
    Holds ``iterations`` vectors the size of the parameters in float64."""
    _check_count("iterations", iterations, 1)
    if not (isinstance(tolerance, numbers.Real) and tolerance >= 0):
        raise ValueError(f"tolerance: expected a non-negative float, got {tolerance!r}")
    params = _params(params)
    start = _flatten(_random_like(params, generator, rademacher=False))
    basis = torch.empty(iterations, start.numel(), dtype=torch.float64)  # the Lanczos vectors, as rows
    basis[0] = start / start.norm()
    alphas, betas = [], []
    for iteration in range(1, iterations + 1):
        current = basis[iteration - 1]
        w = _flatten(hessian_vector_product(loss_fn, params, _unflatten(current, params), method=method, eps=eps))
        alphas.append(float(current @ w))
        stacked = basis[:iteration]
        for _ in range(2):  # full reorthogonalization, twice is enough (Kahan-Parlett)
            w = w - stacked.T @ (stacked @ w)
        beta = float(w.norm())
        tridiagonal = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            tridiagonal += torch.diag(off, 1) + torch.diag(off, -1)
        ritz_values, ritz_vectors = torch.linalg.eigh(tridiagonal)
        value, coefficients = float(ritz_values[-1]), ritz_vectors[:, -1]
        residual = beta * abs(float(coefficients[-1]))
        invariant = beta <= 1e-12 * max(abs(a) for a in alphas + betas + [1e-300])
        if residual <= tolerance * abs(value) or invariant or iteration == iterations:
            ritz = coefficients @ stacked
            return HessianEigen(value, _unflatten(ritz / ritz.norm(), params), iteration,
                                residual <= tolerance * abs(value) or invariant, residual)
        betas.append(beta)
        basis[iteration] = w / beta
    raise AssertionError("unreachable")


def hessian_trace(loss_fn: LossFn, params: Sequence[Tensor], *, samples: int = 100,
                  method: str = "autograd", eps: Optional[float] = None,
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
