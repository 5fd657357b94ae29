"""The ``"cpu"`` backend's passes (the contract of dropreg/ops.py): the C++ kernels of csrc/ as a statistics pass and
a gradient sweep over one slice of the vocabulary.

The kernels return the slice's per-row lse and expectations under its own softmax, which is what the reducers merge.
Their backward takes the head's per-row statistics and the rows' targets; on a sliced head it runs with every
target set to the slice's class 0, and the target's terms are then moved to the slice that owns them here (O(N d)).
A head held whole in one process calls the registered ops directly (dropreg/cpu.py: their autograd is
``torch.library``'s, so ``torch.compile(fullgraph=True)`` traces them); these passes serve the sliced head and the
capped one.
"""
from __future__ import annotations

import torch

from . import cpu, rows
from .rows import SliceStatistics
from .streamed import StreamedPasses


def _move_target_terms(grad_w, grad_b, h, classes, owned, amount):
    """The backward ran with target 0 on every row: give back ``amount * h`` (and ``amount``) to class 0 and take
    them from the owned rows' real classes (grad_W[y] -= amount h, grad_b[y] -= amount)."""
    owned_amount = amount * owned.to(amount.dtype)
    if grad_w is not None:
        grad_w[0] += amount @ h
        grad_w.index_add_(0, classes, -owned_amount[:, None] * h)
    if grad_b is not None:
        grad_b[0] += amount.sum()
        grad_b.index_add_(0, classes, -owned_amount)


class CppPasses(StreamedPasses):
    """The C++ kernels as passes; what they lack (R-Drop of a capped head) runs the inherited streamed passes."""

    name = "cpu"

    @staticmethod
    def operands(input, weight, bias):
        return input.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous()

    @staticmethod
    def _ops():
        cpu.load()
        return torch.ops.dropreg

    def statistics(self, h, weight, bias, *, need_mu, need_m2) -> SliceStatistics:
        class_zero = torch.zeros(h.shape[0], dtype=torch.int64, device=h.device)
        # mu alone: the implicit term's flag (its signs, drawn in the kernel, are O(N d) and unused here)
        _, _, _, lse, mu, var = self._ops().linear_ce_forward(h, weight, bias, class_zero, None, 0, need_m2,
                                                              need_mu and not need_m2)
        return SliceStatistics(lse, mu if need_mu else None, var=var if need_m2 else None)

    def terms_sweep(self, h, weight, bias, target, owned, signs, lse, mu, var, grad_ce, grad_quadratic,
                    grad_sign_term, grad_mu, need_explicit, need_implicit, wants, extra):
        want_h, want_w, want_b = wants
        acc = lse.dtype
        g_ce, g_r, g_i = (g.to(acc).contiguous() for g in (grad_ce, grad_quadratic, grad_sign_term))
        if grad_mu is not None and (grad_mu.numel() == 0 or not (need_explicit or need_implicit)):
            grad_mu = None
        empty = h.new_empty((0, h.shape[1]), dtype=acc)
        grad_h, grad_w, grad_b = self._ops().linear_ce_backward(
            g_ce, g_r, g_i, None if grad_mu is None else grad_mu.to(acc).contiguous(), h, weight, bias,
            target if owned is None else torch.zeros_like(target), signs, 0, lse,
            empty if mu is None else mu.contiguous(), empty if var is None else var.contiguous(), need_explicit,
            need_implicit, [want_h, want_w, want_b and bias is not None])
        grad_w = grad_w.to(acc) if want_w else None
        grad_b = grad_b.to(acc) if want_b and bias is not None else None
        if owned is None:  # the kernel's grad_input is the whole of it
            return (grad_h.to(acc) if want_h else None), None, grad_w, grad_b
        hc = h.to(acc)
        _move_target_terms(grad_w, grad_b, hc, target, owned, g_ce)
        if need_implicit:
            _move_target_terms(grad_w, None, signs * hc, target, owned, g_i)
        if not want_h:
            return None, None, grad_w, grad_b
        # The kernel's grad_input is W^T G + 2 g_R h var + g_I sigma (mu - W[0]), with G's target at class 0.
        per_row = rows.input_row_gradient(hc, signs, mu, var, g_r, g_i, need_explicit, need_implicit)
        w_zero, w_target = weight[0].to(acc), weight[target].to(acc) * owned.to(acc)[:, None]
        vocab_part = grad_h.to(acc) - per_row + g_ce[:, None] * (w_zero - w_target)
        if need_implicit:
            vocab_part += g_i[:, None] * signs * (w_zero - w_target)
        return vocab_part, per_row, grad_w, grad_b

    def softmax_mean_sweep(self, h, weight, bias, lse, mu, grad_mu, wants, extra):
        want_h, want_w, want_b = wants
        grad_h, grad_w, grad_b = self._ops().softmax_mean_backward(grad_mu.to(lse.dtype).contiguous(), h, weight,
                                                                   bias, lse, mu,
                                                                   [want_h, want_w, want_b and bias is not None])
        return (grad_h.to(lse.dtype) if want_h else None, grad_w if want_w else None,
                grad_b if want_b and bias is not None else None)

    def rdrop_statistics(self, h1, h2, weight, bias, softcap):
        if softcap is not None:
            return super().rdrop_statistics(h1, h2, weight, bias, softcap)
        class_zero = torch.zeros(h1.shape[0], dtype=torch.int64, device=h1.device)
        _, _, _, lse, expected_d = self._ops().rdrop_forward(h1.contiguous(), h2.contiguous(), weight, bias,
                                                             class_zero)
        return lse, expected_d

    def rdrop_sweep(self, h1, h2, weight, bias, target, owned, lse, expected_d, grad_ce1, grad_ce2, grad_kl, wants,
                    softcap):
        if softcap is not None:
            return super().rdrop_sweep(h1, h2, weight, bias, target, owned, lse, expected_d, grad_ce1, grad_ce2,
                                       grad_kl, wants, softcap)
        want_h1, want_h2, want_w, want_b = wants
        acc = lse.dtype
        upstream = [g.to(acc).contiguous() for g in (grad_ce1, grad_ce2, grad_kl)]
        want_h = want_h1 or want_h2
        grad_h1, grad_h2, grad_w, grad_b = self._ops().rdrop_backward(
            *upstream, h1.contiguous(), h2.contiguous(), weight, bias,
            target if owned is None else torch.zeros_like(target), lse, expected_d,
            [want_h, want_h, want_w, want_b and bias is not None])
        grad_w = grad_w.to(acc) if want_w else None
        grad_b = grad_b.to(acc) if want_b and bias is not None else None
        if owned is None:
            grad_h = torch.stack([grad_h1.to(acc), grad_h2.to(acc)]) if want_h else None
            return grad_h, grad_w, grad_b
        grad_h = None
        if want_h:
            w_zero, w_target = weight[0].to(acc), weight[target].to(acc) * owned.to(acc)[:, None]
            grad_h = torch.stack([g.to(acc) + g_ce[:, None] * (w_zero - w_target)
                                  for g, g_ce in ((grad_h1, upstream[0]), (grad_h2, upstream[1]))])
        for h, g_ce in ((h1, upstream[0]), (h2, upstream[1])):
            _move_target_terms(grad_w, grad_b, h.to(acc), target, owned, g_ce)
        return grad_h, grad_w, grad_b

    def capped_statistics(self, h, weight, bias, softcap, need_m1, need_m2, omega=None):
        lse, m1, m2, smoothing_sum = self._ops().softcap_statistics(h, weight, bias, softcap, need_m1, need_m2, omega)
        return lse, (m1 if need_m1 else None), (m2 if need_m2 else None), (None if omega is None else smoothing_sum)

    def capped_sweep(self, h, weight, bias, softcap, lse, target, amount, row_const, T_vec, Q, wants, omega=None,
                     grad_sum=None):
        grads = self._ops().softcap_gradient_sweep(h, weight, bias, softcap, lse, target, amount, row_const, T_vec,
                                                   Q, omega, grad_sum, list(wants))
        return tuple(g if wanted else None for g, wanted in zip(grads, wants))

    def ce_gradients(self, *args, **kwargs):
        raise NotImplementedError("the C++ CE-only path is the registered op dropreg::linear_ce_with_grads "
                                  "(dropreg.cpu.cpu_ce_with_grads)")

    def sample_targets(self, input, weight, bias, samples, seed):
        return cpu.cpu_sample_targets(input, weight, bias, samples, seed)
