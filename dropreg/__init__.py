"""dropreg: dropout's explicit and implicit regularizers, fused with the LM-head cross entropy.

Public API::

    dropreg.linear_cross_entropy(input, linear_weight, target, *, linear_bias=None, p=0.1, ...)
    dropreg.explicit_regularizer(input, linear_weight, *, linear_bias=None, reduction="mean")
    dropreg.rdrop_linear_cross_entropy(input1, input2, linear_weight, target, *, alpha=1.0, ...)
    dropreg.LinearCrossEntropyLoss(p=0.1, ...), dropreg.RDropLoss(alpha=1.0, ...)   # nn.Module wrappers

The math is docs/math.md; README.md lists the backends.
"""
from ._api import (LinearCrossEntropyOutput, RDropOutput, default_coefficients, explicit_regularizer,
                   linear_cross_entropy, rdrop_linear_cross_entropy)
from ._dispatch import available_backends
from .nn import LinearCrossEntropyLoss, RDropLoss
from .signs import philox_signs

__version__ = "0.1.0"

__all__ = [
    "LinearCrossEntropyLoss",
    "LinearCrossEntropyOutput",
    "RDropLoss",
    "RDropOutput",
    "available_backends",
    "default_coefficients",
    "explicit_regularizer",
    "linear_cross_entropy",
    "philox_signs",
    "rdrop_linear_cross_entropy",
]
