"""``nn.Module`` wrappers for training code."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ._api import LinearCrossEntropyOutput, RDropOutput, linear_cross_entropy, rdrop_linear_cross_entropy
from ._checks import check_coefficient, check_probability, check_reduction
from ._dispatch import check_backend_name


def shift_labels(target: Tensor, ignore_index: int) -> Tensor:
    """Causal-LM labels: position t is scored against ``target[..., t + 1]``; the last position is ignored."""
    if not isinstance(target, Tensor) or target.dim() < 1:
        raise ValueError("target: shift_labels=True expects labels of shape (..., sequence)")
    if target.dtype in _NARROW_INTEGERS:  # the padding ignore_index (-100 by default) needs int64's range
        target = target.long()
    return torch.nn.functional.pad(target[..., 1:], (0, 1), value=ignore_index)


_NARROW_INTEGERS = (torch.uint8, torch.int8, torch.int16, torch.int32)


def _check_module_options(p=None, alpha=None, reduction="mean", backend="auto") -> None:
    """Refuse bad constructor arguments when the module is built, not at its first forward."""
    if p is not None:
        check_probability(p)
    if alpha is not None:
        check_coefficient("alpha", alpha, 1.0)
    check_reduction(reduction)
    check_backend_name(backend)


class LinearCrossEntropyLoss(nn.Module):
    """LM-head loss: cross entropy plus dropout's explicit and implicit regularizers, fused.

    Call it with the hidden states that feed the LM head (un-dropped) and the head's weight::

        loss_fn = dropreg.LinearCrossEntropyLoss(p=0.1, shift_labels=True)
        out = loss_fn(hidden_states, model.lm_head.weight, labels)
        out.loss.backward()

    Like ``nn.Dropout``, the regularizers act in training mode only: in ``eval()`` mode the explicit and implicit
    terms are zero (unless ``regularize_in_eval=True``); z-loss and label smoothing apply in both modes.

    ``process_group``: ``linear_weight`` (and ``linear_bias``) is this rank's slice of a vocabulary-parallel head
    (see :func:`dropreg.linear_cross_entropy`; ``weight`` is then the slice's class weights). ``weight`` (class
    weights, a buffer), ``label_smoothing``, ``z_loss`` and ``softcap`` are :func:`dropreg.linear_cross_entropy`'s.

    ``shift_labels=True`` applies the causal-LM convention of Hugging Face models: position t is scored
    against ``labels[..., t + 1]`` and the last position is ignored, so ``labels`` can be the input ids.
    """

    def __init__(self, p: float = 0.1, *, explicit: bool = True, implicit: bool = True,
                 explicit_coef: Optional[float] = None, implicit_coef: Optional[float] = None,
                 ignore_index: int = -100, reduction: str = "mean", shift_labels: bool = False,
                 regularize_in_eval: bool = False, weight: Optional[Tensor] = None, label_smoothing: float = 0.0,
                 z_loss: float = 0.0, softcap: Optional[float] = None, backend: str = "auto", process_group=None):
        super().__init__()
        _check_module_options(p=p, reduction=reduction, backend=backend)
        self.register_buffer("weight", weight)  # class weights move with .to(), as nn.CrossEntropyLoss's do
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.process_group = process_group
        self.p = p
        self.explicit = explicit
        self.implicit = implicit
        self.explicit_coef = explicit_coef
        self.implicit_coef = implicit_coef
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.shift_labels = shift_labels
        self.regularize_in_eval = regularize_in_eval
        self.backend = backend

    def forward(self, input: Tensor, linear_weight: Tensor, target: Tensor,
                linear_bias: Optional[Tensor] = None, *, signs: Optional[Tensor] = None,
                seed: Optional[int] = None) -> LinearCrossEntropyOutput:
        if self.shift_labels:
            target = self._shift(target)
        regularize = self.training or self.regularize_in_eval
        return linear_cross_entropy(
            input, linear_weight, target, linear_bias=linear_bias, p=self.p,
            explicit=self.explicit and regularize, implicit=self.implicit and regularize,
            explicit_coef=self.explicit_coef, implicit_coef=self.implicit_coef, signs=signs, seed=seed,
            ignore_index=self.ignore_index, reduction=self.reduction, weight=self.weight,
            label_smoothing=self.label_smoothing, z_loss=self.z_loss, softcap=self.softcap, backend=self.backend,
            process_group=self.process_group)

    def _shift(self, target: Tensor) -> Tensor:
        return shift_labels(target, self.ignore_index)

    def extra_repr(self) -> str:
        return (f"p={self.p}, explicit={self.explicit}, implicit={self.implicit}, "
                f"reduction={self.reduction!r}, shift_labels={self.shift_labels}, backend={self.backend!r}")


class RDropLoss(nn.Module):
    """R-Drop loss on an LM head: ``ce1 + ce2 + alpha * kl`` from two dropout passes of the same batch.

    ``kl`` is (KL(p1||p2) + KL(p2||p1)) / 2 per token, fused into one streamed pass over the vocabulary::

        loss_fn = dropreg.RDropLoss(alpha=1.0, shift_labels=True)
        hidden1, hidden2 = model(input_ids), model(input_ids)    # dropout on: two different masks
        out = loss_fn(hidden1, hidden2, model.lm_head.weight, input_ids)
        out.loss.backward()

    ``weight`` (class weights, a buffer), ``label_smoothing``, ``z_loss`` and ``softcap`` are
    :func:`dropreg.rdrop_linear_cross_entropy`'s.
    """

    def __init__(self, alpha: float = 1.0, *, ignore_index: int = -100, reduction: str = "mean",
                 shift_labels: bool = False, weight: Optional[Tensor] = None, label_smoothing: float = 0.0,
                 z_loss: float = 0.0, softcap: Optional[float] = None, backend: str = "auto", process_group=None):
        super().__init__()
        _check_module_options(alpha=alpha, reduction=reduction, backend=backend)
        self.register_buffer("weight", weight)
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.process_group = process_group
        self.alpha = alpha
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.shift_labels = shift_labels
        self.backend = backend

    def forward(self, input1: Tensor, input2: Tensor, linear_weight: Tensor, target: Tensor,
                linear_bias: Optional[Tensor] = None) -> RDropOutput:
        if self.shift_labels:
            target = shift_labels(target, self.ignore_index)
        return rdrop_linear_cross_entropy(input1, input2, linear_weight, target, linear_bias=linear_bias,
                                          alpha=self.alpha, ignore_index=self.ignore_index,
                                          reduction=self.reduction, weight=self.weight,
                                          label_smoothing=self.label_smoothing, z_loss=self.z_loss,
                                          softcap=self.softcap, backend=self.backend,
                                          process_group=self.process_group)

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, reduction={self.reduction!r}, shift_labels={self.shift_labels}, "
                f"backend={self.backend!r}")


class DropoutSite(nn.Module):
    """Put where ``nn.Dropout`` was: the identity, recording its input for :func:`dropreg.site_regularizers`.

    In training mode with autograd on, each call records its input (a site can be called several times per
    forward, e.g. once per time step). :meth:`collect` hands over and forgets everything a model's sites
    recorded, with each site's ``p``::

        model.drop = dropreg.DropoutSite(p=0.4)          # was nn.Dropout(0.4)
        hidden = model(ids)                               # the un-dropped forward
        sites, ps = dropreg.DropoutSite.collect(model)
        out = dropreg.linear_cross_entropy(hidden, head.weight, labels, p=0.0, sites=sites, site_p=ps)
        out.loss.backward()                               # CE + every site's explicit and implicit terms

    Recorded tensors keep their autograd graph alive until collected: call :meth:`collect` every step.
    """

    def __init__(self, p: float = 0.1):
        """``p``: the dropout rate this site stands for, in [0, 1) (the rate of the ``nn.Dropout`` it replaces)."""
        super().__init__()
        self.p = check_probability(p)
        self.recorded: list[Tensor] = []

    def forward(self, input: Tensor) -> Tensor:
        """Returns ``input`` unchanged (no dropout); in training mode with autograd on, also records it for
        :meth:`collect`."""
        if self.training and torch.is_grad_enabled() and input.requires_grad:
            self.recorded.append(input)
        return input

    @staticmethod
    def collect(model: nn.Module) -> tuple[list[Tensor], list[float]]:
        """``(sites, ps)``: every input recorded by ``model``'s DropoutSite modules since the last collect."""
        sites: list[Tensor] = []
        ps: list[float] = []
        for module in model.modules():
            if isinstance(module, DropoutSite):
                sites += module.recorded
                ps += [module.p] * len(module.recorded)
                module.recorded = []
        return sites, ps

    def extra_repr(self) -> str:
        return f"p={self.p}"
