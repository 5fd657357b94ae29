"""Class weights and label smoothing for :func:`dropreg.linear_cross_entropy`, on every backend (docs/math.md 3.4).

Both options keep the row loss ``l`` linear in the logits apart from ``lse``, so they change the backends' per-row
terms ``(ce, quadratic, sign_term)`` by a per-row factor and an O(d) correction, computed here once for every
backend. With ``w`` the class weights (1 when not given), ``eps`` the smoothing, ``wbar = mean_c w_c``,
``W~ = (1/V) sum_c w_c W_c`` and ``b~ = (1/V) sum_c w_c b_c``, per row:

    a        = (1 - eps) w_y + eps wbar            (the Hessian of l in z is a (diag(s) - s s^T))
    ce'      = a ce + eps (h . (wbar W_y - W~) + wbar b_y - b~)
    quad'    = a quadratic
    sign'    = a sign_term + eps u . (wbar W_y - W~)          (u = sigma * h)

``"mean"`` divides by the sum of ``w_y`` over the rows that are not ignored, as ``F.cross_entropy`` does.
Everything read of the head (``W_y``, ``b_y``, ``w_y``, ``wbar``, ``W~``, ``b~``) comes through
:class:`ClassValues`, so a vocabulary-parallel head only changes where those values come from (docs/math.md 12.5).

``z_loss`` (coefficient ``c``, docs/math.md 3.5) adds ``c lse^2`` per row (with a softcap, of the capped logits:
docs/math.md 3.6). It needs the row's ``lse = ce + z_y``
and ``mu`` as differentiable values (every backend returns mu and takes its gradient), and adds, with
``q = h*h``:

    z_term   = c lse^2
    quad'   += 2 c (lse quadratic + q . mu^2)
    sign'   += 2 c lse u . mu
"""
from __future__ import annotations

import functools
import numbers
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .reducers import LOCAL
from .rows import softcap_derivatives
from .softcap import capped_smoothing_sums



def check_label_smoothing(value) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"label_smoothing: expected a float in [0, 1], got {value!r}")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"label_smoothing: expected a float in [0, 1], got {value!r}")
    return float(value)


def check_class_weight(weight, vocab: int, input: Tensor, check_values: bool) -> Optional[Tensor]:
    if weight is None:
        return None
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight: expected a 1-D tensor of class weights or None, got {type(weight).__name__}")
    if not weight.dtype.is_floating_point:
        raise TypeError(f"weight: expected a floating-point tensor of class weights, got dtype {weight.dtype}")
    if tuple(weight.shape) != (vocab,):
        raise ValueError(f"weight: expected shape ({vocab},), one weight per class of linear_weight, "
                         f"got {tuple(weight.shape)}")
    if weight.device != input.device:
        raise ValueError(f"weight: expected a tensor on input's device {input.device}, got {weight.device}")
    if check_values and weight.numel() and not bool(torch.isfinite(weight).all()):
        raise ValueError("weight: expected finite class weights")
    return weight


_CHUNK_ROWS = 8192  # vocabulary rows upcast at a time for W~


class ClassValues:
    """What the options read of the head, in ``acc`` and differentiable: per row, the target's weight row ``W_y``,
    bias ``b_y`` and class weight ``w_y``; over all classes, ``wbar = mean_c w_c``, ``W~ = (1/V) sum_c w_c W_c`` and
    ``b~ = (1/V) sum_c w_c b_c``. ``reducer`` (:mod:`dropreg.reducers`) gathers them from the slices of a
    vocabulary-parallel head (``weight``, ``bias`` and the class weights that slice's), one collective each. ``with_rows``: whether ``W_y`` and ``b_y`` are needed (lse, smoothing);
    ``with_mean_rows``: whether ``W~`` and ``b~`` are (smoothing without a softcap)."""

    def __init__(self, weight: Tensor, bias: Optional[Tensor], class_weight: Optional[Tensor], target: Tensor,
                 acc: torch.dtype, with_rows: bool, with_mean_rows: bool, reducer=LOCAL):
        self.weight, self.bias, self.class_weight, self.target, self.acc = weight, bias, class_weight, target, acc
        self.with_rows, self.with_mean_rows = with_rows, with_mean_rows
        self.reducer = reducer

    def _at_targets(self, per_class: list) -> list:
        """Each (V,) or (V, k) tensor's entries at the rows' targets, in ``acc``."""
        return self.reducer.at_classes(per_class, self.target, self.acc)

    def over_all_classes(self, sums: list) -> list:
        """Sums over this head's classes -> sums over every class."""
        return self.reducer.sum_parts(sums)

    def slice_input(self, h: Tensor) -> Tensor:
        """``h`` as it enters a part computed from this head's classes (a sliced head sums the slices' gradients)."""
        return self.reducer.slice_input(h)

    @property
    def classes(self) -> int:
        return self.reducer.classes(self.weight)

    # -- the values
    @functools.cached_property
    def _targets(self) -> dict:
        wanted = {}
        if self.with_rows:
            wanted["w"] = self.weight
            if self.bias is not None:
                wanted["b"] = self.bias
        if self.class_weight is not None:
            wanted["cw"] = self.class_weight
        return dict(zip(wanted, self._at_targets(list(wanted.values()))))

    def target_row(self) -> Tensor:
        return self._targets["w"]

    def target_bias(self) -> Optional[Tensor]:
        return self._targets.get("b")

    def target_class_weight(self) -> Tensor:
        """``w_y`` per row (ones without class weights)."""
        if self.class_weight is None:
            return torch.ones(self.target.shape, dtype=self.acc, device=self.target.device)
        return self._targets["cw"]

    def target_logit(self, h: Tensor) -> Tensor:
        """``z_y = h . W_y + b_y`` per row (``h`` in ``acc``)."""
        logit = (h * self.target_row()).sum(1)
        bias = self.target_bias()
        return logit if bias is None else logit + bias

    def _class_sum(self, values: Tensor) -> Tensor:
        """``sum_c w_c values_c`` over this head's classes, a chunk at a time: no full upcast copy of a
        low-precision head."""
        total = torch.zeros(values.shape[1:], dtype=self.acc, device=values.device)
        for start in range(0, values.shape[0], _CHUNK_ROWS):
            chunk = values[start:start + _CHUNK_ROWS].to(self.acc)
            if self.class_weight is None:
                total = total + chunk.sum(0)
            else:
                total = total + self.class_weight[start:start + _CHUNK_ROWS].to(self.acc) @ chunk
        return total

    @functools.cached_property
    def _means(self) -> dict:
        wanted = {}
        if self.with_mean_rows:
            wanted["w"] = self._class_sum(self.weight)
            if self.bias is not None:
                wanted["b"] = self._class_sum(self.bias)
        if self.class_weight is not None:
            wanted["cw"] = self.class_weight.to(self.acc).sum()
        return {key: total / self.classes for key, total in zip(wanted, self.over_all_classes(list(wanted.values())))}

    def class_weight_mean(self):
        """``wbar`` (1.0 without class weights)."""
        return 1.0 if self.class_weight is None else self._means["cw"]

    def mean_row(self) -> Tensor:
        """``W~``."""
        return self._means["w"]

    def mean_bias(self) -> Tensor:
        """``b~`` (needs a bias)."""
        return self._means["b"]


class AdjustedTerms(NamedTuple):
    ce: Tensor
    quadratic: Tensor
    sign_term: Tensor
    z_term: Optional[Tensor]  # c lse^2 per row; None without z_loss
    lse: Optional[Tensor]     # per row, differentiable; None unless z_loss or asked for


class LossOptions:
    """The per-row factor and corrections of one call; ``active`` is False when no option is in use (and the
    per-row lse is not asked for)."""

    def __init__(self, class_weight: Optional[Tensor], label_smoothing: float, z_loss: float = 0.0,
                 want_lse: bool = False, softcap: Optional[float] = None):
        self.softcap = softcap  # the backend caps the logits; lse and z-loss's terms here must know it
        self.class_weight = class_weight
        self.smoothing = label_smoothing
        self.z_loss = z_loss
        self.want_lse = want_lse or z_loss != 0.0
        self.reweights = class_weight is not None or label_smoothing != 0.0
        self.active = self.reweights or self.want_lse

    def agreement(self) -> tuple:
        """What every rank of a vocabulary-parallel call must pass alike (each rank's class weights are its slice's)."""
        return (self.class_weight is not None, self.smoothing, self.z_loss, self.want_lse, self.softcap)

    @property
    def needs_signs(self) -> bool:
        """Whether :meth:`adjust` reads the implicit term's signs (smoothing and z_loss add sign-weighted parts)."""
        return bool(self.smoothing) or bool(self.z_loss)

    def class_values(self, weight: Tensor, bias: Optional[Tensor], target: Tensor, acc: torch.dtype,
                     reducer=LOCAL) -> ClassValues:
        """The head's values this call's options read; ``reducer`` a :class:`dropreg.reducers.SliceReducer` when
        ``weight`` and ``bias`` are a vocabulary slice (and the class weights that slice's)."""
        with_rows = self.want_lse or bool(self.smoothing)
        with_mean_rows = bool(self.smoothing) and self.softcap is None
        return ClassValues(weight, bias, self.class_weight, target, acc, with_rows, with_mean_rows, reducer)

    def row_factor(self, classes: ClassValues) -> Tensor:
        """``a = (1 - eps) w_y + eps wbar`` per row."""
        w_y = classes.target_class_weight()
        if not self.smoothing:
            return w_y
        return (1.0 - self.smoothing) * w_y + self.smoothing * classes.class_weight_mean()

    def _smoothing_terms(self, h, classes: ClassValues):
        """``(direction, shift)``: ``eps (wbar W_y - W~)`` per row (N, d) and ``eps (h . (wbar W_y - W~) + wbar b_y
        - b~)`` per row, the smoothed loss's part outside ``a ce``; differentiable in h, weight and bias."""
        w_bar = classes.class_weight_mean()
        direction = self.smoothing * (w_bar * classes.target_row() - classes.mean_row())
        shift = (h.to(classes.acc) * direction).sum(1)
        if classes.bias is not None:
            shift = shift + self.smoothing * (w_bar * classes.target_bias() - classes.mean_bias())
        return direction, shift

    def capped_smoothing_weights(self, classes: ClassValues) -> Optional[Tensor]:
        """``omega = (eps / V) w`` over this head's classes, for a capped head's own passes to form label
        smoothing's ``S = sum_v omega_v z_v`` (docs/math.md 3.7); None unless smoothing on a softcapped head."""
        if not self.smoothing or self.softcap is None:
            return None
        scale = self.smoothing / classes.classes
        if classes.class_weight is None:
            return torch.full((classes.weight.shape[0],), scale, dtype=classes.acc, device=classes.weight.device)
        return scale * classes.class_weight.detach().to(classes.acc)

    def _capped_smoothing_terms(self, h, classes: ClassValues, signs, need_explicit, need_implicit, smoothing_sum):
        """With a softcap (docs/math.md 3.7), per row: the smoothed loss's part outside ``a ce``,
        ``eps wbar z_y - S``, and that part's explicit and implicit terms, ``eps wbar z2_y q . W_y^2 - Sq`` and
        ``eps wbar c_y u . W_y - Ss``. ``smoothing_sum``: ``S`` from the capped head's passes, or None to stream it
        here with ``Sq`` and ``Ss`` (summed over the slices of a vocabulary-parallel head)."""
        hc = h.to(classes.acc)
        z_target, c_target, z2_target, _ = softcap_derivatives(classes.target_logit(hc), self.softcap)
        signs = None if signs is None else signs.to(classes.acc)
        wanted = (smoothing_sum is None, need_explicit, need_implicit)
        total, sum_quadratic, sum_sign = smoothing_sum, None, None
        if any(wanted):
            sums = capped_smoothing_sums(classes.slice_input(h), classes.weight, classes.bias,
                                         self.capped_smoothing_weights(classes), signs, self.softcap, *wanted)
            merged = iter(classes.over_all_classes([part for want, part in zip(wanted, sums) if want]))
            total, sum_quadratic, sum_sign = (next(merged) if want else given
                                              for want, given in zip(wanted, (smoothing_sum, None, None)))
        target_scale = self.smoothing * classes.class_weight_mean()
        w_target = classes.target_row()
        quadratic_part = sign_part = None
        if need_explicit:
            quadratic_part = target_scale * z2_target * (hc * hc * w_target * w_target).sum(1) - sum_quadratic
        if need_implicit:
            sign_part = target_scale * c_target * (signs * hc * w_target).sum(1) - sum_sign
        return target_scale * z_target - total, quadratic_part, sign_part

    def adjust(self, ce, quadratic, sign_term, mu, h, classes: ClassValues, signs, need_explicit,
               need_implicit, smoothing_sum=None) -> AdjustedTerms:
        """The per-row terms with the options applied, from a backend's raw ``(ce, quadratic, sign_term, mu)``
        (``signs`` only needed when the implicit term is) and, on a capped head, label smoothing's ``S`` from its
        passes (None: streamed here)."""
        acc = ce.dtype
        lse = z2_target = None
        if self.want_lse:
            z_target = classes.target_logit(h.to(acc))
            if self.softcap is not None:
                z_target, _, z2_target, _ = softcap_derivatives(z_target, self.softcap)
            lse = ce + z_target
        raw_quadratic = quadratic
        if self.reweights:
            a = self.row_factor(classes)
            ce, quadratic, sign_term = a * ce, a * quadratic, a * sign_term
        if self.smoothing and self.softcap is not None:
            shift, quadratic_part, sign_part = self._capped_smoothing_terms(h, classes, signs, need_explicit,
                                                                            need_implicit, smoothing_sum)
            ce = ce + shift
            if need_explicit:
                quadratic = quadratic + quadratic_part
            if need_implicit:
                sign_term = sign_term + sign_part
        elif self.smoothing:
            direction, shift = self._smoothing_terms(h, classes)
            ce = ce + shift
            if need_implicit:
                sign_term = sign_term + (signs.to(acc) * h.to(acc) * direction).sum(1)
        z_term = None
        if self.z_loss:
            c = self.z_loss
            z_term = c * lse * lse
            hc = h.to(acc)
            if need_explicit:
                var_part = raw_quadratic  # sum_j q_j var_j (with a softcap: the raw term less its target part)
                if z2_target is not None:
                    w_target = classes.target_row()
                    var_part = var_part + (hc * hc * w_target * w_target).sum(1) * z2_target
                quadratic = quadratic + 2 * c * (lse * var_part + (hc * hc * mu * mu).sum(1))
            if need_implicit:
                sign_term = sign_term + 2 * c * lse * (signs.to(acc) * hc * mu).sum(1)
        return AdjustedTerms(ce, quadratic, sign_term, z_term, lse)

    def ce_only_extra(self, h, classes: ClassValues, row_weight):
        """``sum_n row_weight_n (ce' - a ce)``: the part of the smoothed loss outside the fused CE; with a softcap only
        the target's ``eps wbar z_y``, the fused CE having taken ``-S`` (docs/math.md 3.7)."""
        if not self.smoothing:
            return torch.zeros((), dtype=row_weight.dtype, device=h.device)
        if self.softcap is not None:
            z_target = softcap_derivatives(classes.target_logit(h.to(classes.acc)), self.softcap)[0]
            return (row_weight * self.smoothing * classes.class_weight_mean() * z_target).sum()
        return (row_weight * self._smoothing_terms(h, classes)[1]).sum()
