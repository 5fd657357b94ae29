"""The public functional API: argument validation, flattening, reductions and result types.

Arguments are checked once here; backends receive flattened ``(N, d)`` inputs, a safe target, and
flags saying which terms to compute (see :mod:`dropreg._dispatch`).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

from . import distributed
from ._autocast import autocast_aware, loss_dtype
from ._checks import (check_coefficient, check_head, check_probability, check_reduction, check_same_shape_device_dtype,
                      check_signs_type, check_softcap, check_target, checked_seed, checking_values, default_coefficients,
                      flatten_signs)
from ._dispatch import resolve_backend, resolve_slice_backend
from ._policy import accumulation_dtype, eager_under_compile
from .loss_options import LossOptions, check_class_weight, check_label_smoothing
from .rows import implicit_signs
from .reducers import LOCAL
from .signs import random_signs
from .site_terms import PerSite, SiteCall

# The loss options' sign-weighted parts read the signs outside the fused ops: there Inductor would spend minutes
# compiling the Philox rounds' integer ops, so they are drawn eagerly (O(N d), one graph break).
eager_implicit_signs = eager_under_compile(implicit_signs)


class LinearCrossEntropyOutput(NamedTuple):
    """The terms; scalars for ``"mean"``/``"sum"``, shape ``input.shape[:-1]`` for ``"none"``.

    ``z_loss`` is ``z_loss * lse^2`` reduced like ``ce`` (zero when the option is off)."""

    ce: Tensor
    explicit: Tensor
    implicit: Tensor
    z_loss: Tensor

    @property
    def loss(self) -> Tensor:
        """``ce + explicit + implicit + z_loss``: the training loss."""
        return self.ce + self.explicit + self.implicit + self.z_loss


class RDropOutput(NamedTuple):
    """R-Drop terms; scalars for ``"mean"``/``"sum"``, shape ``target.shape`` for ``"none"``."""

    ce1: Tensor
    ce2: Tensor
    kl: Tensor
    loss: Tensor  # ce1 + ce2 + alpha * kl + z_loss
    z_loss: Tensor  # z_loss * (lse1^2 + lse2^2), reduced like ce1 (zero when the option is off)


def on_reducer(reducer) -> dict:
    """The ``reducer=`` keyword of a backend's op: given only for a sliced head (the backends that cannot run on a
    slice take none, and are refused before this)."""
    return {} if reducer is LOCAL else {"reducer": reducer}


class IgnoredRows:
    """Rows whose target is ignore_index: zeroed before a backend sees them, masked out of every term,
    and not counted by "mean" (which divides by at least 1, so an all-ignored batch gives 0, not NaN)."""

    def __init__(self, target: Tensor, ignore_index: int, dtype: torch.dtype):
        self.shape = target.shape
        flat = target.reshape(-1).long()
        self.valid = flat != ignore_index
        self.safe_target = torch.where(self.valid, flat, torch.zeros_like(flat))
        self.count = self.valid.sum().clamp(min=1).to(accumulation_dtype(dtype))

    def count_weighted(self, row_weights: Tensor) -> None:
        """"mean" divides by the sum of ``row_weights`` over the rows kept (class weights: ``w_y``), or by 1 when no
        row is kept."""
        kept = torch.where(self.valid, row_weights, torch.zeros_like(row_weights)).sum()
        self.count = torch.where(self.valid.any(), kept, torch.ones_like(kept))

    def zero_ignored(self, input: Tensor) -> Tensor:
        zero = torch.zeros((), dtype=input.dtype, device=input.device)
        return torch.where(self.valid[:, None], input.reshape(-1, input.shape[-1]), zero)

    def row_weights(self, reduction: str) -> Tensor:
        """Each row's share of a "mean"/"sum" loss: 0 for ignored rows, else 1 / count ("mean") or 1."""
        weights = self.valid.to(self.count.dtype)
        return weights / self.count if reduction == "mean" else weights

    def reducer(self, reduction: str, out_dtype: torch.dtype):
        """Masks ignored rows and reduces; "mean" divides by the count as it is now (see :meth:`count_weighted`)."""
        count = self.count

        def reduce(per_row: Tensor) -> Tensor:
            per_row = torch.where(self.valid, per_row, torch.zeros_like(per_row))
            if reduction == "none":
                return per_row.reshape(self.shape).to(out_dtype)
            total = per_row.sum()
            return (total / count if reduction == "mean" else total).to(out_dtype)
        return reduce


@autocast_aware("input", "linear_weight", "linear_bias")
def linear_cross_entropy(input: Tensor, linear_weight: Tensor, target: Tensor, *,
                         linear_bias: Optional[Tensor] = None, p: float = 0.1,
                         explicit: bool = True, implicit: bool = True,
                         explicit_coef: Optional[float] = None, implicit_coef: Optional[float] = None,
                         signs: Optional[Tensor] = None, seed: Optional[int] = None,
                         ignore_index: int = -100, reduction: str = "mean",
                         weight: Optional[Tensor] = None, label_smoothing: float = 0.0, z_loss: float = 0.0,
                         softcap: Optional[float] = None, return_lse: bool = False, backend: str = "auto",
                         process_group=None, sites: Optional[Sequence[Tensor]] = None, site_p: PerSite = None,
                         site_explicit_coef: PerSite = None, site_implicit_coef: PerSite = None,
                         samples: Optional[int] = None, sampled_targets: Optional[Tensor] = None,
                         site_signs: Optional[Sequence[Tensor]] = None
                         ) -> Union[LinearCrossEntropyOutput, tuple[LinearCrossEntropyOutput, Tensor]]:
    """Cross entropy of ``input @ linear_weight.T + linear_bias`` plus dropout's explicit and implicit terms.

    ``input`` is the head's input *without* dropout, shape ``(..., d)``; ``linear_weight`` is ``(V, d)``; ``target``
    holds class indices (any integer dtype), shape ``input.shape[:-1]``. ``p`` is the dropout rate whose two effects
    are added: ``explicit_coef`` defaults to ``kappa / 2`` and ``implicit_coef`` to ``sqrt(kappa)`` with
    ``kappa = p / (1 - p)`` (:func:`default_coefficients`); ``explicit=False``, ``implicit=False`` or a zero
    coefficient skips that term's work and returns zeros for it. ``reduction``: ``"mean"`` (over the rows not
    ignored), ``"sum"``, or ``"none"`` (per-row values of shape ``target.shape``). ``backend``: ``"auto"`` (the
    fastest usable for the device; :func:`dropreg.chosen_backend` says which), ``"cpu"``, ``"torch"``,
    ``"chunked"``, ``"triton"``, ``"reference"``, or a backend with a block plan from :func:`dropreg.get_backend`
    (docs/backends.md).

    For each row ``h`` with target ``y`` (docs/math.md): ``ce = lse(z) - z_y``,
    ``explicit = explicit_coef * sum_j h_j^2 var_j`` and
    ``implicit = implicit_coef * sum_j signs_j h_j (mu_j - W[y]_j)``, computed without materializing
    the N x V logits (except by ``backend="reference"``).

    Rows whose target is ``ignore_index`` contribute nothing to any term or gradient; ``"mean"``
    divides by the number of other rows, and a batch whose rows are all ignored gives 0 (not NaN)
    with zero gradients. ``signs=None`` takes signs from the Philox stream of :mod:`dropreg.signs`
    keyed by ``seed`` (``seed=None`` draws one from torch's default generator; inside a ``torch.compile`` graph it
    draws the signs themselves from torch's generator instead, so the graph does not break).
    Non-finite inputs propagate to non-finite outputs. The terms (and ``lse``) come back in fp32 for bf16/fp16
    inputs, as Hugging Face's and Cut Cross-Entropy's losses do, else in ``input``'s dtype; gradients come back in
    the dtypes of their tensors; accumulation is fp32 (fp64 for fp64 inputs). Under ``torch.autocast``, ``input``, ``linear_weight`` and
    ``linear_bias`` are cast to the autocast dtype as ``F.linear`` would cast them, and the results come back in
    fp32, as ``F.cross_entropy``'s do. DTensor arguments are refused with a TypeError (pass local tensors and
    ``process_group``).

    ``weight`` (class weights, shape ``(V,)``) and ``label_smoothing`` follow ``F.cross_entropy``: a row's loss is
    ``w_y``-weighted, the smoothing spreads ``label_smoothing`` of the target over all classes (each weighted by its
    class weight), and ``"mean"`` divides by the sum of ``w_y`` over the rows kept. The explicit and implicit terms
    are dropout's for that row loss (docs/math.md 3.4). ``z_loss`` (a coefficient ``c >= 0``, as PaLM and OLMo train
    with) adds ``c lse^2`` per row, returned as ``.z_loss`` and reduced like ``ce``; the explicit and implicit terms
    then include its Hessian and gradient (docs/math.md 3.5). ``softcap`` (Gemma 2's final-logit softcapping) caps
    the logits, ``z = softcap * tanh(z / softcap)``, before everything else, the dropout terms included
    (docs/math.md 3.6); with ``label_smoothing`` too, smoothing's part of a capped head takes a further streamed
    pass (docs/math.md 3.7).

    Returns a :class:`LinearCrossEntropyOutput`; with ``return_lse=True``, the pair ``(output, lse)``, ``lse`` the
    per-row logsumexp of the logits, shape ``input.shape[:-1]`` whatever the reduction, differentiable, 0 on ignored
    rows.

    ``process_group``: a vocabulary-parallel head (:mod:`dropreg.distributed`): ``linear_weight`` and
    ``linear_bias`` are this rank's contiguous slice (slices in rank order), ``target`` holds global classes,
    ``input`` is the same on every rank; every rank gets the same outputs, the full gradient of ``input`` and
    its own slice's weight gradient. ``weight`` (class weights) is then this rank's slice too, like ``linear_bias``;
    ``label_smoothing``, ``z_loss``, ``return_lse`` and ``softcap`` work as in one process (docs/math.md 12.5,
    12.6).

    ``sites``: the paper's method in one call (docs/math.md 11.5): dropout's terms at every listed site (activations
    in ``input``'s autograd graph, e.g. from :meth:`dropreg.DropoutSite.collect`), as
    :func:`dropreg.site_regularizers` computes them with the same ``seed``, added to ``.explicit`` and ``.implicit``;
    the cross entropy, its gradient and the sites' ``mu`` share one pass over the vocabulary. ``site_p`` (default
    0.1), ``site_explicit_coef``, ``site_implicit_coef`` (one value or one per site), ``samples`` (default 1),
    ``sampled_targets`` and ``site_signs`` are site_regularizers' ``p``, ``explicit_coef``, ``implicit_coef``,
    ``samples``, ``sampled_targets`` and ``signs``; ``p``, ``explicit_coef``, ``implicit_coef`` and ``signs`` stay the
    head input's own exact terms (``p=0`` turns them off, and only then may ``input`` itself be a site);
    ``explicit``/``implicit`` switch a kind of term everywhere. An empty ``sites`` (``collect`` in eval mode) adds
    nothing. With sites, ``reduction`` is ``"mean"`` or ``"sum"``, and ``weight``, ``label_smoothing``, ``z_loss`` and
    ``softcap`` are refused.
    """
    with distributed.checked_call(process_group, "linear_cross_entropy") as call:
        vocab, dim = check_head(input, linear_weight, linear_bias)
        check_target(target, input, None if call.sharded else vocab, ignore_index)
        check_reduction(reduction)
        p = check_probability(p)
        default_explicit, default_implicit = default_coefficients(p)
        explicit_coef = check_coefficient("explicit_coef", explicit_coef, default_explicit)
        implicit_coef = check_coefficient("implicit_coef", implicit_coef, default_implicit)
        need_explicit = bool(explicit) and explicit_coef != 0.0
        need_implicit = bool(implicit) and implicit_coef != 0.0
        flat_signs = flatten_signs(signs, input) if signs is not None and need_implicit else None
        if signs is not None and not need_implicit:  # unused, but checked when given
            check_signs_type(signs)
        if not isinstance(return_lse, bool):
            raise TypeError(f"return_lse: expected a bool, got {return_lse!r}")
        softcap = check_softcap(softcap)
        options = LossOptions(check_class_weight(weight, vocab, input, checking_values()),
                              check_label_smoothing(label_smoothing), check_coefficient("z_loss", z_loss, 0.0),
                              return_lse, softcap)
        site_call = SiteCall.check(input, target, None if call.sharded else vocab, ignore_index, reduction, options,
                                   need_explicit or need_implicit, explicit, implicit, sites, site_p,
                                   site_explicit_coef, site_implicit_coef, samples, sampled_targets, site_signs)
        given_seed = seed
        if need_implicit and signs is None and seed is None and torch.compiler.is_compiling() and not call.sharded \
                and not site_call.needs_seed:
            # Inside a graph: signs drawn in the graph from torch's generator, not a Python int seed (a graph break)
            flat_signs = random_signs(input.numel() // dim, dim, input.device, accumulation_dtype(input.dtype))
            seed = 0
        else:
            seed = checked_seed(seed, (need_implicit and signs is None) or site_call.needs_seed)
        if call.sharded:
            implementation = resolve_slice_backend("linear_cross_entropy", backend, input.device)
        else:
            _, implementation = resolve_backend(backend, input.device, softcap=softcap is not None)
        call.describe(input, linear_weight, linear_bias, seed=seed, target=target,
                      classes=[("target", target, target != ignore_index), *site_call.classes],
                      options=(reduction, p, need_explicit, need_implicit, explicit_coef, implicit_coef, ignore_index,
                               signs is None, given_seed, *options.agreement(), *site_call.agreement()),
                      given=[("signs", signs if need_implicit else None), *site_call.given()])

    rows = IgnoredRows(target, ignore_index, input.dtype)
    acc = accumulation_dtype(input.dtype)
    reducer = call.reducer
    classes = options.class_values(linear_weight, linear_bias, rows.safe_target, acc, reducer)
    if options.class_weight is not None:
        rows.count_weighted(classes.target_class_weight())
    smoothing_weights = options.capped_smoothing_weights(classes)  # label smoothing's S from the capped passes
    ce_only = None if call.sharded else (implementation.ce_with_grads if softcap is None
                                         else implementation.ce_with_grads_softcap)
    if not need_explicit and not need_implicit and reduction != "none" and not return_lse and ce_only is not None \
            and not site_call.active:
        # Cross entropy alone (z-loss included), reduced: the gradients are formed in the forward, 3 NVd, not 4.
        h = rows.zero_ignored(input)
        row_weight = rows.row_weights(reduction)
        fused = (h, linear_weight, linear_bias, rows.safe_target,
                 row_weight * options.row_factor(classes) if options.reweights else row_weight,
                 row_weight * options.z_loss if options.z_loss else None)
        if softcap is None:
            ce, z_value = ce_only(*fused)
        else:  # label smoothing's S_n = sum_v omega_v z_v is formed in the same passes, row n weighted by row_weight
            ce, z_value = ce_only(*fused, softcap, smoothing_weights,
                                  None if smoothing_weights is None else row_weight)
        if options.smoothing:
            ce = ce + options.ce_only_extra(h, classes, row_weight)
        out_dtype = loss_dtype(input.dtype)
        zero = torch.zeros((), dtype=out_dtype, device=input.device)
        return LinearCrossEntropyOutput(ce=ce.to(out_dtype), explicit=zero, implicit=zero,
                                        z_loss=z_value.to(out_dtype) if options.z_loss else zero)
    z_term = lse = smoothing_sum = None
    h = rows.zero_ignored(input)
    if call.sharded:
        seed = call.seed
    if softcap is None:
        # The sites need mu: without the head's implicit term, its path with zero signs forms exactly mu (and takes
        # mu's gradient in the same sweep), its sign term being 0.
        head_signs = flat_signs if need_implicit else site_call.stand_in_signs(h, acc)
        ce, quadratic, sign_term, mu = implementation.linear_ce(h, linear_weight, linear_bias, rows.safe_target,
                                                                head_signs, seed, need_explicit,
                                                                need_implicit or site_call.active,
                                                                **on_reducer(reducer))
    else:
        ce, quadratic, sign_term, mu, smoothing_sum = implementation.linear_ce_softcap(
            h, linear_weight, linear_bias, rows.safe_target, flat_signs, seed, need_explicit, need_implicit, softcap,
            smoothing_weights, **on_reducer(reducer))
    if options.active:
        signs_used = eager_implicit_signs(h, flat_signs, seed, need_implicit and options.needs_signs)
        ce, quadratic, sign_term, z_term, lse = options.adjust(ce, quadratic, sign_term, mu, h, classes, signs_used,
                                                               need_explicit, need_implicit, smoothing_sum)
    reduce = rows.reducer(reduction, loss_dtype(input.dtype))
    zero = reduce(torch.zeros_like(ce))
    out = LinearCrossEntropyOutput(
        ce=reduce(ce),
        explicit=reduce(explicit_coef * quadratic) if need_explicit else zero,
        implicit=reduce(implicit_coef * sign_term) if need_implicit else zero,
        z_loss=zero if z_term is None else reduce(z_term),
    )
    if site_call.active:
        site_explicit, site_implicit = site_call.sums(input, h, mu, linear_weight, linear_bias, rows, implementation,
                                                      call, seed)
        scale = rows.count if reduction == "mean" else 1.0
        out = out._replace(explicit=out.explicit + (site_explicit / scale).to(out.explicit.dtype),
                           implicit=out.implicit + (site_implicit / scale).to(out.implicit.dtype))
    return (out, rows.reducer("none", loss_dtype(input.dtype))(lse)) if return_lse else out


@autocast_aware("input", "linear_weight", "linear_bias")
def explicit_regularizer(input: Tensor, linear_weight: Tensor, *, linear_bias: Optional[Tensor] = None,
                         reduction: str = "mean", backend: str = "auto", process_group=None) -> Tensor:
    """Per row ``sum_j h_j^2 var_j``: the softmax-Hessian quadratic form, with no coefficient.

    ``var_j`` is the variance of column j of ``linear_weight`` under the row's softmax
    (``diag(W^T (diag(s) - s s^T) W)``). ``"mean"`` averages over all rows. ``process_group``: a
    vocabulary-parallel head, as in :func:`linear_cross_entropy`.
    """
    with distributed.checked_call(process_group, "explicit_regularizer") as call:
        check_head(input, linear_weight, linear_bias)
        check_reduction(reduction)
        if call.sharded:
            implementation = resolve_slice_backend("explicit_regularizer", backend, input.device)
        else:
            _, implementation = resolve_backend(backend, input.device)
        call.describe(input, linear_weight, linear_bias, options=(reduction,))
    rows = IgnoredRows(torch.zeros(input.shape[:-1], dtype=torch.long, device=input.device), -1, input.dtype)
    _, quadratic, _, _ = implementation.linear_ce(input.reshape(-1, input.shape[-1]), linear_weight, linear_bias,
                                                  rows.safe_target, None, 0, True, False, **on_reducer(call.reducer))
    return rows.reducer(reduction, loss_dtype(input.dtype))(quadratic)


@autocast_aware("input1", "input2", "linear_weight", "linear_bias")
def rdrop_linear_cross_entropy(input1: Tensor, input2: Tensor, linear_weight: Tensor, target: Tensor, *,
                               linear_bias: Optional[Tensor] = None, alpha: float = 1.0,
                               ignore_index: int = -100, reduction: str = "mean",
                               weight: Optional[Tensor] = None, label_smoothing: float = 0.0, z_loss: float = 0.0,
                               softcap: Optional[float] = None, backend: str = "auto",
                               process_group=None) -> RDropOutput:
    """R-Drop (Liang et al., 2021) on an LM head, fused: two cross entropies and the symmetric KL.

    ``input1`` and ``input2`` are the head's inputs from two dropout passes over the same batch. Per token,
    ``kl = (KL(p1||p2) + KL(p2||p1)) / 2`` and ``loss = ce1 + ce2 + alpha * kl``, the convention of the
    R-Drop authors' translation criterion; for the other common one, ``(ce1 + ce2) / 2 + alpha * kl``,
    use ``0.5 * (out.ce1 + out.ce2) + alpha * out.kl``. The KL is computed in one streamed pass as
    ``sum_v (p1_v - p2_v)(z1_v - z2_v) / 2`` (docs/math.md). Ignored rows, reductions, dtypes and errors
    behave as in :func:`linear_cross_entropy`, and so does ``process_group`` (``input1`` and ``input2`` the same
    on every rank).

    ``weight``, ``label_smoothing`` and ``z_loss`` act on each pass's cross entropy as in
    :func:`linear_cross_entropy` (``ce1`` and ``ce2``'s ``"mean"`` divides by the sum of ``w_y``); the KL compares
    two distributions and takes none of them (its ``"mean"`` divides by the number of rows kept). ``z_loss`` is
    ``z_loss * (lse1^2 + lse2^2)`` reduced like ``ce1``. ``softcap`` caps both passes' logits first, as in
    :func:`linear_cross_entropy` (so the KL is between the capped softmaxes, docs/math.md 9.4); every backend then
    runs the streamed PyTorch passes (label smoothing's capped part too, docs/math.md 3.7). With
    ``process_group``, ``weight`` is this rank's slice of the class weights.
    """
    with distributed.checked_call(process_group, "rdrop_linear_cross_entropy") as call:
        vocab, dim = check_head(input1, linear_weight, linear_bias, name="input1")
        check_same_shape_device_dtype("input2", input2, "input1", input1)
        check_target(target, input1, None if call.sharded else vocab, ignore_index, input_name="input1")
        check_reduction(reduction)
        alpha = check_coefficient("alpha", alpha, 1.0)
        softcap = check_softcap(softcap)
        options = LossOptions(check_class_weight(weight, vocab, input1, checking_values()),
                              check_label_smoothing(label_smoothing), check_coefficient("z_loss", z_loss, 0.0),
                              softcap=softcap)
        if call.sharded:
            implementation = resolve_slice_backend("rdrop_linear_cross_entropy", backend, input1.device)
        else:
            _, implementation = resolve_backend(backend, input1.device, softcap=softcap is not None, op="rdrop")
        # One checksum covers both inputs: their difference is what R-Drop measures.
        call.describe(torch.stack([input1.detach(), input2.detach()]) if call.sharded else input1, linear_weight,
                      linear_bias, target=target, classes=[("target", target, target != ignore_index)],
                      options=(reduction, alpha, ignore_index, *options.agreement()))
    rows = IgnoredRows(target, ignore_index, input1.dtype)
    out_dtype = loss_dtype(input1.dtype)
    reduce_kl = rows.reducer(reduction, out_dtype)  # before count_weighted: the KL's mean counts rows
    z_term = None
    h1, h2 = rows.zero_ignored(input1), rows.zero_ignored(input2)
    if softcap is None:
        ce1, ce2, kl = implementation.rdrop(h1, h2, linear_weight, linear_bias, rows.safe_target, **on_reducer(call.reducer))
    else:
        ce1, ce2, kl = implementation.rdrop_softcap(h1, h2, linear_weight, linear_bias, rows.safe_target, softcap,
                                                    **on_reducer(call.reducer))
    if options.active:
        classes = options.class_values(linear_weight, linear_bias, rows.safe_target, ce1.dtype, call.reducer)
        zeros = torch.zeros_like(ce1)
        adjusted = [options.adjust(ce, zeros, zeros, None, h, classes, None, False, False)
                    for ce, h in ((ce1, h1), (ce2, h2))]
        ce1, ce2 = adjusted[0].ce, adjusted[1].ce
        if options.z_loss:
            z_term = adjusted[0].z_term + adjusted[1].z_term
        if options.class_weight is not None:
            rows.count_weighted(classes.target_class_weight())
    reduce = rows.reducer(reduction, out_dtype)
    z_loss_value = reduce(torch.zeros_like(ce1) if z_term is None else z_term)
    ce1, ce2, kl = reduce(ce1), reduce(ce2), reduce_kl(kl)
    return RDropOutput(ce1=ce1, ce2=ce2, kl=kl, loss=ce1 + ce2 + alpha * kl + z_loss_value, z_loss=z_loss_value)
