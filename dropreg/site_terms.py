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
from ._checks import check_coefficient, check_probability, checking_values, default_coefficients
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
    if isinstance(sites, (Tensor, str)) or not isinstance(sites, Sequence) or (not sites and not allow_empty):
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


_SITE_ARGUMENTS = ("site_p", "site_explicit_coef", "site_implicit_coef", "samples", "sampled_targets", "site_signs")


class SiteCall(NamedTuple):
    """The site arguments of ``linear_cross_entropy(..., sites=...)``, checked (:meth:`check`); ``active`` when a
    site term is on."""
    sites: list
    explicit_coefs: list
    implicit_coefs: list
    samples: int
    sampled_targets: Optional[Tensor]
    signs: Optional[list]
    classes: list  # the class tensors the cross-rank handshake checks: (name, classes, rows kept)

    @property
    def need_explicit(self) -> bool:
        return any(c != 0.0 for c in self.explicit_coefs)

    @property
    def need_implicit(self) -> bool:
        return any(c != 0.0 for c in self.implicit_coefs)

    @property
    def active(self) -> bool:
        return bool(self.sites) and (self.need_explicit or self.need_implicit)

    @property
    def needs_seed(self) -> bool:
        return self.active and ((self.need_implicit and self.signs is None) or
                                (self.need_explicit and self.sampled_targets is None))

    @staticmethod
    def check(input, target, vocab, ignore_index, reduction, options, head_terms_on, explicit, implicit, sites,
              site_p, site_explicit_coef, site_implicit_coef, samples, sampled_targets, site_signs) -> "SiteCall":
        if sites is None:
            given = [name for name, value in zip(_SITE_ARGUMENTS, (site_p, site_explicit_coef, site_implicit_coef,
                                                                   samples, sampled_targets, site_signs))
                     if value is not None]
            if given:
                raise TypeError(f"{given[0]}: only used with sites= (the activations where dropout would act)")
            return SiteCall([], [], [], 1, None, None, [])
        sites = check_sites(sites, input, allow_empty=True, input_name="input")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction: expected 'mean' or 'sum' with sites= (a site element can feed many rows, so "
                             f"there is no per-row 'none'), got {reduction!r}")
        refused = [name for name, on in (("weight", options.class_weight is not None),
                                         ("label_smoothing", options.smoothing), ("z_loss", options.z_loss != 0.0),
                                         ("softcap", options.softcap is not None)) if on]
        if refused:
            raise ValueError(f"{refused[0]}: not defined with sites= (the site terms are those of the plain cross "
                             f"entropy, docs/math.md 11); drop one of them")
        explicit_coefs, implicit_coefs = site_coefficients(
            0.1 if site_p is None else site_p, site_explicit_coef, site_implicit_coef, explicit, implicit, len(sites),
            default_coefficients, names=("site_p", "site_explicit_coef", "site_implicit_coef"))
        if head_terms_on and any(site is input for site in sites):
            raise ValueError("sites: input itself is a site while the head input's own exact terms are on; pass p=0 "
                             "to regularize it as a sampled site, or leave it out of sites")
        valid = target.reshape(-1) != ignore_index
        classes = []
        if sampled_targets is not None:
            sampled_targets = check_sampled_targets(sampled_targets, input, vocab, valid, input_name="input")
            classes.append(("sampled_targets", sampled_targets, valid.expand_as(sampled_targets)))
        samples = check_samples(1 if samples is None else samples)
        if site_signs is not None:
            site_signs = check_site_signs(site_signs, sites, name="site_signs")
        call = SiteCall(sites, explicit_coefs, implicit_coefs, samples, sampled_targets, site_signs, classes)
        if call.active and not input.requires_grad:
            raise ValueError("input: expected a tensor that requires grad with sites= (the output of the network "
                             "whose sites are regularized)")
        return call

    def agreement(self) -> tuple:
        """What every rank of a vocabulary-parallel call must agree on."""
        return (len(self.sites), self.explicit_coefs, self.implicit_coefs,
                self.samples if self.sampled_targets is None else None, self.signs is None)

    def given(self) -> list:
        return [("sampled_targets", self.sampled_targets),
                *((f"site_signs[{k}]", sign) for k, sign in enumerate(self.signs or ())),
                *((f"sites[{k}]", site) for k, site in enumerate(self.sites))]

    def stand_in_signs(self, h: Tensor, acc) -> Optional[Tensor]:
        """Zeros in the implicit term's place when only the sites need mu (its sign term is then 0), else None."""
        return torch.zeros(h.shape, dtype=acc, device=h.device) if self.active else None

    def sums(self, input, h, mu, weight, bias, rows, implementation, call, seed) -> tuple[Tensor, Tensor]:
        """``(explicit, implicit)`` summed over the sites and the rows kept (not reduced)."""
        draws = self.sampled_targets
        if self.need_explicit and draws is None:
            draws = sampler(implementation, call)(h.detach(), weight.detach(), None if bias is None else bias.detach(),
                                                  self.samples, seed)
        weight_rows = functools.partial(class_rows, call.reducer if call.sharded else None, weight)
        return site_sums(input, self.sites, mu, weight_rows, rows.valid,
                         SiteClasses(rows.safe_target, draws if self.need_explicit else None), self.explicit_coefs,
                         self.implicit_coefs, self.signs, seed, input_name="input")
