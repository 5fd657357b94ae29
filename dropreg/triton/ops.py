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
from .utils import descriptor_ready, prepare_device


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
def linear_ce_backward(grad_ce: Tensor, grad_quadratic: Tensor, grad_sign_term: Tensor, input: Tensor, weight: Tensor,
                       bias: Optional[Tensor], target: Tensor, signs: Optional[Tensor], seed: int, lse: Tensor,
                       mu: Tensor, var: Tensor, need_explicit: bool, need_implicit: bool, output_mask: list[bool]
                       ) -> tuple[Tensor, Tensor, Tensor]:
    prepare_device(input.device)
    want_h, want_w, want_b = output_mask
    grad_h, grad_w, grad_b = backward.linear_ce_backward(
        wrap_triton, grad_ce, grad_quadratic, grad_sign_term, descriptor_ready(input), descriptor_ready(weight),
        bias, target, signs, uint64_seed(seed), lse, mu, var, need_explicit, need_implicit, want_h, want_w,
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
