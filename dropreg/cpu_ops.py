"""The ``"cpu"`` backend's whole-head ops, registered as ``torch.ops.dropreg.linear_ce_forward`` and friends (the
schemas of dropreg/_op_family.py, the same as the one-pass Triton family's): dropreg/ops.py's bodies over the C++
passes (dropreg/cpp_passes.py) with the identity reducer. They are registered ops, with fake kernels and
``torch.library`` autograd, so that ``torch.compile(fullgraph=True)`` takes a head held whole as one node; a slice of
a head runs the same bodies through the autograd Functions of dropreg/ops.py.
"""
from __future__ import annotations

import torch

from . import ops, rows
from ._op_family import register_linear_ce_autograd, register_rdrop_autograd, refuse_double_backward, uint64_seed
from ._policy import accumulation_dtype
from .cpp_passes import CppPasses
from .cpu import (check_dtype, check_head, check_per_row_grads, check_rdrop_backward, check_shape, check_signs,
                  load)
from .reducers import LOCAL

_PASSES = CppPasses()
_LIBRARY = torch.library.Library("dropreg", "FRAGMENT")  # the C++ library defines the passes in this namespace

SCHEMAS = {
    "linear_ce_forward": "(Tensor input, Tensor weight, Tensor? bias, Tensor target, Tensor? signs, int seed, "
                         "bool need_explicit, bool need_implicit) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    "linear_ce_backward": "(Tensor grad_ce, Tensor grad_quadratic, Tensor grad_sign_term, Tensor? grad_mu, "
                          "Tensor input, Tensor weight, Tensor? bias, Tensor target, Tensor? signs, int seed, "
                          "Tensor lse, Tensor mu, Tensor var, bool need_explicit, bool need_implicit, "
                          "bool[3] output_mask) -> (Tensor, Tensor, Tensor)",
    "rdrop_forward": "(Tensor input1, Tensor input2, Tensor weight, Tensor? bias, Tensor target) "
                     "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    "rdrop_backward": "(Tensor grad_ce1, Tensor grad_ce2, Tensor grad_kl, Tensor input1, Tensor input2, "
                      "Tensor weight, Tensor? bias, Tensor target, Tensor lse, Tensor expected_d, "
                      "bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)",
    "softmax_mean_forward": "(Tensor input, Tensor weight, Tensor? bias) -> (Tensor, Tensor)",
    "softmax_mean_backward": "(Tensor grad_mu, Tensor input, Tensor weight, Tensor? bias, Tensor lse, Tensor mu, "
                             "bool[3] output_mask) -> (Tensor, Tensor, Tensor)",
}


def _register(name, kernel, fake):
    _LIBRARY.define(name + SCHEMAS[name])
    _LIBRARY.impl(name, kernel, "CPU")
    torch.library.register_fake(f"dropreg::{name}", fake, lib=_LIBRARY)


def _empty_unless(wanted, tensor, like):
    """The schemas' convention: an output not asked for is an empty tensor."""
    return tensor if wanted and tensor is not None else like.new_empty((0,))


# ------------------------------------------------------------------------------------------ the terms

def _linear_ce_forward(input, weight, bias, target, signs, seed, need_explicit, need_implicit):
    load()
    signs = rows.implicit_signs(input, signs, uint64_seed(seed), need_implicit)
    (ce, quadratic, sign_term, mu), (_, _, lse, _, var, *_) = ops.uncapped_forward(
        input, weight, bias, target, signs, need_explicit, need_implicit, _PASSES, LOCAL)
    none = input.new_empty((0, input.shape[1]), dtype=lse.dtype)
    return ce, quadratic, sign_term, lse, none.clone() if mu is None else mu, none if var is None else var


def _linear_ce_forward_fake(input, weight, bias, target, signs, seed, need_explicit, need_implicit):
    op = "dropreg::linear_ce_forward"
    n_rows, dim, _ = check_head(op, {"input": input}, weight, bias, target)
    check_signs(op, signs, n_rows, dim)
    acc = accumulation_dtype(input.dtype)
    per_row = [input.new_empty((n_rows,), dtype=acc) for _ in range(4)]
    mu = input.new_empty((n_rows if (need_explicit or need_implicit) else 0, dim), dtype=acc)
    var = input.new_empty((n_rows if need_explicit else 0, dim), dtype=acc)
    return (*per_row, mu, var)


def _linear_ce_backward(grad_ce, grad_quadratic, grad_sign_term, grad_mu, input, weight, bias, target, signs, seed,
                        lse, mu, var, need_explicit, need_implicit, output_mask):
    load()
    signs = rows.implicit_signs(input, signs, uint64_seed(seed), need_implicit)
    modulated = need_explicit or need_implicit
    if grad_mu is not None and (grad_mu.numel() == 0 or not modulated):
        grad_mu = None
    saved = (target, None, lse, mu if modulated else None, var if need_explicit else None)
    wants = (output_mask[0], output_mask[1], output_mask[2] and bias is not None)
    grad_h, grad_w, grad_b = ops.uncapped_backward(input, weight, bias, signs, saved,
                                                   (grad_ce, grad_quadratic, grad_sign_term), grad_mu, need_explicit,
                                                   need_implicit, wants, _PASSES, LOCAL)
    return (_empty_unless(wants[0], grad_h, input), _empty_unless(wants[1], grad_w, weight),
            _empty_unless(wants[2], grad_b, input))


def _linear_ce_backward_fake(grad_ce, grad_quadratic, grad_sign_term, grad_mu, input, weight, bias, target, signs,
                             seed, lse, mu, var, need_explicit, need_implicit, output_mask):
    op = "dropreg::linear_ce_backward"
    n_rows, dim, _ = check_head(op, {"input": input}, weight, bias, target)
    check_signs(op, signs, n_rows, dim)
    check_per_row_grads(op, dict(grad_ce=grad_ce, grad_quadratic=grad_quadratic, grad_sign_term=grad_sign_term),
                        n_rows)
    acc = accumulation_dtype(input.dtype)
    check_shape(op, "lse", lse, (n_rows,))
    check_shape(op, "mu", mu, (n_rows if (need_explicit or need_implicit) else 0, dim))
    check_shape(op, "var", var, (n_rows if need_explicit else 0, dim))
    if grad_mu is not None:
        check_shape(op, "grad_mu", grad_mu, tuple(mu.shape))
    for name, saved in (("lse", lse), ("mu", mu), ("var", var)):
        check_dtype(op, name, saved, acc)
    grad_h = torch.empty_like(input) if output_mask[0] else input.new_empty((0,))
    grad_w = torch.empty_like(weight) if output_mask[1] else weight.new_empty((0,))
    grad_b = torch.empty_like(bias) if (output_mask[2] and bias is not None) else input.new_empty((0,))
    return grad_h, grad_w, grad_b


# ------------------------------------------------------------------------------------------ R-Drop

def _rdrop_forward(input1, input2, weight, bias, target):
    load()
    (ce1, ce2, kl), (_, _, lse, expected_d) = ops.rdrop_forward(input1, input2, weight, bias, target, None, _PASSES,
                                                                LOCAL)
    return ce1, ce2, kl, lse, expected_d


def _rdrop_forward_fake(input1, input2, weight, bias, target):
    n_rows, _, _ = check_head("dropreg::rdrop_forward", {"input1": input1, "input2": input2}, weight, bias, target)
    acc = accumulation_dtype(input1.dtype)
    per_row = [input1.new_empty((n_rows,), dtype=acc) for _ in range(3)]
    return (*per_row, input1.new_empty((2, n_rows), dtype=acc), input1.new_empty((2, n_rows), dtype=acc))


def _rdrop_backward(grad_ce1, grad_ce2, grad_kl, input1, input2, weight, bias, target, lse, expected_d, output_mask):
    load()
    wants = (*output_mask[:3], output_mask[3] and bias is not None)
    saved = (target, None, lse, expected_d)
    grad_h1, grad_h2, grad_w, grad_b = ops.rdrop_backward(input1, input2, weight, bias, saved,
                                                          (grad_ce1, grad_ce2, grad_kl), wants, None, _PASSES, LOCAL)
    # grad_h1 and grad_h2 may be views of one (2, N, d) tensor: the schema says outputs do not alias
    grads = (grad_h1, None if grad_h2 is None else grad_h2.clone(), grad_w, grad_b)
    return tuple(_empty_unless(wanted, g, input1) for g, wanted in zip(grads, wants))


def _rdrop_backward_fake(grad_ce1, grad_ce2, grad_kl, input1, input2, weight, bias, target, lse, expected_d,
                         output_mask):
    check_rdrop_backward("dropreg::rdrop_backward", input1, input2, weight, bias, target, (grad_ce1, grad_ce2, grad_kl),
                         lse, expected_d)

    def grad_or_empty(wanted, like):
        return torch.empty_like(like) if wanted and like is not None else input1.new_empty((0,))
    return (grad_or_empty(output_mask[0], input1), grad_or_empty(output_mask[1], input2),
            grad_or_empty(output_mask[2], weight), grad_or_empty(output_mask[3], bias))


# ------------------------------------------------------------------------------------------ softmax_mean

def _softmax_mean_forward(input, weight, bias):
    load()
    mu, (lse, *_) = ops.softmax_mean_forward(input, weight, bias, _PASSES, LOCAL)
    return mu, lse


def _softmax_mean_forward_fake(input, weight, bias):
    check_head("softmax_mean_forward", {"input": input}, weight, bias,
               input.new_empty((input.shape[0],), dtype=torch.int64))
    acc = accumulation_dtype(input.dtype)
    return input.new_empty(input.shape, dtype=acc), input.new_empty((input.shape[0],), dtype=acc)


def _softmax_mean_backward(grad_mu, input, weight, bias, lse, mu, output_mask):
    load()
    wants = (output_mask[0], output_mask[1], output_mask[2] and bias is not None)
    grads = ops.softmax_mean_backward(input, weight, bias, (lse, mu), grad_mu, wants, _PASSES, LOCAL)
    return tuple(_empty_unless(wanted, g, like) for g, wanted, like in zip(grads, wants, (input, weight, input)))


def _softmax_mean_backward_fake(grad_mu, input, weight, bias, lse, mu, output_mask):
    n_rows, dim, _ = check_head("softmax_mean_backward", {"input": input}, weight, bias,
                                input.new_empty((input.shape[0],), dtype=torch.int64))
    for name, tensor, shape in (("grad_mu", grad_mu, (n_rows, dim)), ("lse", lse, (n_rows,)),
                                ("mu", mu, (n_rows, dim))):
        check_shape("softmax_mean_backward", name, tensor, shape)
    grad_h = torch.empty_like(input) if output_mask[0] else input.new_empty((0,))
    grad_w = torch.empty_like(weight) if output_mask[1] else weight.new_empty((0,))
    grad_b = torch.empty_like(bias) if (output_mask[2] and bias is not None) else input.new_empty((0,))
    return grad_h, grad_w, grad_b


def _register_softmax_mean_autograd():
    def setup_context(ctx, inputs, output):
        input, weight, bias = inputs
        ctx.save_for_backward(input, weight, bias, output[1], output[0])
        ctx.has_bias = bias is not None

    def backward(ctx, grad_mu, _grad_lse):
        input, weight, bias, lse, mu = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
        grad_mu = torch.zeros_like(mu) if grad_mu is None else grad_mu.contiguous()
        grads = torch.ops.dropreg.softmax_mean_backward(grad_mu, input, weight, bias, lse, mu, mask)
        return tuple(g if wanted else None for g, wanted in zip(grads, mask))

    torch.library.register_autograd("dropreg::softmax_mean_forward", backward, setup_context=setup_context,
                                    lib=_LIBRARY)
    refuse_double_backward("dropreg::softmax_mean_backward")


_register("linear_ce_forward", _linear_ce_forward, _linear_ce_forward_fake)
_register("linear_ce_backward", _linear_ce_backward, _linear_ce_backward_fake)
_register("rdrop_forward", _rdrop_forward, _rdrop_forward_fake)
_register("rdrop_backward", _rdrop_backward, _rdrop_backward_fake)
_register("softmax_mean_forward", _softmax_mean_forward, _softmax_mean_forward_fake)
_register("softmax_mean_backward", _softmax_mean_backward, _softmax_mean_backward_fake)
register_linear_ce_autograd("dropreg::linear_ce_forward", torch.ops.dropreg.linear_ce_backward)
register_rdrop_autograd("dropreg::rdrop_forward", torch.ops.dropreg.rdrop_backward)
_register_softmax_mean_autograd()


def softmax_mean(input, weight, bias):
    """Per-row ``mu`` of a head held whole, through the registered op (see dropreg/_dispatch.py)."""
    load()
    return torch.ops.dropreg.softmax_mean_forward(input.contiguous(), weight.contiguous(),
                                                  None if bias is None else bias.contiguous())[0]
