"""The chunked driver's workspace and per-row records: flat buffers viewed as R x C chunks, the ``W_c*W_c`` operand
(with fp16's square scaling, docs/math.md 7.3), grad_W's buffer and per-chunk update (with the rows scattered into it
by class), and each row's dominant entry: the forward's exact correction and the class the backward keeps exact."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .gemm import as_operand, mm, operand_types


@dataclass
class ChunkBuffers:
    """The workspace of one call: flat buffers viewed as contiguous R x C (or 2R x C) matrices per chunk."""
    logits: torch.Tensor
    second: Optional[torch.Tensor]  # t (linear_ce backward) or z2 (R-Drop), accumulation dtype
    outputs: Optional[torch.Tensor]  # probs (forward) or [G; S] / [G1; G2] (backward), operand dtype

    @staticmethod
    def allocate(row_block, vocab_chunk, acc, operand, device, *, second, outputs):
        entries = row_block * vocab_chunk
        return ChunkBuffers(torch.empty(entries, dtype=acc, device=device),
                            torch.empty(entries, dtype=acc, device=device) if second else None,
                            torch.empty(outputs * entries, dtype=operand, device=device) if outputs else None)

    @staticmethod
    def view(flat, rows, cols):
        return flat[:rows * cols].view(rows, cols)


def squares_operand(w, w_op, dtype, square_scale=None):
    """``W_c*W_c`` as an operand: the square of the operand ``w_op`` rounded once to ``dtype``, as a tensor core
    would see it (a bf16 product of bf16 values is the exact square rounded); with ``square_scale`` (see
    :func:`squares_scale`) the exact square of ``w`` times that power of two, rounded once. The GEMMs take it
    beside ``W_c`` (two products into the halves of one output) instead of a concatenated ``[W_c | W_c*W_c]``,
    which would copy W_c once more per chunk."""
    if square_scale is None:
        return w_op * w_op
    return as_operand(w.to(square_scale.dtype).square() * square_scale, dtype)


def squares_scale(weight, types, need_m2):
    """The power of two that the fp16 forward's W*W operand is multiplied by (m2 is divided by it afterwards, both
    exact), or None. fp16's range is too narrow for the squares: |W| >= 256 overflows (256^2 > 65504) and
    |W| < 2^-7 lands among the subnormals; scaled, the largest square lies in [2^14, 2^15). bf16 has fp32's range."""
    if not need_m2 or types.forward != torch.float16:
        return None
    peak = weight.detach().abs().amax().to(types.acc)
    exponent = torch.floor(torch.log2(peak * peak)).clamp(-100, 100)  # an all-zero W gives -inf: clamped
    return torch.exp2(14 - exponent)


class RowScatter:
    """Per-row vectors summed into grad_W's rows by class: the implicit term's target rows and the dominant classes'
    exact parts (:func:`dropreg.chunked.gradient_sweep`), ``values[k] * scales[k]`` (``scales`` None: 1) into the row
    of ``classes[k]``. With ``u_rows = (h, signs)``, the entries past ``values`` are ``u = signs * h`` of row
    ``k - len(values)`` (the target rows' vector, formed where it is summed rather than stored). The rows are sorted
    by class (stable) and each class's rows summed in that order (no atomics, so the result is the same on every
    run), and each chunk's sums are added to its fp32 grad_W before that is rounded once: by :func:`add_weight_gradient` (``chunk``: the sums, ``segment_reduce``; finding where the chunks begin
    reads the classes on the host) or by a kernel walking :attr:`order` (``class_starts``: no host synchronization).
    Meta tensors have no values: there (tools/traffic.py) every row counts as its own class."""

    def __init__(self, classes, values, scales, chunk_starts, u_rows=None):
        self.values, self.scales, self.chunk_starts, self.u_rows = values, scales, chunk_starts, u_rows
        self.order = torch.argsort(classes, stable=True)
        self.sorted_classes = classes[self.order]
        self._sums = None

    def class_starts(self, v0, v1):
        """Where each class of ``[v0, v1]`` begins in :attr:`order` (``v1 - v0 + 1`` entries)."""
        wanted = torch.arange(v0, v1 + 1, dtype=self.sorted_classes.dtype, device=self.sorted_classes.device)
        return torch.searchsorted(self.sorted_classes, wanted)

    def chunk(self, index, v0):
        """The ``index``-th chunk's classes (from its first row ``v0``) and sums."""
        if self._sums is None:
            values = self.values
            if self.u_rows is not None:
                h, signs = self.u_rows
                values = torch.cat([values, signs.to(values.dtype) * h.to(values.dtype)])
            values = values if self.scales is None else values * self.scales[:, None]
            values = values[self.order]
            if values.device.type == "meta":
                classes, sums = self.sorted_classes, values
                per_chunk = -(-len(classes) // max(1, len(self.chunk_starts)))
                bounds = [min(i * per_chunk, len(classes)) for i in range(len(self.chunk_starts) + 1)]
            else:
                classes, counts = torch.unique_consecutive(self.sorted_classes, return_counts=True)
                sums = torch.segment_reduce(values, "sum", lengths=counts, axis=0)
                starts = torch.tensor(self.chunk_starts, dtype=classes.dtype, device=classes.device)
                bounds = torch.searchsorted(classes, starts).tolist() + [len(classes)]
            self._sums = classes, sums, bounds
        classes, sums, bounds = self._sums
        lo, hi = bounds[index], bounds[index + 1]
        return classes[lo:hi] - v0, sums[lo:hi]


@dataclass
class HeadTerms:
    """A head held whole: what finishing its statistics also needs (``h``, ``bias``, the rows' ``target`` and
    ``signs``, ``lse``) and the per-row terms it writes (``ce``, ``quadratic``, ``sign_term``), for some rows."""
    h: torch.Tensor
    bias: Optional[torch.Tensor]
    target: torch.Tensor
    signs: Optional[torch.Tensor]
    lse: torch.Tensor
    need_explicit: bool
    need_implicit: bool
    ce: torch.Tensor
    quadratic: torch.Tensor
    sign_term: torch.Tensor

    def rows(self, r0, r1) -> "HeadTerms":
        def part(t):
            return None if t is None else t[r0:r1]

        return HeadTerms(self.h[r0:r1], self.bias, self.target[r0:r1], part(self.signs), self.lse[r0:r1],
                         self.need_explicit, self.need_implicit, self.ce[r0:r1], self.quadratic[r0:r1],
                         self.sign_term[r0:r1])


@dataclass
class SweepRows:
    """What one row block's gradient sweep takes per row, formed before it (the epilogues' ``sweep_rows``, or
    :func:`sweep_rows_from` for softmax_mean and plain cross entropy):

    ``row_const`` (R); ``stacked``: ``[H; T]`` (2R x d, operand dtype; ``H`` alone, R x d, unmodulated): the left
    operand of the logits and of ``t``, and grad_W's right operand (``G^T H + S^T T`` as one product, K = 2R);
    ``g_r_q``: ``gR' q`` in the operand dtype (explicit term), else None; ``t_top``: each row's dominant class's exact
    ``t`` (narrow operands), else None; ``grad_h``: grad_input's initial value, to which the GEMMs add ``W^T G``
    (None unless wanted); ``scatter``: ``(classes, values, scales, u_rows)`` for a :class:`RowScatter`, or None."""
    row_const: torch.Tensor
    stacked: torch.Tensor
    g_r_q: Optional[torch.Tensor]
    t_top: Optional[torch.Tensor]
    grad_h: Optional[torch.Tensor]
    scatter: Optional[tuple]

    @property
    def modulated(self) -> bool:
        return self.stacked.shape[0] > self.row_const.shape[0]


def sweep_rows_from(hc, weight, bias, lse, rows, top_class, with_squares, operand, want_h, want_w, extra=None):
    """:class:`SweepRows` from a :class:`dropreg.rows.RowModulation` (``rows``; None: plain cross entropy, with
    ``row_const = g_ce`` given as ``extra``), in PyTorch. ``top_class`` (narrow operands): each row's dominant class,
    whose ``t`` and grad_W part ``s_k (T + 2 gR' q W_k)`` are formed in the accumulation dtype (docs/math.md 7.3).
    ``extra``: with ``rows``, further ``(classes, values)`` to scatter (the implicit term's target rows)."""
    acc = hc.dtype
    h_op = as_operand(hc, operand)
    grad_h = torch.zeros_like(hc) if want_h else None
    if rows is None:
        return SweepRows(extra, h_op, None, None, grad_h, None)
    parts = [] if extra is None else [extra]
    t_top = None
    if top_class is not None:
        w_top = weight[top_class].to(acc)
        t_top = (rows.T_stack * (torch.cat([w_top, w_top * w_top], dim=1) if with_squares else w_top)).sum(1)
        if want_w:
            z_top = (hc * w_top).sum(1) + (0.0 if bias is None else bias[top_class].to(acc))
            part = rows.T_vec + 2.0 * rows.g_r_q * w_top if with_squares else rows.T_vec
            parts.append((top_class, torch.exp(z_top - lse)[:, None] * part))
    scatter = None
    if want_w and parts:
        scatter = (torch.cat([c for c, _ in parts]), torch.cat([v for _, v in parts]), None, None)
    return SweepRows(rows.row_const, torch.cat([h_op, as_operand(rows.T_vec, operand)]),
                     as_operand(rows.g_r_q, operand) if with_squares else None, t_top, grad_h, scatter)


def add_weight_gradient(grad_w, v0, v1, a, b, acc, overwrite, weight=None, s_g_r_q=None, scattered=None):
    """grad_W's rows ``[v0, v1)`` get ``a @ b`` (``+ 2 weight * s_g_r_q``, the explicit term's part, when given; plus
    ``scattered = (rows, sums)`` from a :class:`RowScatter`): written (``overwrite``: the first row block; with one
    block grad_W is in the weight's dtype and rounded once) or added to the fp32 buffer by the GEMM itself (no
    product written apart and added)."""
    rows = grad_w[v0:v1]
    if not overwrite:
        mm(a, b, acc, out=rows, accumulate=True)
        if s_g_r_q is not None:
            rows.addcmul_(weight, s_g_r_q, value=2.0)
        if scattered is not None:
            rows.index_add_(0, *scattered)  # each class once: no two adds meet
        return
    if rows.dtype == acc and s_g_r_q is None and scattered is None:
        mm(a, b, acc, out=rows)
        return
    product = mm(a, b, acc)
    if scattered is not None:
        product.index_add_(0, *scattered)
    if s_g_r_q is None:
        rows.copy_(product)
    else:  # one elementwise pass: the fp32 sum is rounded once into grad_W's dtype
        torch.addcmul(product, weight, s_g_r_q, value=2.0, out=rows)


def grad_weight_buffer(weight, acc, n_row_blocks):
    """grad_W, uninitialized (the first row block writes every chunk's rows): in the weight's dtype when one row block
    writes each chunk once (no V x d fp32 copy), else in the accumulation dtype, summed over the row blocks."""
    return torch.empty(weight.shape, dtype=weight.dtype if n_row_blocks == 1 else acc, device=weight.device)


class DominantEntry:
    """Per row, the largest probability of the chunks seen so far (on the running scale, like the moments), as the
    moment GEMMs saw it (rounded to the operand dtype) and exact, and its class.

    On a confident row ``var = m2 - mu^2`` cancels down to ``(1 - s_top)`` of its parts, so the dominant entry's
    rounding (of ``s_top`` and of ``W_top*W_top``) would dominate the result (docs/math.md 8.4). Every entry goes
    through the GEMMs rounded; once the last chunk is seen, :meth:`normalize` swaps the dominant entry's rounded
    contribution for the exact one: one O(R d) correction per row block instead of one per chunk."""

    def __init__(self, rows, acc, device):
        self.exact = torch.zeros(rows, dtype=acc, device=device)
        self.seen = torch.zeros(rows, dtype=acc, device=device)
        self.col = torch.zeros(rows, dtype=torch.int64, device=device)

    def update(self, rescale, top_p, top_col, operand):
        """A chunk's largest probability ``top_p`` (on the new scale) and its class ``top_col``."""
        self.exact.mul_(rescale)
        self.seen.mul_(rescale)
        better = top_p > self.exact  # strict: the first class reaching the maximum, as torch.max
        self.exact = torch.where(better, top_p, self.exact)
        self.seen = torch.where(better, top_p.to(operand).to(top_p.dtype), self.seen)
        self.col = torch.where(better, top_col, self.col)

    def normalize(self, moments, mass, weight, need_m2, operand, square_scale):
        """``moments`` (``[A1 | A2]``, ``A2`` holding the squares times ``square_scale``, None: 1) normalized in place
        into ``[mu | m2]`` with the dominant entry's exact products instead of the GEMMs': the other entries' part
        ``(A - seen W_top) / mass`` plus the dominant entry's share ``exact / mass`` of ``W_top`` (and ``W_top^2``),
        ``mass`` getting ``exact - seen``. On a saturated row the first part is exactly 0 and the share exactly 1, so
        mu is exactly ``W_top`` and var exactly 0."""
        dim = weight.shape[1]
        w_top = weight[self.col]
        w_operand = as_operand(w_top, operand)
        w_seen, w_exact = w_operand.to(moments.dtype), w_top.to(moments.dtype)
        mass.add_(self.exact - self.seen)
        share = (self.exact / mass)[:, None]
        moments[:, :dim].addcmul_(self.seen[:, None], w_seen, value=-1.0).div_(mass[:, None]).addcmul_(share, w_exact)
        if need_m2:
            square_seen = squares_operand(w_top, w_operand, operand, square_scale).to(moments.dtype)
            second = moments[:, dim:].addcmul_(self.seen[:, None], square_seen, value=-1.0)
            if square_scale is not None:
                second.div_(square_scale)
            second.div_(mass[:, None]).addcmul_(share, w_exact * w_exact)


def top_class_buffer(h, modulated):
    """Where the forward records each row's dominant class, when the backward's operands are narrow (else None)."""
    if not modulated or operand_types(h.dtype).backward == operand_types(h.dtype).acc:
        return None
    return torch.zeros(h.shape[0], dtype=torch.int64, device=h.device)
