"""The Triton kernels registered as ``torch.ops.dropreg_triton.*`` (``torch.library.triton_op``), with autograd.

The schemas (inferred from the annotations) are those of the C++ ops (csrc/dropreg.cpp), but the namespace is separate: a triton_op
also registered for CPU tensors breaks ``torch.compile`` on CPU (TOOLCHAIN.md), so ``dropreg::`` stays the
C++ family and dispatch between the two happens in dropreg/_dispatch.py. Under ``TRITON_INTERPRET=1`` the
same ops run on CPU tensors (eagerly), which is how the test suite checks the kernels.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.library import triton_op, wrap_triton

from .._op_family import register_linear_ce_autograd, register_rdrop_autograd, uint64_seed
from . import backward, forward, rdrop
from .utils import LaunchPlan, descriptor_ready, prepare_device


def _grad_or_empty(grad, like):
    return like.new_empty((0,)) if grad is None else grad.to(like.dtype)


@triton_op("dropreg_triton::linear_ce_forward", mutates_args=())
def linear_ce_forward(input: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, signs: Optional[Tensor],
                      seed: int, need_explicit: bool, need_implicit: bool
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    prepare_device(input.device)
    return forward.linear_ce_forward(wrap_triton, descriptor_ready(input), descriptor_ready(weight), bias, target,
                                     signs, uint64_seed(seed), need_explicit, need_implicit)


@triton_op("dropreg_triton::linear_ce_backward", mutates_args=())
def linear_ce_backward(grad_ce: Tensor, grad_quadratic: Tensor, grad_sign_term: Tensor, grad_mu: Optional[Tensor],
                       input: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, signs: Optional[Tensor],
                       seed: int, lse: Tensor, mu: Tensor, var: Tensor, need_explicit: bool, need_implicit: bool, output_mask: list[bool]
                       ) -> tuple[Tensor, Tensor, Tensor]:
    prepare_device(input.device)
    want_h, want_w, want_b = output_mask
    grad_h, grad_w, grad_b = backward.linear_ce_backward(
        wrap_triton, grad_ce, grad_quadratic, grad_sign_term, grad_mu, descriptor_ready(input),
        descriptor_ready(weight), bias, target, signs, uint64_seed(seed), lse, mu, var, need_explicit, need_implicit, want_h, want_w,
        want_b and bias is not None)
    return (_grad_or_empty(grad_h, input), _grad_or_empty(grad_w, weight),
            _grad_or_empty(grad_b, bias if bias is not None else input))


@triton_op("dropreg_triton::rdrop_forward", mutates_args=())
def rdrop_forward(input1: Tensor, input2: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    prepare_device(input1.device)
    return rdrop.rdrop_forward(wrap_triton, descriptor_ready(input1), descriptor_ready(input2),
                               descriptor_ready(weight), bias, target)


@triton_op("dropreg_triton::rdrop_backward", mutates_args=())
def rdrop_backward(grad_ce1: Tensor, grad_ce2: Tensor, grad_kl: Tensor, input1: Tensor, input2: Tensor,
                   weight: Tensor, bias: Optional[Tensor], target: Tensor, lse: Tensor, expected_d: Tensor,
                   output_mask: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    prepare_device(input1.device)
    want_h1, want_h2, want_w, want_b = output_mask
    grads = rdrop.rdrop_backward(wrap_triton, grad_ce1, grad_ce2, grad_kl, descriptor_ready(input1),
                                 descriptor_ready(input2), descriptor_ready(weight), bias, target, lse, expected_d,
                                 want_h1, want_h2, want_w, want_b and bias is not None)
    likes = (input1, input2, weight, bias if bias is not None else input1)
    return tuple(_grad_or_empty(g, like) for g, like in zip(grads, likes))


register_linear_ce_autograd("dropreg_triton::linear_ce_forward", torch.ops.dropreg_triton.linear_ce_backward)
register_rdrop_autograd("dropreg_triton::rdrop_forward", torch.ops.dropreg_triton.rdrop_backward)


# ---- the launchers called directly, with a chosen plan ------------------------------------------------------
def _direct(kernel):
    """Launches kernels as they are (no ``wrap_triton``): the registered ops above cannot take a plan."""
    return kernel


def linear_ce_step(input: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, upstream, *, seed: int = 0,
                   plan: Optional[LaunchPlan] = None):
    """Forward and backward of the fused op (both terms, every gradient) through the launchers, with ``plan``'s
    tiles: for tools and tests that choose tile configurations. ``upstream`` is the per-row
    ``(grad_ce, grad_quadratic, grad_sign_term)``. Returns ``((ce, quadratic, sign_term), (grad_input,
    grad_weight, grad_bias))``, without coefficients, like the registered ops."""
    prepare_device(input.device)
    input, weight = descriptor_ready(input), descriptor_ready(weight)
    bias = None if bias is None else bias.contiguous()
    ce, quadratic, sign_term, lse, mu, var = forward.linear_ce_forward(
        _direct, input, weight, bias, target, None, uint64_seed(seed), True, True, plan)
    grads = backward.linear_ce_backward(_direct, *upstream, None, input, weight, bias, target, None, uint64_seed(seed),
                                        lse, mu, var, True, True, True, True, bias is not None, plan)
    return (ce, quadratic, sign_term), grads


def rdrop_step(input1: Tensor, input2: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, upstream, *,
               plan: Optional[LaunchPlan] = None):
    """R-Drop's forward and backward through the launchers with ``plan``, as :func:`linear_ce_step`;
    ``upstream`` is ``(grad_ce1, grad_ce2, grad_kl)``. Returns ``((ce1, ce2, kl), (grad_input1, grad_input2,
    grad_weight, grad_bias))``."""
    prepare_device(input1.device)
    input1, input2, weight = descriptor_ready(input1), descriptor_ready(input2), descriptor_ready(weight)
    bias = None if bias is None else bias.contiguous()
    ce1, ce2, kl, lse, expected_d = rdrop.rdrop_forward(_direct, input1, input2, weight, bias, target, plan)
    grads = rdrop.rdrop_backward(_direct, *upstream, input1, input2, weight, bias, target, lse, expected_d, True, True,
                                 True, bias is not None, plan)
    return (ce1, ce2, kl), grads
