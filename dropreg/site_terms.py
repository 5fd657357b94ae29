"""Dropout's terms at every site (docs/math.md 11), shared by :func:`dropreg.site_regularizers` and
``linear_cross_entropy(..., sites=...)``: the checks of the site arguments and the vector-Jacobian products through
the network.

For a site ``x`` and classes ``t``, ``g_x(t)`` is the gradient w.r.t. ``x`` of the summed per-row cross entropy:
one vector-Jacobian product of the head input w.r.t. ``x`` with the cotangent ``mu - W[t]`` per row. The label's
and every draw's products go through the network together, as one batched product where autograd can batch the
network's backward, else one after another.
"""
from __future__ import annotations

import functools
import numbers
from typing import Callable, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

from . import distributed
from ._checks import check_coefficient, check_probability, checking_values
from .signs import philox_signs

PerSite = Union[float, Sequence[float], None]


def per_site(name: str, value, n_sites: int) -> list[tuple[str, object]]:
    """``(argument name for errors, value)`` per site, from one value or a sequence of one per site."""
    if isinstance(value, (list, tuple)):
        if len(value) != n_sites:
            raise ValueError(f"{name}: expected one value per site ({n_sites}), got {len(value)}")
        return [(f"{name}[{k}]", v) for k, v in enumerate(value)]
    return [(name, value)] * n_sites


def check_samples(samples) -> int:
    if not isinstance(samples, numbers.Integral) or isinstance(samples, bool):
        raise TypeError(f"samples: expected a positive int, got {samples!r}")
    if samples < 1:
        raise ValueError(f"samples: expected a positive int, got {samples}")
    return int(samples)


def check_sites(sites, head_input: Tensor, *, allow_empty: bool = False,
                input_name: str = "head_input") -> list[Tensor]:
    """The site tensors: floating point, on ``head_input``'s device, in its autograd graph (``input_name``: what the
    caller calls the head input)."""
    name = "sites"
    if isinstance(sites, Tensor) or not isinstance(sites, Sequence) or (not sites and not allow_empty):
        raise TypeError(f"{name}: expected a {'' if allow_empty else 'non-empty '}sequence of tensors (the activations "
                        f"where dropout would act)")
    for k, site in enumerate(sites):
        if not isinstance(site, Tensor) or not site.dtype.is_floating_point:
            raise TypeError(f"{name}[{k}]: expected a floating-point torch.Tensor, got "
                            f"{type(site).__name__ if not isinstance(site, Tensor) else site.dtype}")
        if site.device != head_input.device:
            raise ValueError(f"{name}[{k}]: expected a tensor on {input_name}'s device {head_input.device}, "
                             f"got {site.device}")
        if not site.requires_grad:
            raise ValueError(f"{name}[{k}]: expected a tensor in {input_name}'s autograd graph (requires_grad=True)")
    return list(sites)


def check_site_signs(signs, sites: list[Tensor], name: str = "signs") -> list[Tensor]:
    if not isinstance(signs, (list, tuple)) or len(signs) != len(sites):
        raise TypeError(f"{name}: expected a sequence of {len(sites)} tensors of +-1 (one per site)")
    checked = []
    for k, (sign, site) in enumerate(zip(signs, sites)):
        if not isinstance(sign, Tensor) or sign.dtype == torch.bool or sign.dtype.is_complex:
            raise TypeError(f"{name}[{k}]: expected a real tensor of +-1 values")
        try:
            sign = sign.to(site.device).expand(site.shape)
        except RuntimeError:
            raise ValueError(f"{name}[{k}]: expected a shape broadcastable to the site's {tuple(site.shape)}, "
                             f"got {tuple(sign.shape)}") from None
        if checking_values() and sign.numel() and not bool(((sign == 1) | (sign == -1)).all()):
            raise ValueError(f"{name}[{k}]: expected every value to be +1 or -1")
        checked.append(sign)
    return checked


def check_sampled_targets(sampled, head_input: Tensor, vocab: Optional[int], valid: Tensor,
                          input_name: str = "head_input") -> Tensor:
    """``(samples, N)`` int64 classes from ``(samples, *head_input.shape[:-1])``; in range on the rows kept."""
    if not isinstance(sampled, Tensor) or sampled.dtype.is_floating_point or sampled.dtype == torch.bool:
        raise TypeError(f"sampled_targets: expected an integer tensor of shape (samples, *{input_name}.shape[:-1])")
    if sampled.dim() != head_input.dim() or tuple(sampled.shape[1:]) != tuple(head_input.shape[:-1]) \
            or sampled.shape[0] < 1:
        raise ValueError(f"sampled_targets: expected shape (samples, {', '.join(map(str, head_input.shape[:-1]))}) "
                         f"with samples >= 1, got {tuple(sampled.shape)}")
    if sampled.device != head_input.device:
        raise ValueError(f"sampled_targets: expected a tensor on {input_name}'s device {head_input.device}, "
                         f"got {sampled.device}")
    flat = sampled.reshape(sampled.shape[0], -1).long()
    if vocab is not None and checking_values() and flat.numel() and \
            bool((((flat < 0) | (flat >= vocab)) & valid).any()):
        raise ValueError(f"sampled_targets: expected class indices in [0, {vocab}) on the rows that are not ignored")
    return flat


def site_coefficients(p: PerSite, explicit_coef: PerSite, implicit_coef: PerSite, explicit: bool, implicit: bool,
                      n_sites: int, default_coefficients, names=("p", "explicit_coef", "implicit_coef")):
    """``(explicit_coefs, implicit_coefs)``, one per site; a kind switched off gives zeros."""
    p_name, explicit_name, implicit_name = names
    ps = [check_probability(value, name) for name, value in per_site(p_name, p, n_sites)]
    explicit_coefs = [check_coefficient(name, value, default_coefficients(p_k)[0]) if explicit else 0.0
                      for (name, value), p_k in zip(per_site(explicit_name, explicit_coef, n_sites), ps)]
    implicit_coefs = [check_coefficient(name, value, default_coefficients(p_k)[1]) if implicit else 0.0
                      for (name, value), p_k in zip(per_site(implicit_name, implicit_coef, n_sites), ps)]
    return explicit_coefs, implicit_coefs


class SiteClasses(NamedTuple):
    """The classes whose cross-entropy gradients the site terms need: the label per row (``target``, a valid class
    on ignored rows too) and ``draws`` ``(samples, N)`` from the softmax (None without the explicit term)."""
    target: Tensor
    draws: Optional[Tensor]


def site_sums(head_input: Tensor, sites: list[Tensor], mu: Tensor, weight_rows: Callable[[Tensor], Tensor],
              valid: Tensor, classes: SiteClasses, explicit_coefs: list[float], implicit_coefs: list[float],
              signs: Optional[list[Tensor]], seed: int, input_name: str = "head_input") -> tuple[Tensor, Tensor]:
    """``(explicit, implicit)`` summed over sites and rows, unreduced, in ``mu``'s dtype (docs/math.md 11.1):
    ``explicit = sum_k c_R,k / S sum_draws sum (x_k g_xk(draw))^2``, ``implicit = sum_k c_I,k sum sigma_k x_k
    g_xk(target)``. ``mu`` (N, d) is differentiable; ``weight_rows(classes)`` gives ``W[classes]`` (N, d)."""
    acc = mu.dtype
    need_implicit = any(c != 0.0 for c in implicit_coefs)
    cotangents = []  # the label's first, then one per draw
    if need_implicit:
        cotangents.append(classes.target)
    if classes.draws is not None:
        cotangents += [torch.where(valid, draw, classes.target) for draw in classes.draws]
    row_mask = valid[:, None]
    zero = torch.zeros((), dtype=acc, device=mu.device)
    stacked = torch.stack([torch.where(row_mask, mu - weight_rows(c).to(acc), zero) for c in cotangents])
    grads = site_gradients(head_input, sites, stacked.reshape(len(cotangents), *head_input.shape), input_name)
    explicit_total = implicit_total = mu.new_zeros(())
    if need_implicit:
        for k, (x, g) in enumerate(zip(sites, grads)):
            if implicit_coefs[k] == 0.0:
                continue
            sigma = signs[k] if signs is not None else \
                philox_signs(seed, 1, x.numel(), stream=k + 1, device=x.device, dtype=acc).reshape(x.shape)
            implicit_total = implicit_total + implicit_coefs[k] * (sigma.to(acc) * x.to(acc) * g[0].to(acc)).sum()
    if classes.draws is not None:
        first_draw = 1 if need_implicit else 0
        n_draws = classes.draws.shape[0]
        for k, (x, g) in enumerate(zip(sites, grads)):
            if explicit_coefs[k] == 0.0:
                continue
            scaled = x.to(acc) * g[first_draw:].to(acc)
            explicit_total = explicit_total + (explicit_coefs[k] / n_draws) * (scaled * scaled).sum()
    return explicit_total, implicit_total


def site_gradients(head_input: Tensor, sites: list[Tensor], cotangents: Tensor, input_name: str = "head_input"
                   ) -> list[Tensor]:
    """For each site, ``(B, *site.shape)``: the vector-Jacobian products of ``head_input`` w.r.t. it with each of
    the ``B`` cotangents (``cotangents``: ``(B, *head_input.shape)``), differentiable (``create_graph``)."""
    cotangents = cotangents.to(head_input.dtype)
    if cotangents.shape[0] == 1:
        grads = [None if g is None else g.unsqueeze(0) for g in
                 torch.autograd.grad(head_input, sites, cotangents[0], create_graph=True, allow_unused=True)]
    else:
        grads = torch.autograd.grad(head_input, sites, cotangents, create_graph=True, allow_unused=True,
                                    is_grads_batched=True)
    for k, g in enumerate(grads):
        if g is None:
            raise ValueError(f"sites[{k}]: not in {input_name}'s autograd graph ({input_name} does not depend on it)")
    return list(grads)


def class_rows(reducer, weight: Tensor, classes: Tensor) -> Tensor:
    """``weight[classes]``; on a head sliced over the vocabulary (``reducer`` not None), each row from the slice that
    owns it."""
    return weight[classes] if reducer is None else reducer.at_classes([weight], classes)[0]


def sampler(implementation, call):
    """Gumbel-max draws over the whole vocabulary: the backend's, or merged over the slices of a sharded call."""
    if call.sharded:
        return functools.partial(distributed.sharded_sample_targets, call.reducer)
    return implementation.sample_targets
