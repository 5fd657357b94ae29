"""The ``"cpu"`` backend's passes (the contract of dropreg/ops.py): the C++ kernels of csrc/ as a statistics pass and
a gradient sweep over one slice of the vocabulary. The kernels know no per-row algebra: around them run the same
drivers as the ``"torch"`` backend's (dropreg/streamed.py) with the C++ sweep in place of the chunked PyTorch one, so
a head held whole and a slice of one differ only in the reducer.
"""
from __future__ import annotations

import torch

from . import cpu
from .rows import SliceStatistics
from .streamed import StreamedPasses, softmax_mean_backward, terms_backward


def _ops():
    cpu.load()
    return torch.ops.dropreg


def cpp_logit_gradient_sweep(h_block, weight, bias, lse, target, g_ce, T_stack, row_const, with_squares, vocab_chunk,
                             wants, grad_w=None, grad_b=None):
    """:func:`dropreg.streamed.logit_gradient_sweep`'s contract on the C++ sweep (``dropreg::logit_gradient_sweep``,
    its own vocabulary tiles: ``vocab_chunk`` is unused)."""
    want_h, want_w, want_b = wants
    want_b = want_b and bias is not None
    grad_h_block, grad_w_part, grad_b_part = _ops().logit_gradient_sweep(
        h_block.contiguous(), weight, bias, lse.contiguous(), row_const.contiguous(),
        None if T_stack is None else T_stack.contiguous(), with_squares, target, g_ce, [want_h, want_w, want_b])

    def accumulate(buffer, part, wanted):
        if not wanted:
            return buffer
        return part if buffer is None else buffer.add_(part)
    return (grad_h_block if want_h else None, accumulate(grad_w, grad_w_part, want_w),
            accumulate(grad_b, grad_b_part, want_b))


class CppPasses(StreamedPasses):
    """The C++ kernels as passes; what they lack (R-Drop of a capped head) runs the inherited streamed passes. The C++
    sweep takes every row at once (its tiles are vocabulary-parallel), so its drivers run one row block."""

    name = "cpu"

    @staticmethod
    def operands(input, weight, bias):
        return input.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous()

    def statistics(self, h, weight, bias, *, need_mu, need_m2) -> SliceStatistics:
        lse, mu, m2 = _ops().vocab_statistics(h, weight, bias, need_mu or need_m2, need_m2)
        return SliceStatistics(lse, mu if need_mu else None, m2=m2 if need_m2 else None)

    def terms_sweep(self, h, weight, bias, target, owned, signs, lse, mu, var, grad_ce, grad_quadratic,
                    grad_sign_term, grad_mu, need_explicit, need_implicit, wants, extra):
        if grad_mu is not None and grad_mu.numel() == 0:
            grad_mu = None
        return terms_backward(h, weight, bias, target, signs, lse, mu, var, grad_ce, grad_quadratic, grad_sign_term,
                              need_explicit, need_implicit, max(h.shape[0], 1), None, wants, owns_target=owned,
                              grad_mu=grad_mu, sweep=cpp_logit_gradient_sweep)

    def softmax_mean_sweep(self, h, weight, bias, lse, mu, grad_mu, wants, extra):
        return softmax_mean_backward(h, weight, bias, lse, mu, grad_mu, max(h.shape[0], 1), None, wants,
                                     sweep=cpp_logit_gradient_sweep)

    def rdrop_statistics(self, h1, h2, weight, bias, softcap):
        if softcap is not None:
            return super().rdrop_statistics(h1, h2, weight, bias, softcap)
        return _ops().rdrop_statistics(h1.contiguous(), h2.contiguous(), weight, bias)

    def rdrop_sweep(self, h1, h2, weight, bias, target, owned, lse, expected_d, grad_ce1, grad_ce2, grad_kl, wants,
                    softcap):
        if softcap is not None:
            return super().rdrop_sweep(h1, h2, weight, bias, target, owned, lse, expected_d, grad_ce1, grad_ce2,
                                       grad_kl, wants, softcap)
        if owned is not None:
            target = torch.where(owned, target, torch.full_like(target, -1))  # -1: no target correction here
        want_h1, want_h2, want_w, want_b = wants
        want_b = want_b and bias is not None
        grad_h, grad_w, grad_b = _ops().rdrop_gradient_sweep(
            h1.contiguous(), h2.contiguous(), weight, bias, target, lse, expected_d, grad_ce1, grad_ce2, grad_kl,
            [want_h1, want_h2, want_w, want_b])
        return (grad_h if want_h1 or want_h2 else None, grad_w if want_w else None, grad_b if want_b else None)

    def capped_statistics(self, h, weight, bias, softcap, need_m1, need_m2, omega=None):
        lse, m1, m2, smoothing_sum = _ops().softcap_statistics(h, weight, bias, softcap, need_m1, need_m2, omega)
        return lse, (m1 if need_m1 else None), (m2 if need_m2 else None), (None if omega is None else smoothing_sum)

    def capped_sweep(self, h, weight, bias, softcap, lse, target, amount, row_const, T_vec, Q, wants, omega=None,
                     grad_sum=None):
        grads = _ops().softcap_gradient_sweep(h, weight, bias, softcap, lse, target, amount, row_const, T_vec,
                                                   Q, omega, grad_sum, list(wants))
        return tuple(g if wanted else None for g, wanted in zip(grads, wants))

    def ce_gradients(self, *args, **kwargs):
        raise NotImplementedError("the C++ CE-only path is the registered op dropreg::linear_ce_with_grads "
                                  "(dropreg.cpu.cpu_ce_with_grads)")

    def sample_targets(self, input, weight, bias, samples, seed):
        return cpu.cpu_sample_targets(input, weight, bias, samples, seed)
