"""dropreg: dropout's explicit and implicit regularizers, fused with the LM-head cross entropy.

Public API::

    dropreg.linear_cross_entropy(input, linear_weight, target, *, linear_bias=None, p=0.1, ...)
    dropreg.explicit_regularizer(input, linear_weight, *, linear_bias=None, reduction="mean")
    dropreg.rdrop_linear_cross_entropy(input1, input2, linear_weight, target, *, alpha=1.0, ...)
    dropreg.softmax_mean(input, linear_weight, *, linear_bias=None)        # every-site building blocks
    dropreg.sample_targets(input, linear_weight, *, samples=1, seed=None)
    dropreg.site_regularizers(head_input, linear_weight, target, sites, *, p=0.1, ...)
    dropreg.LinearCrossEntropyLoss(p=0.1, ...), dropreg.RDropLoss(alpha=1.0, ...)   # nn.Module wrappers
    dropreg.DropoutSite(p=0.1)                                             # put where nn.Dropout was
    dropreg.set_workspace_bytes(size, device="cpu"), dropreg.workspace_bytes(device="cpu")  # logits workspace
    dropreg.get_backend("torch").with_plan(dropreg.BlockPlan(row_block=256))  # a backend with chosen blocks
    dropreg.chosen_backend("cuda")                                         # what backend="auto" runs there

Submodules: ``dropreg.hf`` (Hugging Face: ``causal_lm_loss``, ``DropregTrainer``; ``import dropreg.hf``, needs the
``hf`` extra) and ``dropreg.diagnostics`` (flatness and condensation of a trained network).

``p`` is the dropout rate whose effects are added: ``explicit_coef = kappa / 2`` and ``implicit_coef = sqrt(kappa)``
with ``kappa = p / (1 - p)`` (:func:`default_coefficients`). The math is docs/math.md; README.md and docs/usage.md
explain every argument.
"""
from ._api import (LinearCrossEntropyOutput, RDropOutput, default_coefficients, explicit_regularizer,
                   linear_cross_entropy, rdrop_linear_cross_entropy)
from ._dispatch import available_backends, chosen_backend, get_backend
from ._policy import set_workspace_bytes, workspace_bytes
from .nn import DropoutSite, LinearCrossEntropyLoss, RDropLoss
from . import diagnostics
from .plan import BlockPlan
from .signs import philox_signs
from .sites import SiteRegularizers, sample_targets, site_regularizers, softmax_mean

__version__ = "0.2.0"

__all__ = [
    "BlockPlan",
    "DropoutSite",
    "LinearCrossEntropyLoss",
    "LinearCrossEntropyOutput",
    "RDropLoss",
    "RDropOutput",
    "available_backends",
    "chosen_backend",
    "default_coefficients",
    "explicit_regularizer",
    "get_backend",
    "linear_cross_entropy",
    "philox_signs",
    "rdrop_linear_cross_entropy",
    "sample_targets",
    "site_regularizers",
    "SiteRegularizers",
    "set_workspace_bytes",
    "softmax_mean",
    "workspace_bytes",
]
