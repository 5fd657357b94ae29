"""Shared helpers: make problems, run dropreg and the oracle, compare with justified tolerances."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dropreg
from oracle import oracle_rows

TERMS = ("ce", "explicit", "implicit", "z_loss")


def seeded_generator(seed: int) -> torch.Generator:
    """A generator on the suite's device (tests/conftest.py, DROPREG_TEST_DEVICE), so seeded draws work on either."""
    return torch.Generator(device=torch.get_default_device()).manual_seed(seed)


@dataclass
class Problem:
    input: torch.Tensor  # float64 master copies; cast to the tested dtype when run
    weight: torch.Tensor
    bias: torch.Tensor | None
    target: torch.Tensor
    signs: torch.Tensor
    kwargs: dict = field(default_factory=dict)


def make_problem(lead=(5,), d=4, vocab=11, *, bias=True, logit_scale=1.0, ignore=(), dtype=torch.float64,
                 p=0.1, **kwargs) -> Problem:
    """W ~ N(0, 1/d) * logit_scale, h ~ N(0, 1): logit_scale 1 gives typical softmaxes, 30 peaked ones,
    1e-3 flat ones and ~1e4 huge logits. Values are rounded to ``dtype`` so every path sees the same data."""
    def rounded(t):
        return t.to(dtype).to(torch.float64)

    h = rounded(torch.randn(*lead, d, dtype=torch.float64))
    w = rounded(torch.randn(vocab, d, dtype=torch.float64) * (logit_scale / d**0.5))
    b = rounded(torch.randn(vocab, dtype=torch.float64) * logit_scale) if bias else None
    target = torch.randint(0, vocab, lead)
    flat = target.view(-1)
    for i in ignore:
        flat[i if i >= 0 else flat.numel() + i] = kwargs.get("ignore_index", -100)
    signs = torch.randint(0, 2, (*lead, d)).double() * 2 - 1
    return Problem(h, w, b, target, signs, dict(p=p, **kwargs))


def _leaves(problem: Problem, dtype):
    leaves = [problem.input.to(dtype), problem.weight.to(dtype)]
    if problem.bias is not None:
        leaves.append(problem.bias.to(dtype))
    return [t.clone().requires_grad_() for t in leaves]


def _terms_and_grads(terms, leaves, cotangent, names=TERMS):
    values, grads = {}, {}
    for name, value in zip(names, terms):
        values[name] = value.detach().to(torch.float64)
        if value.requires_grad:
            g = torch.autograd.grad(value, leaves, cotangent.to(value.dtype) if value.dim() else None,
                                    retain_graph=True, allow_unused=True)
        else:
            g = [None] * len(leaves)
        grads[name] = [torch.zeros_like(leaf, dtype=torch.float64) if gi is None else gi.to(torch.float64)
                       for gi, leaf in zip(g, leaves)]
    return values, grads


def run_dropreg(problem: Problem, dtype, backend, cotangent=None, gradients_of="terms", **overrides):
    """dropreg's values and gradients, with a random ``cotangent`` (returned) unless one is given.
    ``gradients_of="loss"``: the gradient of ``.loss`` is reported as ``ce``'s, the other terms' as zeros."""
    leaves = _leaves(problem, dtype)
    kwargs = dict(problem.kwargs, **overrides)
    kwargs.setdefault("signs", problem.signs.to(dtype))
    out = dropreg.linear_cross_entropy(leaves[0], leaves[1], problem.target,
                                       linear_bias=leaves[2] if len(leaves) == 3 else None,
                                       backend=backend, **kwargs)
    for name in TERMS:
        assert getattr(out, name).dtype == torch.promote_types(dtype, torch.float32)  # losses: at least fp32
    if cotangent is None:
        cotangent = torch.randn(problem.target.shape, dtype=torch.float64)
    if gradients_of == "loss":
        loss_grads = _terms_and_grads((out.loss,), leaves, cotangent, ("loss",))[1]["loss"]
        values = {name: getattr(out, name).detach().to(torch.float64) for name in TERMS}
        return (values, _as_ce_gradients(loss_grads)), cotangent
    return _terms_and_grads(tuple(out), leaves, cotangent), cotangent


def assert_loss_close_to_oracle(problem: Problem, dtype, backend, **overrides):
    """For outputs whose gradients exist only as a sum (CE only with z_loss, fused: docs/math.md 3.5): every term's
    value and the gradient of ``.loss``, against the oracle's."""
    ours, cotangent = run_dropreg(problem, dtype, backend, cotangent=torch.ones(()), gradients_of="loss",
                                  **overrides)
    oracle = run_oracle(problem, cotangent, **overrides)
    values, grads = oracle
    total = [sum(grads[name][i] for name in TERMS) for i in range(len(grads["ce"]))]
    assert_close_to_oracle(ours, (values, _as_ce_gradients(total)), dtype, problem)


def _as_ce_gradients(loss_grads):
    """Per-term gradients holding the loss's under ``ce`` and zeros under the others."""
    return {name: loss_grads if name == "ce" else [torch.zeros_like(g) for g in loss_grads] for name in TERMS}


def run_oracle(problem: Problem, cotangent, **overrides):
    kwargs = dict(problem.kwargs, **overrides)
    ignore_index = kwargs.get("ignore_index", -100)
    leaves = _leaves(problem, torch.float64)
    d = problem.input.shape[-1]
    flat_target = problem.target.reshape(-1)
    class_weight = kwargs.get("weight")
    ce, quad, sign, z_term = oracle_rows(leaves[0].reshape(-1, d), leaves[1],
                                         leaves[2] if len(leaves) == 3 else None, flat_target,
                                         problem.signs.reshape(-1, d), ignore_index=ignore_index,
                                         class_weight=class_weight,
                                         label_smoothing=kwargs.get("label_smoothing", 0.0),
                                         z_loss=kwargs.get("z_loss", 0.0), softcap=kwargs.get("softcap"))
    coef_r, coef_i = dropreg.default_coefficients(kwargs.get("p", 0.1))
    coef_r = kwargs.get("explicit_coef") if kwargs.get("explicit_coef") is not None else coef_r
    coef_i = kwargs.get("implicit_coef") if kwargs.get("implicit_coef") is not None else coef_i
    rows = [ce, coef_r * quad if kwargs.get("explicit", True) else 0 * quad,
            coef_i * sign if kwargs.get("implicit", True) else 0 * sign, z_term]
    reduction = kwargs.get("reduction", "mean")
    kept = flat_target != ignore_index
    if class_weight is None:
        n_valid = max(int(kept.sum()), 1)
    else:  # F.cross_entropy's "mean" divides by the weights of the rows kept
        n_valid = float(class_weight[flat_target[kept]].sum()) if kept.any() else 1.0
    if reduction == "none":
        terms = [r.reshape(problem.target.shape) for r in rows]
    elif reduction == "sum":
        terms = [r.sum() for r in rows]
    else:
        terms = [r.sum() / n_valid for r in rows]
    return _terms_and_grads(terms, leaves, cotangent)


# Machine epsilon (torch.finfo(dtype).eps) of each tested dtype.
EPS = {torch.float64: 2.0**-52, torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def oracle_scales(problem: Problem) -> tuple[float, float]:
    """``(z_scale, explicit_extra)``: ``1 + max|z|`` and the explicit term's cancellation scale
    ``coef * max_n sum_j q_j m2_j * max(1, max|W|)``; :func:`assert_close_to_oracle` says why."""
    h, w = problem.input.reshape(-1, problem.input.shape[-1]), problem.weight
    logits = h @ w.T + (problem.bias if problem.bias is not None else 0)
    probs = torch.softmax(logits, dim=-1)
    cancel = float(((h * h) * (probs @ (w * w))).sum(-1).max()) if h.numel() else 0.0
    coef_r = dropreg.default_coefficients(problem.kwargs.get("p", 0.1))[0]
    coef_r = problem.kwargs.get("explicit_coef") or coef_r
    z_scale = 1.0 + float(logits.abs().max()) if logits.numel() else 1.0
    return z_scale, coef_r * cancel * max(1.0, float(w.abs().max()))


def labelled(values_and_grads, names=TERMS, leaves=("input", "weight", "bias")):
    """``{label: tensor}`` for every term value and every gradient: ``"ce"``, ``"dce/dinput"``, ..."""
    values, grads = values_and_grads
    out = {}
    for name in names:
        out[name] = values[name]
        out.update({f"d{name}/d{leaf}": g for leaf, g in zip(leaves, grads[name])})
    return out


# A randn cotangent per row (reduction "none") stays below this in the suite's sizes (|N(0,1)| > 4: 6e-5 per row).
COTANGENT_BOUND = 4.0


def summand_floors(problem: Problem) -> dict[str, float]:
    """Per label (``"ce"``, ``"dexplicit/dweight"``, ..., ``"loss"``), the size of the summands its sums add, in the
    quantity's own units: rounding errs relative to them even where the sum cancels to 0 (V=1: every term and
    gradient is 0). With ``H = max|h|``, ``W = max|W|``, ``Q = max_n sum_k h_nk^2``, ``A = max_n sum_k |h_nk|``:

    =========  ===========  ======================  =========================  ===========
    term       value        d/dinput                d/dweight                  d/dbias
    =========  ===========  ======================  =========================  ===========
    ce         1            W                       H                          1
    explicit   c Q W^2      c (H W^2 + Q W^3)       c (Q W + Q W^2 H)          c Q W^2
    implicit   c A W        c (W + A W^2)           c (A + A W H)              c A W
    z_loss     c Z^2        c Z W                   c Z H                      c Z
    =========  ===========  ======================  =========================  ===========

    (c the term's coefficient; ce's and z-loss's in logit units, ``Z = 1 + max|z| + log V`` bounding ``|lse|``; the second parts are the
    terms' dependence through the softmax, ``ds/dz = O(1)`` times ``dz/dh = W`` or ``dz/dW = h``). Each is scaled by
    what reaches one summand from upstream: a row's weight under the reduction (``1/n`` for "mean", 1 for "sum",
    the cotangent bound for "none", times the largest class weight), and for the weight and bias gradients, which
    sum over rows, by the row count. ``"loss"`` and its gradients take the sum over the terms."""
    kwargs = problem.kwargs
    d = problem.input.shape[-1]
    h, w = problem.input.reshape(-1, d), problem.weight
    logits = h @ w.T + (problem.bias if problem.bias is not None else 0)
    big_h = float(h.abs().max()) if h.numel() else 0.0
    big_w = float(w.abs().max()) if w.numel() else 0.0
    q = float((h * h).sum(-1).max()) if h.numel() else 0.0
    a = float(h.abs().sum(-1).max()) if h.numel() else 0.0
    # z-loss sums lse^2: |lse| <= max|z| + log V, log V being its size on flat rows (where max|z| is 0)
    z = 1.0 + (float(logits.abs().max()) if logits.numel() else 0.0) + math.log(max(w.shape[0], 1))
    coef_r, coef_i = dropreg.default_coefficients(kwargs.get("p", 0.1))
    coef_r = kwargs.get("explicit_coef") if kwargs.get("explicit_coef") is not None else coef_r
    coef_i = kwargs.get("implicit_coef") if kwargs.get("implicit_coef") is not None else coef_i
    coef_z = kwargs.get("z_loss", 0.0) or 0.0
    units = {
        "ce": (1.0, big_w, big_h, 1.0),
        "explicit": tuple(coef_r * u for u in (q * big_w ** 2, big_h * big_w ** 2 + q * big_w ** 3,
                                                 q * big_w + q * big_w ** 2 * big_h, q * big_w ** 2)),
        "implicit": tuple(coef_i * u for u in (a * big_w, big_w + a * big_w ** 2, a + a * big_w * big_h, a * big_w)),
        "z_loss": tuple(coef_z * u for u in (z * z, z * big_w, z * big_h, z)),
    }
    target = problem.target.reshape(-1)
    kept = target != kwargs.get("ignore_index", -100)
    rows = max(int(kept.sum()), 1)
    class_weight = kwargs.get("weight")
    largest = float(class_weight.abs().max()) if class_weight is not None else 1.0
    reduction = kwargs.get("reduction", "mean")
    if reduction == "mean":  # "mean" divides by the count (or the kept rows' class weights)
        total = float(class_weight[target[kept]].sum()) if class_weight is not None and kept.any() else rows
        per_row = largest / max(total, 1e-300)
    else:
        per_row = largest * (COTANGENT_BOUND if reduction == "none" else 1.0)
    value_scale = per_row * rows if reduction != "none" else per_row
    floors = {}
    for name, (value, d_input, d_weight, d_bias) in units.items():
        floors[name] = value * value_scale
        floors[f"d{name}/dinput"] = d_input * per_row
        floors[f"d{name}/dweight"] = d_weight * per_row * rows
        floors[f"d{name}/dbias"] = d_bias * per_row * rows
    for suffix in ("", "/dinput", "/dweight", "/dbias"):
        floors[f"{'d' if suffix else ''}loss{suffix}"] = sum(floors[f"{'d' if suffix else ''}{name}{suffix}"]
                                                           for name in units)
    return floors


def assert_close_to_oracle(ours, oracle, dtype, problem: Problem, factor=8.0):
    """``|ours - oracle| <= factor * eps * (1 + max|z|) * scale`` per term and per gradient.

    Rounding in a softmax-weighted sum is relative to the summands, not to the result: ``scale`` is the
    largest oracle magnitude of that quantity plus, for the explicit term, docs/math.md's cancellation size
    ``coef * max_n sum_j q_j m2_j`` (``var = m2 - mu^2`` loses that much when the softmax is peaked),
    plus the size of the quantity's summands (:func:`summand_floors`), so that quantities that are exactly zero
    (V=1) still allow rounding-level noise, in their own units.
    Errors in ``z - lse`` grow with the logit magnitude, hence ``1 + max|z|``; with a softcap ``z`` is the raw
    (uncapped) logit: it carries an absolute error of eps |z|, and tanh's derivative ``1 - t^2`` an absolute error
    of eps that multiplies ``|W|``, both in ours and in the oracle's autograd. ``factor`` covers the
    accumulation length of the small problems used here; a wrong formula misses by O(1) relative.
    """
    z_scale, explicit_extra = oracle_scales(problem)
    floors = summand_floors(problem)
    oracle_labelled = labelled(oracle)
    for label, value in labelled(ours).items():
        extra = explicit_extra if label.split("/")[0] in ("explicit", "dexplicit") else 0.0
        assert_within_rounding(label, value, oracle_labelled[label], dtype, z_scale, extra, factor,
                               floor=floors[label])


def assert_within_rounding(label, ours, oracle, dtype, z_scale, extra=0.0, factor=8.0, *, floor):
    """``max|ours - oracle| <= factor * eps * z_scale * (max|oracle| + extra + floor)``; ``floor``: the size of the
    quantity's summands (:func:`summand_floors`)."""
    scale = (float(oracle.abs().max()) if oracle.numel() else 0.0) + extra
    tol = factor * EPS[dtype] * z_scale * (scale + floor)
    err = float((ours - oracle).abs().max()) if ours.numel() else 0.0
    assert err <= tol, (f"{label}: max error {err:.3e} exceeds tolerance {tol:.3e} (scale {scale:.3e}, "
                        f"floor {floor:.3e})")


def strided(t: torch.Tensor, layout: str) -> torch.Tensor:
    """An equal tensor that is not contiguous. ``"transposed"``: column-major (2-D; 1-D is sliced instead);
    ``"sliced"``: every other element of a buffer whose other elements are NaN, so a kernel that ignores the
    strides reads NaN. The result is a leaf, so it can require grad itself."""
    if layout == "transposed" and t.dim() == 2:
        out = t.detach().T.contiguous().T
    else:
        out = torch.stack([t.detach(), torch.full_like(t.detach(), float("nan"))], dim=-1)[..., 0]
    assert torch.equal(out, t) and not out.is_contiguous()
    return out


def assert_beats_same_dtype(label, ours, same_dtype, oracle, dtype, k=1.0, c=2.0, scale=None):
    """Low-precision criterion (Cut Cross-Entropy's), for one term or one gradient:

    ``max|ours - fp64| <= k * max|same_dtype - fp64| + c * eps * scale + c * tiny``

    ``fp64`` is the float64 oracle on the same (already rounded) inputs; ``same_dtype`` is the plain
    materialized computation run in ``dtype`` end to end (no upcast), what PyTorch code without dropreg
    gets. k = 1: dropreg accumulates in fp32 and must be no worse than that. The second term covers what
    fp32 accumulation cannot remove and the same-dtype error may by chance not show (its max error over a
    few elements can be near zero): the final rounding of every output to ``dtype`` (eps/2 relative) and,
    in the Triton kernels, the cross-entropy GEMM operands P and G rounded to ``dtype`` (about eps times
    ``sum_v |G_v| |W_v|``, the size of the gradient); c = 2 allows both. The explicit term's cancellation
    scale (:func:`assert_close_to_oracle`) is not in it: with fp32 accumulation dropreg's cancellation error
    is 2^16 times smaller than eps, while the same-dtype computation pays it in full. Measured over 201
    random problems per dtype and softmax shape (flat, typical, peaked; test_low_precision's scales) the largest c
    needed with k = 1 was 0.51 ("chunked"; 0 for "torch" and "cpu" over 61), so a real error (O(1) relative,
    or fp16/bf16 accumulation) fails and rounding does not.
    ``tiny`` is the dtype's smallest subnormal: outputs below the normal range are held to that absolute
    spacing.

    ``scale`` is the size of what was summed, ``max|fp64|`` by default. A term averaged over rows passes the mean of
    its per-row ``|fp64|`` values: per-row terms of both signs can cancel to a total far below them (the implicit
    term on flat rows: 1000 times smaller), while the rounding of P for the moment GEMM errs per row, so its error
    is relative to the rows, not to the total (seed 2647726709 needed c = 3.5 against ``max|fp64|``).
    """
    ours_err = float((ours.double() - oracle).abs().max()) if oracle.numel() else 0.0
    same_err = float((same_dtype.double() - oracle).abs().max()) if oracle.numel() else 0.0
    if scale is None:
        scale = float(oracle.abs().max()) if oracle.numel() else 0.0
    tiny = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    tol = k * same_err + c * (EPS[dtype] * scale + tiny)
    assert ours_err <= tol, (f"{label}: error {ours_err:.3e} exceeds {tol:.3e} (same-dtype error {same_err:.3e}, "
                             f"scale {scale:.3e})")


class RecordOps(TorchDispatchMode):
    """Names of the ops that run (custom ops included), e.g. ``"dropreg.linear_ce_forward.default"``."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def assert_ignore_index_acts_as_minus_100(run, target, ignore_index, leaves):
    """``run(target, ignore_index)`` returns output tensors differentiable in ``leaves``. Rows marked by a custom
    ``ignore_index`` must give the outputs and gradients of the same rows marked -100, the convention the oracle
    suites check."""
    assert bool((target == ignore_index).any()), "the case must ignore some row"
    renamed = torch.where(target == ignore_index, torch.full_like(target, -100), target)
    results, cotangents = [], None
    for t, index in ((target, ignore_index), (renamed, -100)):
        outputs = run(t, index)
        if cotangents is None:
            cotangents = [torch.randn(o.shape, dtype=torch.float64) for o in outputs]
        total = sum((o.double() * c).sum() for o, c in zip(outputs, cotangents))
        grads = torch.autograd.grad(total, leaves)
        results.append(([o.detach() for o in outputs], grads))
    for ours, renamed_result in zip(*[values + list(grads) for values, grads in results]):
        torch.testing.assert_close(ours, renamed_result, rtol=1e-12, atol=1e-12)
