"""Dropout's regularizers at every dropout site, as Wei, Kakade & Ma apply them (docs/math.md, every-site terms).

For a site ``x`` (an activation where dropout would act) and targets ``t``, let ``g_x(t)`` be the gradient
w.r.t. ``x`` of the summed per-row cross entropy of the LM head. Since ``dCE_row/dh = mu - W[t]`` with
``mu = W^T softmax(z)``, ``g_x(t)`` is one vector-Jacobian product of ``head_input`` w.r.t. ``x`` with that
cotangent: the fused head only has to provide a differentiable ``mu`` (:func:`softmax_mean`) and classes
drawn from the softmax (:func:`sample_targets`), both streamed; autograd (``create_graph=True``) does the
rest through the network.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from ._api import IgnoredRows, on_reducer
from ._autocast import autocast_aware, loss_dtype, result_dtype
from ._checks import check_head, check_seed, check_target, checked_seed, checking_values, default_coefficients
from . import distributed
from ._dispatch import resolve_backend, resolve_slice_backend
from ._policy import accumulation_dtype
from .site_terms import (PerSite, SiteClasses, check_sampled_targets, check_samples, check_site_signs, check_sites,
                         class_rows, sampler, site_coefficients, site_sums)

class SiteRegularizers(NamedTuple):
    """Sums over the sites; scalars in ``head_input``'s dtype."""

    explicit: Tensor
    implicit: Tensor


@autocast_aware("input", "linear_weight", "linear_bias")
def softmax_mean(input: Tensor, linear_weight: Tensor, *, linear_bias: Optional[Tensor] = None,
                 backend: str = "auto", process_group=None) -> Tensor:
    """Per row, ``mu = W^T softmax(input @ W^T + b)``: the softmax-weighted mean row of ``linear_weight``.

    Shape ``input.shape``, dtype ``input.dtype`` (accumulated in fp32, fp64 for fp64). Differentiable w.r.t.
    ``input``, ``linear_weight`` and ``linear_bias``; forward and backward stream the vocabulary (no N x V
    tensor except with ``backend="reference"``). ``mu - W[y]`` is the gradient of the row's cross entropy
    w.r.t. ``input``. ``process_group``: a vocabulary-parallel head, as in :func:`dropreg.linear_cross_entropy`.
    Under ``torch.autocast`` the operands are cast as ``F.linear`` casts them and mu comes back in fp32.
    """
    with distributed.checked_call(process_group, "softmax_mean") as call:
        check_head(input, linear_weight, linear_bias)
        implementation = _implementation("softmax_mean", call, backend, input.device)
        call.describe(input, linear_weight, linear_bias)
    mu = implementation.softmax_mean(input.reshape(-1, input.shape[-1]), linear_weight, linear_bias,
                                     **on_reducer(call.reducer))
    return mu.reshape(input.shape).to(result_dtype(input.dtype))


def _check_finite(name: str, value: Optional[Tensor]) -> None:
    if value is not None and checking_values() and value.numel() and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name}: expected finite values to sample from (found NaN or inf)")


def _check_logits_in_range(input: Tensor, weight: Tensor, bias: Optional[Tensor]) -> None:
    """Refuses rows whose logits could leave the accumulation dtype's range: Gumbel-max compares ``z + noise``, and
    an overflowed ``z`` (inf) has no defined draw (each backend would break the tie its own way). The bound is
    Cauchy-Schwarz, ``|z_v| <= |h| max_v |W_v| + max_v |b_v|``, so no row that fits is refused unless it comes
    within that bound's slack of the limit. O((N + V) d)."""
    if not checking_values() or not input.numel() or not weight.numel():
        return
    limit = torch.finfo(accumulation_dtype(input.dtype)).max

    def row_norms(t: Tensor) -> Tensor:  # scaled by each row's largest entry, so the squares cannot overflow
        t = t.detach().reshape(-1, t.shape[-1]).to(accumulation_dtype(t.dtype))
        scale = t.abs().amax(dim=1, keepdim=True).clamp(min=torch.finfo(t.dtype).tiny)
        return (t / scale).norm(dim=1) * scale.squeeze(1)

    largest_bias = 0.0
    if bias is not None:
        finite = bias.detach()[torch.isfinite(bias.detach())]  # -inf entries mask their class
        largest_bias = float(finite.abs().max()) if finite.numel() else 0.0
    bound = row_norms(input).double() * float(row_norms(weight).max()) + largest_bias
    worst = int(bound.argmax())
    if float(bound[worst]) > limit / 2:
        raise ValueError(f"input: the logits of row {worst} can reach {float(bound[worst]):.3g} (|h| max_v |W_v| + "
                         f"max_v |b_v|), beyond what {accumulation_dtype(input.dtype)} holds ({limit:.3g}): "
                         f"sample_targets has no defined draw for an overflowed row; scale input or linear_weight down")


@autocast_aware("input", "linear_weight", "linear_bias")
def sample_targets(input: Tensor, linear_weight: Tensor, *, linear_bias: Optional[Tensor] = None, samples: int = 1,
                   seed: Optional[int] = None, backend: str = "auto", process_group=None) -> Tensor:
    """``samples`` exact draws from each row's softmax, shape ``(samples, *input.shape[:-1])``, int64.

    Gumbel-max streamed over the vocabulary: class ``v`` of row ``n`` in draw ``k`` gets counter-based Philox
    noise keyed by ``(seed, k, n, v)`` (:mod:`dropreg.signs`), so every backend and every tiling draws the
    same classes for a given seed. ``seed=None`` draws one from torch's default generator. No gradient.
    A bias entry of ``-inf`` masks its class; NaN or +inf inputs, or a bias that masks every class, are an error.
    A row whose logits could overflow the accumulation dtype (fp32 for bf16/fp16/fp32 inputs: finite inputs near
    1e19 and above) is refused with a ValueError: it has no defined draw.
    ``process_group``: a
    vocabulary-parallel head, as in :func:`dropreg.linear_cross_entropy`; the draws are the single-process ones
    for the same seed (``seed=None`` takes rank 0's draw).
    """
    with distributed.checked_call(process_group, "sample_targets") as call:
        check_head(input, linear_weight, linear_bias)
        samples = check_samples(samples)
        given_seed = seed
        seed = check_seed(seed)
        for name, value in (("input", input), ("linear_weight", linear_weight)):
            _check_finite(name, value)
        if linear_bias is not None and checking_values():
            if bool((torch.isnan(linear_bias) | (linear_bias == float("inf"))).any()):
                raise ValueError("linear_bias: expected no NaN or +inf entries (-inf masks a class)")
            # On a slice the other ranks may hold the unmasked classes.
            if not call.sharded and linear_bias.numel() and bool((linear_bias == float("-inf")).all()):
                raise ValueError("linear_bias: every class is masked (-inf): there is no distribution to sample from")
        _check_logits_in_range(input, linear_weight, linear_bias)
        implementation = _implementation("sample_targets", call, backend, input.device)
        call.describe(input, linear_weight, linear_bias, seed=seed, options=(samples, given_seed))
    if call.sharded:
        seed = call.seed
    with torch.no_grad():
        drawn = sampler(implementation, call)(input.detach().reshape(-1, input.shape[-1]), linear_weight.detach(),
                                               None if linear_bias is None else linear_bias.detach(), samples, seed)
    return drawn.reshape(samples, *input.shape[:-1])


def _implementation(op: str, call, backend, device):
    """The backend that runs ``op`` here: on this rank's vocabulary slice when the call is sharded."""
    if call.sharded:
        return resolve_slice_backend(op, backend, device)
    return resolve_backend(backend, device)[1]


@autocast_aware("head_input", "linear_weight", "linear_bias")
def site_regularizers(head_input: Tensor, linear_weight: Tensor, target: Tensor, sites: Sequence[Tensor], *,
                      linear_bias: Optional[Tensor] = None, p: PerSite = 0.1, explicit: bool = True,
                      implicit: bool = True, explicit_coef: PerSite = None, implicit_coef: PerSite = None,
                      samples: int = 1, sampled_targets: Optional[Tensor] = None,
                      signs: Optional[Sequence[Tensor]] = None, seed: Optional[int] = None,
                      ignore_index: int = -100, reduction: str = "mean", backend: str = "auto",
                      process_group=None) -> SiteRegularizers:
    """Dropout's explicit and implicit regularizers at every site, the way Wei, Kakade & Ma's code applies them.

    With ``g_x(t) = d(sum over rows of CE_row(t)) / dx`` (ignored rows excluded):

    * ``explicit = sum over sites of explicit_coef * sum_elements (x * g_x(y_hat))^2``, averaged over ``samples``
      draws ``y_hat`` from the model's softmax: an unbiased estimate of ``x_j^2 (J^T (diag s - s s^T) J)_jj``,
      the Gauss-Newton part of dropout's second-order term;
    * ``implicit = sum over sites of implicit_coef * sum_elements sigma * x * g_x(target)``, random signs sigma.

    ``p``, ``explicit_coef``, ``implicit_coef``: one number or one per site; the coefficients default to
    ``kappa / 2`` and ``sqrt(kappa)`` with ``kappa = p / (1 - p)`` of that site. ``sites`` must be in
    ``head_input``'s autograd graph; a site may be ``head_input`` itself. ``"mean"`` divides both terms by the
    number of non-ignored rows, ``"sum"`` does not (``"none"`` is refused: a site element can feed many rows).
    ``sampled_targets`` ``(samples, *target.shape)`` replaces the draws and ``signs`` (one +-1 tensor per site)
    the Philox signs (site k uses sign stream k + 1 of ``seed``; draws come from :func:`sample_targets`).
    Both terms are differentiable: ``(ce + reg.explicit + reg.implicit).backward()`` trains the whole network.
    Under ``torch.autocast`` the head's operands are cast as ``F.linear`` casts them and both terms come back in fp32.
    """
    with distributed.checked_call(process_group, "site_regularizers") as call:
        vocab, _ = check_head(head_input, linear_weight, linear_bias, name="head_input")
        if call.sharded:
            vocab = None  # the ranks check class ranges together, against the full vocabulary
        check_target(target, head_input, vocab, ignore_index, input_name="head_input")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction: expected 'mean' or 'sum' (a site element can feed many rows, so there is "
                             f"no per-row 'none'), got {reduction!r}")
        sites = check_sites(sites, head_input)
        if not head_input.requires_grad:
            raise ValueError("head_input: expected a tensor that requires grad (the output of the network whose "
                             "sites are regularized)")
        explicit_coefs, implicit_coefs = site_coefficients(p, explicit_coef, implicit_coef, explicit, implicit,
                                                           len(sites), default_coefficients)
        need_explicit = any(c != 0.0 for c in explicit_coefs)
        need_implicit = any(c != 0.0 for c in implicit_coefs)
        rows = IgnoredRows(target, ignore_index, head_input.dtype)
        classes = [("target", target, target != ignore_index)]
        if sampled_targets is not None:
            sampled_targets = check_sampled_targets(sampled_targets, head_input, vocab, rows.valid)
            classes.append(("sampled_targets", sampled_targets, rows.valid.expand_as(sampled_targets)))
        else:
            samples = check_samples(samples)
        if signs is not None:
            signs = check_site_signs(signs, sites)
        needs_seed = (need_implicit and signs is None) or (need_explicit and sampled_targets is None)
        given_seed = seed
        seed = checked_seed(seed, needs_seed)
        implementation = _implementation("site_regularizers", call, backend, head_input.device)
        call.describe(head_input, linear_weight, linear_bias, seed=seed, target=target, classes=classes,
                      options=(reduction, explicit_coefs, implicit_coefs, samples if sampled_targets is None else None,
                               ignore_index, signs is None, given_seed, len(sites)),
                      given=[("sampled_targets", sampled_targets),
                             *((f"signs[{k}]", sign) for k, sign in enumerate(signs or ())),
                             *((f"sites[{k}]", site) for k, site in enumerate(sites))])
    weight_rows = functools.partial(class_rows, call.reducer if call.sharded else None, linear_weight)
    if call.sharded:
        seed = call.seed
    zero = head_input.new_zeros((), dtype=rows.count.dtype)
    if not (need_explicit or need_implicit):
        return SiteRegularizers(zero.to(loss_dtype(head_input.dtype)), zero.to(loss_dtype(head_input.dtype)))
    flat_input = rows.zero_ignored(head_input)
    mu = implementation.softmax_mean(flat_input, linear_weight, linear_bias, **on_reducer(call.reducer))
    if need_explicit and sampled_targets is None:
        sampled_targets = sampler(implementation, call)(flat_input.detach(), linear_weight.detach(),
                                                        None if linear_bias is None else linear_bias.detach(),
                                                        samples, seed)
    explicit_total, implicit_total = site_sums(
        head_input, sites, mu, weight_rows, rows.valid, SiteClasses(rows.safe_target, sampled_targets if need_explicit
                                                                    else None),
        explicit_coefs, implicit_coefs, signs, seed)
    if reduction == "mean":
        explicit_total, implicit_total = explicit_total / rows.count, implicit_total / rows.count
    out_dtype = loss_dtype(head_input.dtype)
    return SiteRegularizers(explicit_total.to(out_dtype), implicit_total.to(out_dtype))
