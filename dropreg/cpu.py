"""The ``"cpu"`` backend: the C++ kernels of csrc/, registered as ``torch.ops.dropreg.*``.

The library is ``dropreg._C``, built by ``pip install``. When it is missing (a plain checkout), it is
JIT-built once with ``torch.utils.cpp_extension.load`` and cached under ``TORCH_EXTENSIONS_DIR``.
This module adds the fake (meta) kernels and autograd for the C++ ops.
"""
from __future__ import annotations

import sys
from typing import Optional

import torch

from . import _build
from ._op_autograd import int64_seed, register_linear_ce_autograd, register_rdrop_autograd
from .reference import accumulation_dtype

_load_error: Optional[BaseException] = None
_loaded = False


class CpuBackendUnavailable(RuntimeError):
    pass


def load() -> None:
    """Load the C++ ops, JIT-building them if needed. Raises CpuBackendUnavailable with the compiler output."""
    global _loaded, _load_error
    if _loaded:
        return
    if _load_error is not None:
        raise CpuBackendUnavailable(str(_load_error)) from _load_error
    try:
        try:
            from . import _C  # noqa: F401  (built by setup.py)
        except ImportError:
            from torch.utils.cpp_extension import load as jit_load

            print("dropreg: building the C++ CPU kernels (one-time JIT build, cached by torch; "
                  "`pip install --no-build-isolation -e .` builds them ahead of time)", file=sys.stderr)
            jit_load(name="dropreg_cpu_kernels", sources=_build.sources(), extra_cflags=_build.CXX_FLAGS,
                     extra_ldflags=_build.LINK_FLAGS, is_python_module=False, verbose=False)
    except Exception as error:  # a failed build: keep the compiler output in the message
        _load_error = error
        raise CpuBackendUnavailable(f"dropreg: the C++ CPU kernels could not be built or loaded: {error}") from error
    _register_python_kernels()
    _loaded = True


def is_available() -> bool:
    try:
        load()
    except CpuBackendUnavailable:
        return False
    return True


def load_error() -> Optional[BaseException]:
    return _load_error


def _register_python_kernels() -> None:
    @torch.library.register_fake("dropreg::linear_ce_forward")
    def _forward_fake(input, weight, bias, target, signs, seed, need_explicit, need_implicit):
        rows, dim = input.shape
        acc = accumulation_dtype(input.dtype)
        per_row = [input.new_empty((rows,), dtype=acc) for _ in range(4)]
        mu = input.new_empty((rows if (need_explicit or need_implicit) else 0, dim), dtype=acc)
        var = input.new_empty((rows if need_explicit else 0, dim), dtype=acc)
        return (*per_row, mu, var)

    @torch.library.register_fake("dropreg::linear_ce_backward")
    def _backward_fake(grad_ce, grad_quadratic, grad_sign_term, input, weight, bias, target, signs, seed, lse,
                       mu, var, need_explicit, need_implicit, output_mask):
        grad_h = torch.empty_like(input) if output_mask[0] else input.new_empty((0,))
        grad_w = torch.empty_like(weight) if output_mask[1] else weight.new_empty((0,))
        grad_b = torch.empty_like(bias) if (output_mask[2] and bias is not None) else input.new_empty((0,))
        return grad_h, grad_w, grad_b

    @torch.library.register_fake("dropreg::philox_signs")
    def _signs_fake(seed, rows, dim):
        return torch.empty((rows, dim), dtype=torch.float32)

    register_linear_ce_autograd("dropreg::linear_ce_forward", torch.ops.dropreg.linear_ce_backward)
    _register_rdrop_kernels()
    _register_site_kernels()


def _register_rdrop_kernels() -> None:
    @torch.library.register_fake("dropreg::rdrop_forward")
    def _forward_fake(input1, input2, weight, bias, target):
        rows = input1.shape[0]
        acc = accumulation_dtype(input1.dtype)
        per_row = [input1.new_empty((rows,), dtype=acc) for _ in range(3)]
        return (*per_row, input1.new_empty((2, rows), dtype=acc), input1.new_empty((2, rows), dtype=acc))

    @torch.library.register_fake("dropreg::rdrop_backward")
    def _backward_fake(grad_ce1, grad_ce2, grad_kl, input1, input2, weight, bias, target, lse, expected_d,
                       output_mask):
        def grad_or_empty(wanted, like):
            return torch.empty_like(like) if wanted and like is not None else input1.new_empty((0,))
        return (grad_or_empty(output_mask[0], input1), grad_or_empty(output_mask[1], input2),
                grad_or_empty(output_mask[2], weight), grad_or_empty(output_mask[3], bias))

    register_rdrop_autograd("dropreg::rdrop_forward", torch.ops.dropreg.rdrop_backward)


def _register_site_kernels() -> None:
    @torch.library.register_fake("dropreg::softmax_mean_forward")
    def _forward_fake(input, weight, bias):
        acc = accumulation_dtype(input.dtype)
        return input.new_empty(input.shape, dtype=acc), input.new_empty((input.shape[0],), dtype=acc)

    @torch.library.register_fake("dropreg::softmax_mean_backward")
    def _backward_fake(grad_mu, input, weight, bias, lse, mu, output_mask):
        grad_h = torch.empty_like(input) if output_mask[0] else input.new_empty((0,))
        grad_w = torch.empty_like(weight) if output_mask[1] else weight.new_empty((0,))
        grad_b = torch.empty_like(bias) if (output_mask[2] and bias is not None) else input.new_empty((0,))
        return grad_h, grad_w, grad_b

    @torch.library.register_fake("dropreg::sample_targets")
    def _sample_fake(input, weight, bias, samples, seed):
        return input.new_empty((samples, input.shape[0]), dtype=torch.int64)

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

    torch.library.register_autograd("dropreg::softmax_mean_forward", backward, setup_context=setup_context)


def cpu_terms(input, weight, bias, target, signs, seed, need_explicit, need_implicit):
    """Per-row ``(ce, quadratic, sign_term)`` from the C++ kernels (see dropreg/_dispatch.py)."""
    load()
    if signs is not None:
        signs = signs.to(accumulation_dtype(input.dtype)).contiguous()
    out = torch.ops.dropreg.linear_ce_forward(
        input.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(),
        target.contiguous(), signs, int64_seed(seed), need_explicit, need_implicit)
    return out[0], out[1], out[2]


def cpu_rdrop(input1, input2, weight, bias, target):
    """Per-row ``(ce1, ce2, kl)`` from the C++ kernels (see dropreg/_dispatch.py)."""
    load()
    out = torch.ops.dropreg.rdrop_forward(input1.contiguous(), input2.contiguous(), weight.contiguous(),
                                          None if bias is None else bias.contiguous(), target.contiguous())
    return out[0], out[1], out[2]


def cpu_softmax_mean(input, weight, bias):
    """Per-row ``mu`` from the C++ kernels (see dropreg/_dispatch.py)."""
    load()
    return torch.ops.dropreg.softmax_mean_forward(input.contiguous(), weight.contiguous(),
                                                  None if bias is None else bias.contiguous())[0]


def cpu_sample_targets(input, weight, bias, samples, seed):
    """(samples, N) Gumbel-max draws from the C++ kernels (see dropreg/_dispatch.py)."""
    load()
    return torch.ops.dropreg.sample_targets(input.detach().contiguous(), weight.detach().contiguous(),
                                            None if bias is None else bias.detach().contiguous(), samples,
                                            int64_seed(seed))
