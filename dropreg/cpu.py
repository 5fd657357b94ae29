"""The ``"cpu"`` backend's C++ kernels of csrc/, registered as ``torch.ops.dropreg.*``: the vocabulary passes, the
CE-only op and sampling.

The library is ``dropreg._C``, built by ``pip install``. When it is missing (a plain checkout), it is
JIT-built once with ``torch.utils.cpp_extension.load`` and cached under ``TORCH_EXTENSIONS_DIR``.
This module adds their fake (meta) kernels, which check shapes and dtypes, and the CE-only op's autograd; the
whole-head ops built on the passes are dropreg/cpu_ops.py's.
"""
from __future__ import annotations

import sys

import torch

from . import _build, streamed
from ._op_family import (BackendUnavailable, OpFamily, combined_upstream, first_order_only, gradients_wanted,
                         int64_seed)
from ._policy import accumulation_dtype


def _load_library() -> None:
    """Load the C++ ops, JIT-building them if needed; a failed build raises with the compiler output."""
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
        raise BackendUnavailable(f"dropreg: the C++ CPU kernels could not be built or loaded: {error}") from error
    _register_python_kernels()


FAMILY = OpFamily("dropreg", _load_library)
load = FAMILY.load
is_available = FAMILY.is_available
unavailable_reason = FAMILY.unavailable_reason


def check_shape(op: str, name: str, tensor, shape) -> None:
    def message():
        return f"{op}: {name} must have shape {tuple(shape)}, got {tuple(tensor.shape)}"
    torch._check(tensor.dim() == len(shape), message)
    for size, expected in zip(tensor.shape, shape):  # one check per size: symbolic sizes stay symbolic
        torch._check(size == expected, message)


def check_dtype(op: str, name: str, tensor, dtype) -> None:
    torch._check(tensor.dtype == dtype, lambda: f"{op}: {name} must have dtype {dtype}, got {tensor.dtype}")


def check_head(op: str, inputs: dict, weight, bias, target) -> tuple:
    """(N, d) inputs of one floating dtype, weight (V, d) and bias (V,) of the same dtype, target (N,) int64.
    Returns (N, d, V)."""
    first_name, first = next(iter(inputs.items()))
    torch._check(first.dim() == 2, lambda: f"{op}: {first_name} must be 2-D (N, d), got shape {tuple(first.shape)}")
    torch._check(first.dtype.is_floating_point,
                 lambda: f"{op}: {first_name} must be floating point, got {first.dtype}")
    rows, dim = first.shape
    for name, tensor in inputs.items():
        check_shape(op, name, tensor, (rows, dim))
        check_dtype(op, name, tensor, first.dtype)
    torch._check(weight.dim() == 2 and weight.shape[1] == dim,
                 lambda: f"{op}: weight must be (V, d) with d={dim} as {first_name}, got {tuple(weight.shape)}")
    check_dtype(op, "weight", weight, first.dtype)
    vocab = weight.shape[0]
    if bias is not None:
        check_shape(op, "bias", bias, (vocab,))
        check_dtype(op, "bias", bias, first.dtype)
    check_shape(op, "target", target, (rows,))
    check_dtype(op, "target", target, torch.int64)
    return rows, dim, vocab


def check_per_row_grads(op: str, grads: dict, rows: int) -> None:
    for name, grad in grads.items():
        check_shape(op, name, grad, (rows,))
        torch._check(grad.dtype.is_floating_point, lambda: f"{op}: {name} must be floating point, got {grad.dtype}")


def check_signs(op: str, signs, rows: int, dim: int) -> None:
    if signs is not None:
        check_shape(op, "signs", signs, (rows, dim))
        torch._check(signs.dtype.is_floating_point, lambda: f"{op}: signs must be floating point, got {signs.dtype}")


def _register_python_kernels() -> None:
    @torch.library.register_fake("dropreg::philox_signs")
    def _signs_fake(seed, rows, dim):
        return torch.empty((rows, dim), dtype=torch.float32)

    _register_vocab_pass_kernels()
    _register_ce_with_grads_kernels()
    _register_softcap_kernels()
    _register_site_kernels()


def _register_vocab_pass_kernels() -> None:
    """Fake kernels of the uncapped head's and R-Drop's passes (csrc/vocab_passes.h, csrc/rdrop.h)."""
    @torch.library.register_fake("dropreg::vocab_statistics")
    def _statistics_fake(input, weight, bias, need_mu, need_m2):
        op = "dropreg::vocab_statistics"
        rows, dim, _ = check_head(op, {"input": input}, weight, bias, _stand_in_target(input))
        acc = accumulation_dtype(input.dtype)
        return (input.new_empty((rows,), dtype=acc), input.new_empty((rows if need_mu else 0, dim), dtype=acc),
                input.new_empty((rows if need_m2 else 0, dim), dtype=acc))

    @torch.library.register_fake("dropreg::logit_gradient_sweep")
    def _sweep_fake(input, weight, bias, lse, row_const, T_stack, with_squares, target, target_amount, output_mask):
        op = "dropreg::logit_gradient_sweep"
        rows, dim, vocab = check_head(op, {"input": input}, weight, bias,
                                      _stand_in_target(input) if target is None else target)
        for name, per_row in (("lse", lse), ("row_const", row_const)):
            check_shape(op, name, per_row, (rows,))
        if T_stack is not None:
            check_shape(op, "T_stack", T_stack, (rows, (2 if with_squares else 1) * dim))
        torch._check((target is None) == (target_amount is None),
                     lambda: f"{op}: target and target_amount are given together")
        if target_amount is not None:
            check_shape(op, "target_amount", target_amount, (rows,))
        acc = accumulation_dtype(input.dtype)
        want_b = output_mask[2] and bias is not None
        return (input.new_empty((rows, dim) if output_mask[0] else (0,), dtype=acc),
                input.new_empty((vocab, dim) if output_mask[1] else (0,), dtype=acc),
                input.new_empty((vocab,) if want_b else (0,), dtype=acc))

    @torch.library.register_fake("dropreg::rdrop_statistics")
    def _rdrop_statistics_fake(input1, input2, weight, bias):
        rows, _, _ = check_head("dropreg::rdrop_statistics", {"input1": input1, "input2": input2}, weight, bias,
                                _stand_in_target(input1))
        acc = accumulation_dtype(input1.dtype)
        return input1.new_empty((2, rows), dtype=acc), input1.new_empty((2, rows), dtype=acc)

    @torch.library.register_fake("dropreg::rdrop_gradient_sweep")
    def _rdrop_sweep_fake(input1, input2, weight, bias, target, lse, expected_d, grad_ce1, grad_ce2, grad_kl,
                          output_mask):
        rows, dim, vocab = check_rdrop_backward("dropreg::rdrop_gradient_sweep", input1, input2, weight, bias, target,
                                                (grad_ce1, grad_ce2, grad_kl), lse, expected_d)
        acc = accumulation_dtype(input1.dtype)
        want_b = output_mask[3] and bias is not None
        return (input1.new_empty((2, rows, dim) if output_mask[0] or output_mask[1] else (0,), dtype=acc),
                input1.new_empty((vocab, dim) if output_mask[2] else (0,), dtype=acc),
                input1.new_empty((vocab,) if want_b else (0,), dtype=acc))


def check_rdrop_backward(op, input1, input2, weight, bias, target, upstream, lse, expected_d) -> tuple:
    """The checks of an R-Drop backward's operands; returns (N, d, V)."""
    rows, dim, vocab = check_head(op, {"input1": input1, "input2": input2}, weight, bias, target)
    check_per_row_grads(op, dict(zip(("grad_ce1", "grad_ce2", "grad_kl"), upstream)), rows)
    for name, saved in (("lse", lse), ("expected_d", expected_d)):
        check_shape(op, name, saved, (2, rows))
        check_dtype(op, name, saved, accumulation_dtype(input1.dtype))
    return rows, dim, vocab


def _stand_in_target(input):
    """The passes that take no target check the head on a stand-in (N,) int64 one."""
    return input.new_empty((input.shape[0],), dtype=torch.int64)


def _register_ce_with_grads_kernels() -> None:
    op = "dropreg::linear_ce_with_grads"

    @torch.library.register_fake(op)
    def _fake(input, weight, bias, target, row_weight, z_weight, block_rows, output_mask, softcap=None,
              smoothing_weights=None, smoothing_row_weight=None):
        rows, _, vocab = check_head(op, {"input": input}, weight, bias, target)
        check_per_row_grads(op, {"row_weight": row_weight}, rows)
        if z_weight is not None:
            check_per_row_grads(op, {"z_weight": z_weight}, rows)
        torch._check(block_rows >= 1, lambda: f"{op}: block_rows must be >= 1, got {block_rows}")
        torch._check(softcap is None or softcap > 0, lambda: f"{op}: softcap must be > 0, got {softcap}")
        torch._check((smoothing_weights is None) == (smoothing_row_weight is None),
                     lambda: f"{op}: smoothing_weights and smoothing_row_weight are given together")
        if smoothing_weights is not None:
            check_shape(op, "smoothing_weights", smoothing_weights, (vocab,))
            check_per_row_grads(op, {"smoothing_row_weight": smoothing_row_weight}, rows)
        loss = input.new_empty((2,), dtype=accumulation_dtype(input.dtype))
        grad_h = torch.empty_like(input) if output_mask[0] else input.new_empty((0,))
        grad_w = torch.empty_like(weight) if output_mask[1] else weight.new_empty((0,))
        grad_b = torch.empty_like(bias) if (output_mask[2] and bias is not None) else input.new_empty((0,))
        return loss, grad_h, grad_w, grad_b

    def setup_context(ctx, inputs, output):
        output_mask = inputs[7]
        ctx.mask = [wanted and x is not None for wanted, x in zip(output_mask, inputs[:3])]
        ctx.has_z = inputs[5] is not None
        ctx.save_for_backward(*inputs[:3], *output[1:])  # the inputs only link first_order_only's guard to them

    @first_order_only
    def backward(ctx, grad_loss, *_grads_of_gradients):  # the gradient outputs are saved results, not terms
        scale = combined_upstream(grad_loss, ctx.has_z)
        scaled = (g * scale.to(g.dtype) if wanted else None for g, wanted in zip(ctx.saved_tensors[3:], ctx.mask))
        return (*scaled, None, None, None, None, None, None, None, None)

    torch.library.register_autograd(op, backward, setup_context=setup_context)


def _register_softcap_kernels() -> None:
    """Fake kernels of the softcap passes; their autograd is dropreg/softcap.py's Function, which calls them."""
    @torch.library.register_fake("dropreg::softcap_statistics")
    def _statistics_fake(input, weight, bias, softcap, need_m1, need_m2, smoothing_weights):
        op = "dropreg::softcap_statistics"
        rows, dim, vocab = check_head(op, {"input": input}, weight, bias,
                                       input.new_empty((input.shape[0],), dtype=torch.int64))
        if smoothing_weights is not None:
            check_shape(op, "smoothing_weights", smoothing_weights, (vocab,))
        acc = accumulation_dtype(input.dtype)
        return (input.new_empty((rows,), dtype=acc), input.new_empty((rows if need_m1 else 0, dim), dtype=acc),
                input.new_empty((rows if need_m2 else 0, dim), dtype=acc),
                input.new_empty((rows if smoothing_weights is not None else 0,), dtype=acc))

    @torch.library.register_fake("dropreg::softcap_gradient_sweep")
    def _sweep_fake(input, weight, bias, softcap, lse, target, amount, row_const, T, Q, smoothing_weights,
                    grad_smoothing_sum, output_mask):
        op = "dropreg::softcap_gradient_sweep"
        rows, dim, vocab = check_head(op, {"input": input}, weight, bias, target)
        if smoothing_weights is not None:
            check_shape(op, "smoothing_weights", smoothing_weights, (vocab,))
            torch._check(grad_smoothing_sum is not None, lambda: f"{op}: smoothing_weights need grad_smoothing_sum")
            check_shape(op, "grad_smoothing_sum", grad_smoothing_sum, (rows,))
        acc = accumulation_dtype(input.dtype)
        for name, per_row in (("lse", lse), ("amount", amount), ("row_const", row_const)):
            check_shape(op, name, per_row, (rows,))
        for name, per_row in (("T", T), ("Q", Q)):
            if per_row is not None:
                check_shape(op, name, per_row, (rows, dim))
        want_b = output_mask[2] and bias is not None
        return (input.new_empty((rows, dim) if output_mask[0] else (0,), dtype=acc),
                input.new_empty((vocab, dim) if output_mask[1] else (0,), dtype=acc),
                input.new_empty((vocab,) if want_b else (0,), dtype=acc))


def _register_site_kernels() -> None:
    @torch.library.register_fake("dropreg::sample_targets")
    def _sample_fake(input, weight, bias, samples, seed):
        check_head("sample_targets", {"input": input}, weight, bias, _stand_in_target(input))
        torch._check(samples >= 1, lambda: f"sample_targets: samples must be >= 1, got {samples}")
        return input.new_empty((samples, input.shape[0]), dtype=torch.int64)


def cpu_ce_with_grads(input, weight, bias, target, row_weight, z_weight=None, *, block_rows=None):
    """CE only: ``[sum_i row_weight_i ce_i, sum_i z_weight_i lse_i^2]`` with the gradients formed in the forward
    (see dropreg/_dispatch.py)."""
    return cpu_ce_with_grads_softcap(input, weight, bias, target, row_weight, z_weight, None, block_rows=block_rows)


def cpu_ce_with_grads_softcap(input, weight, bias, target, row_weight, z_weight, softcap, smoothing_weights=None,
                              smoothing_row_weight=None, *, block_rows=None):
    """:func:`cpu_ce_with_grads` of a softcapped head (no cap when ``softcap`` is None), ``loss[0]`` less label
    smoothing's ``sum_i smoothing_row_weight_i S_i`` when ``smoothing_weights`` are given (see dropreg/_dispatch.py).
    ``block_rows``: rows per block (None: :func:`dropreg.streamed.ce_only_blocks`'s)."""
    load()
    block_rows = block_rows or streamed.ce_only_blocks(input.shape[0], weight.shape[0], input.dtype, input.device)[0]

    def optional(t):
        return None if t is None else t.contiguous()
    return torch.ops.dropreg.linear_ce_with_grads(
        input.contiguous(), weight.contiguous(), optional(bias), target.contiguous(), row_weight.contiguous(),
        optional(z_weight), block_rows, list(gradients_wanted(input, weight, bias)), softcap,
        optional(smoothing_weights), optional(smoothing_row_weight))[0]


def cpu_sample_targets(input, weight, bias, samples, seed):
    """(samples, N) Gumbel-max draws from the C++ kernels (see dropreg/_dispatch.py)."""
    load()
    return torch.ops.dropreg.sample_targets(input.detach().contiguous(), weight.detach().contiguous(),
                                            None if bias is None else bias.detach().contiguous(), samples,
                                            int64_seed(seed))
