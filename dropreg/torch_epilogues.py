"""The chunked driver's epilogues in PyTorch (:class:`TorchEpilogues`): the elementwise work on one R x C chunk
between its GEMMs, on any device, and the definition the Triton kernels (dropreg/triton/epilogues.py, same
signatures) are tested against. :func:`epilogues_for` picks one of the two."""
from __future__ import annotations

import torch

from .chunk_buffers import add_weight_gradient, sweep_rows_from
from .gemm import operand_types
from .rows import (input_row_gradient, logit_shift, moved_reference, reference_headroom, row_modulation,
                   whole_head_terms)


class TorchEpilogues:
    """The chunk epilogues in PyTorch: any device, and the definition the Triton kernels are tested against."""

    name = "torch"

    @staticmethod
    def softmax_chunk(z, bias, running_max, running_sum, mass, probs, *, keep_logits=False):
        """Absorbs the logit chunk ``z + bias`` (R x C, accumulation dtype) into the online softmax, in place.

        Updates ``running_max``, the row's reference (a logit seen, at most :func:`dropreg.rows.reference_headroom`
        below the largest: it moves only when a chunk rises further, :func:`dropreg.rows.moved_reference`),
        ``running_sum`` (exact ``sum exp(z - reference)``) and, when ``probs``
        (R x C, operand dtype) is given, writes ``probs = exp(z + b - reference)`` rounded to its dtype and adds the
        sum of what was written to ``mass``. Returns ``(rescale, top_p, top_col)`` per row: the factor for what
        earlier chunks accumulated (exactly 1 where the reference stayed), the chunk's largest value
        ``exp(chunk max - reference)`` and its column. ``z`` is overwritten
        unless ``keep_logits``."""
        if keep_logits:
            z = z.clone()
        if bias is not None:
            z += bias.to(z.dtype)
        chunk_max, top_col = z.max(dim=1)
        new_max = moved_reference(running_max, z[:, 0], chunk_max,
                                  reference_headroom(z.dtype if probs is None else probs.dtype))
        shift = logit_shift(new_max)
        rescale = torch.exp(running_max - shift)
        e = z.sub_(shift[:, None]).exp_()
        running_sum.mul_(rescale).add_(e.sum(dim=1))
        top_p = torch.exp(chunk_max - shift)
        if probs is not None:
            probs.copy_(e)
            mass.mul_(rescale).add_(probs.sum(dim=1, dtype=mass.dtype))
        running_max.copy_(new_max)
        return rescale, top_p, top_col

    @staticmethod
    def finish_moments(moments, normalizer, weight, top, operand, square_scale, head=None):
        """A row block's moments ``[A1 | A2]`` (R x d or R x 2d, accumulation dtype, on the scale of ``normalizer``)
        finished in place into ``[mu | var]``: ``A2`` divided by ``square_scale`` (None: 1), both divided by
        ``normalizer``, the dominant entry made exact when ``top`` (a :class:`dropreg.chunk_buffers.DominantEntry`)
        is given (:meth:`~dropreg.chunk_buffers.DominantEntry.normalize`; ``normalizer``, the mass, gets it too), then
        ``var = m2 - mu^2``. ``head`` (a
        :class:`dropreg.chunk_buffers.HeadTerms` of these rows): its terms are written from them
        (:func:`dropreg.rows.whole_head_terms`)."""
        dim = weight.shape[1]
        with_m2 = moments.shape[1] > dim
        if top is not None:
            top.normalize(moments, normalizer, weight, with_m2, operand, square_scale)
        else:
            if with_m2 and square_scale is not None:
                moments[:, dim:].div_(square_scale)
            moments.div_(normalizer[:, None])
        if with_m2:
            mu = moments[:, :dim]
            moments[:, dim:].addcmul_(mu, mu, value=-1.0)
        if head is not None:
            terms = whole_head_terms(head.h, weight, head.bias, head.target, head.signs, head.lse, moments[:, :dim],
                                     moments[:, dim:] if with_m2 else None, head.need_explicit, head.need_implicit)
            for out, value in zip((head.ce, head.quadratic, head.sign_term), terms):
                out.copy_(value)

    @staticmethod
    def sweep_rows(h, weight, bias, target, top_class, signs, mu, var, lse, g_ce, g_r, g_i, g_i_target, grad_mu,
                   need_explicit, need_implicit, operand, fold_rows, want_h, want_w):
        """A row block's :class:`dropreg.chunk_buffers.SweepRows` with the explicit and/or implicit term
        (docs/math.md 4.3, 4.4): the modulation of :func:`dropreg.rows.row_modulation`; the implicit term's target
        rows ``-g_i_target u`` scattered to ``target``'s rows of grad_W (``g_i_target``: ``g_i`` where this slice
        owns the target, else 0) and ``-g_i_target sigma W_y`` in grad_input's initial value, which ``fold_rows``
        (a head held whole) starts with the row-wise parts too (:func:`dropreg.rows.input_row_gradient`).
        ``top_class``: each row's dominant class (narrow operands), or None."""
        hc = h.to(lse.dtype)
        rows = row_modulation(hc, g_ce, mu, var, signs, g_r, g_i, grad_mu, 0, hc.shape[0], need_explicit,
                              need_implicit)
        extra = (target, -g_i_target[:, None] * rows.u) if need_implicit and want_w else None
        sweep = sweep_rows_from(hc, weight, bias, lse, rows, top_class, need_explicit, operand, want_h, want_w,
                                extra)
        if want_h:
            if fold_rows:
                sweep.grad_h += input_row_gradient(hc, signs, mu, var, g_r, g_i, need_explicit, need_implicit)
            if need_implicit:
                sweep.grad_h -= g_i_target[:, None] * signs * weight[target].to(hc.dtype)
        return sweep

    @staticmethod
    def add_weight_gradient(grad_w, v0, v1, a, b, acc, overwrite, weight=None, s_g_r_q=None, scatter=None, index=0):
        """:func:`dropreg.chunk_buffers.add_weight_gradient` with chunk ``index``'s rows of a
        :class:`dropreg.chunk_buffers.RowScatter` (or None)."""
        add_weight_gradient(grad_w, v0, v1, a, b, acc, overwrite, weight, s_g_r_q,
                            None if scatter is None else scatter.chunk(index, v0))

    @staticmethod
    def gradient_chunk(z, bias, t, lse, row_const, g_ce, target_col, out, top_col=None, t_top=None, *, grad_b=None):
        """The logit gradient of one chunk into ``out`` (operand dtype): rows ``[0, R)`` get
        ``G = s (row_const + t) - g_ce [col = target_col]`` with ``s = exp(z + b - lse)``, rows ``[R, 2R)`` get ``S``
        when ``out`` has them (the modulated backward needs S for grad_W). ``t`` None: ``G = s row_const - ...``;
        ``target_col`` None: no target (softmax_mean). ``top_col``/``t_top``: per row, a column whose ``t`` is
        replaced by the exact ``t_top`` and whose ``S`` is written as 0 (the row's dominant class, docs/math.md 7.3:
        the driver adds its grad_W part exactly); columns outside the chunk change nothing. ``grad_b`` (C, the
        accumulation dtype): G's column sums, before its rounding, are added to it. ``z`` and ``t`` are
        overwritten."""
        rows = z.shape[0]
        if top_col is not None:
            _replace_at(t, top_col, t_top)
        if bias is not None:
            z += bias.to(z.dtype)
        probs = z.sub_(lse[:, None]).exp_()
        if out.shape[0] > rows:
            out[rows:].copy_(probs)
            if top_col is not None:  # S without the dominant class: the driver adds that class's grad_W part exactly
                _replace_at(out[rows:], top_col, torch.zeros(rows, dtype=out.dtype, device=out.device))
        g = probs.mul_(row_const[:, None]) if t is None else t.add_(row_const[:, None]).mul_(probs)
        if target_col is not None:
            in_chunk = (target_col >= 0) & (target_col < z.shape[1])
            g.scatter_add_(1, target_col.clamp(0, z.shape[1] - 1)[:, None],
                           torch.where(in_chunk, -g_ce, torch.zeros_like(g_ce))[:, None])
        out[:rows].copy_(g)
        if grad_b is not None:
            grad_b += g.sum(dim=0)

    @staticmethod
    def rdrop_softmax_chunk(z1, z2, bias, running_max, running_sum, weighted_d):
        """R-Drop's forward epilogue, in place on the (2, R) states: per pass i the online softmax of ``z_i + b``
        and ``B_i = sum exp(z_i + b - max_i) D`` with ``D = z1 - z2`` (the bias cancels in D)."""
        diff = z1 - z2
        for i, z in enumerate((z1, z2)):
            if bias is not None:
                z += bias.to(z.dtype)
            new_max = torch.maximum(running_max[i], z.amax(dim=1))
            shift = logit_shift(new_max)
            rescale = torch.exp(running_max[i] - shift)
            e = z.sub_(shift[:, None]).exp_()
            running_sum[i] = running_sum[i] * rescale + e.sum(dim=1)
            weighted_d[i] = weighted_d[i] * rescale + (e * diff).sum(dim=1)
            running_max[i] = new_max

    @staticmethod
    def rdrop_gradient_chunk(z1, z2, bias, lse, expected_d, g_ce1, g_ce2, half_kl, target_col, out, *, grad_b=None):
        """R-Drop's logit gradients of one chunk (docs/math.md 9.3) into ``out`` (2R x C, operand dtype): G1 in rows
        ``[0, R)``, G2 in ``[R, 2R)``; ``grad_b`` (C), when given, gets ``G1 + G2``'s column sums before their
        rounding. ``z1``, ``z2`` are overwritten."""
        rows = z1.shape[0]
        diff = z1 - z2
        if bias is not None:
            z1 += bias.to(z1.dtype)
            z2 += bias.to(z2.dtype)
        p1 = z1.sub_(lse[0][:, None]).exp_()
        p2 = z2.sub_(lse[1][:, None]).exp_()
        k = half_kl[:, None]
        g1 = p1 * (g_ce1[:, None] + k * (diff - expected_d[0][:, None] + 1)) - k * p2
        g2 = p2 * (g_ce2[:, None] - k * (diff - expected_d[1][:, None] - 1)) - k * p1
        in_chunk = (target_col >= 0) & (target_col < z1.shape[1])
        col = target_col.clamp(0, z1.shape[1] - 1)[:, None]
        for g, g_ce in ((g1, g_ce1), (g2, g_ce2)):
            g.scatter_add_(1, col, torch.where(in_chunk, -g_ce, torch.zeros_like(g_ce))[:, None])
        out[:rows].copy_(g1)
        out[rows:].copy_(g2)
        if grad_b is not None:  # G1 + G2's column sums, before their rounding
            grad_b += g1.sum(dim=0) + g2.sum(dim=0)


def _replace_at(values, cols, replacement):
    """``values[i, cols[i]] = replacement[i]`` for the rows whose column lies in ``[0, values.shape[1])``."""
    inside = (cols >= 0) & (cols < values.shape[1])
    safe = cols.clamp(0, values.shape[1] - 1)[:, None]
    values.scatter_(1, safe, torch.where(inside, replacement, values.gather(1, safe).squeeze(1))[:, None])


def epilogues_for(device: torch.device, dtype: torch.dtype, choice=None):
    """The epilogues a plan names (``choice``: "torch" or "triton"), or by default the Triton ones for CUDA tensors
    accumulated in fp32 and PyTorch's elsewhere (fp64 problems, CPU tensors)."""
    if choice == "triton" or (choice is None and device.type == "cuda" and operand_types(dtype).acc == torch.float32):
        from .triton import epilogues as triton_epilogues  # imported on first use: triton is optional

        return triton_epilogues.TRITON_EPILOGUES
    return TorchEpilogues
