"""Autograd for the registered fused ops, shared by the C++ (``dropreg::``) and Triton (``dropreg_triton::``)
op families. Both families have the same schemas (csrc/dropreg.cpp):

* ``linear_ce_forward(input, weight, bias?, target, signs?, int seed, bool need_explicit, bool need_implicit)
  -> (ce, quadratic, sign_term, lse, mu, var)`` and ``linear_ce_backward(..., bool[3] output_mask)``;
* ``rdrop_forward(input1, input2, weight, bias?, target) -> (ce1, ce2, kl, lse, expected_d)`` and
  ``rdrop_backward(..., bool[4] output_mask)``.

lse, mu, var and expected_d are saved statistics, not differentiable outputs: their gradients are ignored.
Backward ops return an empty tensor for every gradient that ``output_mask`` switches off.
"""
from __future__ import annotations

import torch

def int64_seed(seed: int) -> int:
    """The schemas' int is int64; the stream's key is the same 64 bits read as unsigned."""
    return seed - 2**64 if seed >= 2**63 else seed


def uint64_seed(seed: int) -> int:
    return seed % 2**64


def register_linear_ce_autograd(forward_op: str, backward_op) -> None:
    def setup_context(ctx, inputs, output):
        input, weight, bias, target, signs, seed, need_explicit, need_implicit = inputs
        _, _, _, lse, mu, var = output
        ctx.save_for_backward(input, weight, bias, target, signs, lse, mu, var)
        ctx.options = (seed, need_explicit, need_implicit, bias is not None)

    def backward(ctx, grad_ce, grad_quadratic, grad_sign_term, _grad_lse, _grad_mu, _grad_var):
        input, weight, bias, target, signs, lse, mu, var = ctx.saved_tensors
        seed, need_explicit, need_implicit, has_bias = ctx.options
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], has_bias and ctx.needs_input_grad[2]]
        grads = [torch.zeros_like(lse) if g is None else g.contiguous()
                 for g in (grad_ce, grad_quadratic, grad_sign_term)]
        grad_h, grad_w, grad_b = backward_op(
            *grads, input, weight, bias, target, signs, seed, lse, mu, var, need_explicit, need_implicit, mask)
        return (grad_h if mask[0] else None, grad_w if mask[1] else None, grad_b if mask[2] else None,
                None, None, None, None, None)

    torch.library.register_autograd(forward_op, backward, setup_context=setup_context)


def register_rdrop_autograd(forward_op: str, backward_op) -> None:
    def setup_context(ctx, inputs, output):
        input1, input2, weight, bias, target = inputs
        ctx.save_for_backward(input1, input2, weight, bias, target, output[3], output[4])
        ctx.has_bias = bias is not None

    def backward(ctx, grad_ce1, grad_ce2, grad_kl, _grad_lse, _grad_expected):
        input1, input2, weight, bias, target, lse, expected_d = ctx.saved_tensors
        mask = [*ctx.needs_input_grad[:3], ctx.has_bias and ctx.needs_input_grad[3]]
        grads = [torch.zeros_like(lse[0]) if g is None else g.contiguous() for g in (grad_ce1, grad_ce2, grad_kl)]
        out = backward_op(*grads, input1, input2, weight, bias, target, lse, expected_d, mask)
        return (*(g if wanted else None for g, wanted in zip(out, mask)), None)

    torch.library.register_autograd(forward_op, backward, setup_context=setup_context)
