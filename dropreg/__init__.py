"""dropreg: dropout's explicit and implicit regularizers, fused with the LM-head cross entropy.

Public API::

    dropreg.linear_cross_entropy(input, linear_weight, target, *, linear_bias=None, p=0.1, ...)
    dropreg.explicit_regularizer(input, linear_weight, *, linear_bias=None, reduction="mean")
    dropreg.LinearCrossEntropyLoss(p=0.1, ...)      # nn.Module wrapper

The math is MATH.md (in the project's shared design folder); README.md lists the backends.
"""
from ._api import LinearCrossEntropyOutput, default_coefficients, explicit_regularizer, linear_cross_entropy
from ._dispatch import available_backends
from .nn import LinearCrossEntropyLoss
from .signs import philox_signs

__version__ = "0.1.0"

__all__ = [
    "LinearCrossEntropyLoss",
    "LinearCrossEntropyOutput",
    "available_backends",
    "default_coefficients",
    "explicit_regularizer",
    "linear_cross_entropy",
    "philox_signs",
]
