"""The per-row algebra of every fused op, written once (docs/math.md 4, 3.6): what turns a head's per-row
statistics into the terms, and the upstream gradients into the per-row vectors of the logit gradient. O(N d): the
passes over the vocabulary (dropreg/streamed.py, dropreg/chunked.py, csrc/) never repeat it.

Names follow the glossary of dropreg/_op_family.py. ``hc`` is the input rows in the accumulation dtype.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from .signs import philox_signs


# ------------------------------------------------------------------------------------------- statistics

def logit_shift(running_max):
    """The shift of an online softmax: its running max, or 0 for a row whose logits so far are all -inf (shifting by
    -inf would give exp(-inf + inf) = NaN)."""
    return torch.where(running_max == float("-inf"), torch.zeros_like(running_max), running_max)


def reference_headroom(dtype: torch.dtype) -> float:
    """How far a chunk's largest logit may rise above a row's running reference before the chunked driver's
    reference moves (docs/math.md 7.3): probabilities are written as ``exp(z - reference)``, at most
    ``exp(headroom)``: e^8 (about 3e3) in fp16, whose largest value is 65504; e^48 (about 7e20) otherwise, so that
    their fp32 sums over a vocabulary of 2^31 entries, times |W|^2 up to 1e11, stay finite. A reference that stays
    put leaves what earlier chunks accumulated on its scale: no rescaling, no second pass over the chunk."""
    return 8.0 if dtype == torch.float16 else 48.0


def moved_reference(reference, chunk_first, chunk_max, headroom: float):
    """The running reference after a chunk whose first logit is ``chunk_first`` and largest ``chunk_max``: an unset
    (-inf) reference starts at the chunk's first logit, so that the chunk can be written as it is read; either moves
    to ``chunk_max`` only if that exceeds it by more than ``headroom``."""
    start = torch.where(reference == float("-inf"), chunk_first, reference)
    return torch.where(chunk_max > start + headroom, chunk_max, start)


class SliceStatistics(NamedTuple):
    """What a statistics pass hands back over its slice of the vocabulary, per row, normalized by that slice's own
    softmax: ``lse``, ``mu = E[W]`` (None unless asked) and the second moment as ``m2 = E[W*W]`` or as ``var``
    (whichever the pass forms; None unless asked), and ``extra``: the tensors (or Nones) the pass keeps for its own
    sweep, saved with the rest (the chunked driver's dominant class per row and W*W)."""
    lse: torch.Tensor
    mu: Optional[torch.Tensor] = None
    m2: Optional[torch.Tensor] = None
    var: Optional[torch.Tensor] = None
    extra: tuple = ()


# ------------------------------------------------------------------------------------------- signs and targets

def implicit_signs(input, signs, seed, need_implicit):
    """The implicit term's signs in the input's dtype (+-1 is exact in every float dtype; a bf16 or fp16 input's
    signs take half the memory and traffic of fp32 ones): the given ones or the Philox stream of ``seed``. They are
    indexed by (row, hidden index), never by class, so a vocabulary slice draws the same ones."""
    if not need_implicit:
        return None
    if signs is None:
        signs = philox_signs(seed, input.shape[0], input.shape[1], device=input.device, dtype=input.dtype)
    return signs.to(input.dtype)


def target_logit(hc, weight, bias, target, acc):
    """``z_y = h . W_y + b_y`` per row (``hc`` already in ``acc``), differentiable: O(N d)."""
    logit = (hc * weight[target].to(acc)).sum(1)
    return logit if bias is None else logit + bias[target].to(acc)


def owned_only(owned, values: list) -> list:
    """Each per-row value where this slice owns the row's class, 0 elsewhere (so that a SUM over slices merges
    them); unchanged when ``owned`` is None (one slice owns every class)."""
    if owned is None:
        return values
    return [torch.where(owned, v, torch.zeros_like(v)) for v in values]


# ------------------------------------------------------------------------------------- the uncapped head's terms

def terms(hc, signs, lse, mu, var, z_target, target_part, need_explicit, need_implicit):
    """Per-row ``(ce, quadratic, sign_term)`` from the head's statistics (docs/math.md 6.1).

    ``target_part`` is what the implicit term needs of the target: its weight rows ``W_y`` (N x d) when this
    process holds them all, else ``u . W_y`` per row merged over the slices (N)."""
    ce = lse - z_target
    quadratic, sign_term = torch.zeros_like(ce), torch.zeros_like(ce)  # distinct: a registered op's outputs
    if need_explicit:
        quadratic = (hc * hc * var).sum(1)
    if need_implicit:
        u = signs * hc
        sign_term = (u * (mu - target_part)).sum(1) if target_part.dim() == 2 else (u * mu).sum(1) - target_part
    return ce, quadratic, sign_term


def whole_head_terms(h, weight, bias, target, signs, lse, mu, var, need_explicit, need_implicit):
    """:func:`terms` of a head held whole, from the inputs as given: ``(ce, quadratic, sign_term)`` per row. The
    chunked driver's epilogues fuse exactly this (one pass over each row's d-vectors)."""
    acc = lse.dtype
    hc = h.to(acc)
    z_target = target_logit(hc, weight, bias, target, acc)
    return terms(hc, signs, lse, mu, var, z_target, weight[target].to(acc), need_explicit, need_implicit)


@dataclass
class RowModulation:
    """The per-row vectors of one row block's logit gradient (docs/math.md 4.4):
    ``G_v = s_v (row_const + T_stack . [W_v | W_v*W_v]) - g_ce [v = y]``. ``T_stack`` is ``[T | gR' q]`` with the
    explicit term, ``T`` alone with the implicit term only, None for cross entropy alone; ``g_r``, ``g_r_q``,
    ``g_i``, ``u`` are None for a term that is off."""
    row_const: torch.Tensor
    T_vec: torch.Tensor
    T_stack: Optional[torch.Tensor]
    g_r: Optional[torch.Tensor]
    g_r_q: Optional[torch.Tensor]
    g_i: Optional[torch.Tensor]
    u: Optional[torch.Tensor]


def row_modulation(h_block, g_ce, mu, var, signs, grad_quadratic, grad_sign_term, grad_mu, r0, r1, need_explicit,
                   need_implicit) -> RowModulation:
    """:class:`RowModulation` of rows ``[r0, r1)``: ``h_block`` and ``g_ce`` are those rows (accumulation dtype),
    the other tensors the full per-row globals and upstream gradients (``grad_mu`` None when mu has none)."""
    # Row-wise parts of G_v = s_v * (g_ce + gR'(r_v - Rt) + gI'(a_v - abar)) - g_ce [v = y]:
    # gR' r_v + gI' a_v = [T | gR' q] . [W_v | W_v*W_v] + const (docs/math.md, GEMM-friendly form).
    row_const = g_ce.clone()
    T_vec = torch.zeros_like(h_block)
    g_r = g_r_q = g_i = u = T_stack = None
    if need_explicit:
        g_r = grad_quadratic[r0:r1].to(h_block.dtype)[:, None]
        mu_b, var_b = mu[r0:r1], var[r0:r1]
        g_r_q = g_r * h_block * h_block
        T_vec -= 2 * g_r_q * mu_b
        row_const += (g_r_q * (mu_b * mu_b - var_b)).sum(1)
    if need_implicit:
        g_i = grad_sign_term[r0:r1].to(h_block.dtype)[:, None]
        mu_b = mu[r0:r1]
        u = signs[r0:r1] * h_block
        T_vec += g_i * u
        row_const -= (g_i * mu_b * u).sum(1)
    modulated = need_explicit or need_implicit
    if grad_mu is not None and modulated:  # mu's own gradient gbar: T += gbar, row_const -= mu . gbar
        g_mu = grad_mu[r0:r1].to(h_block.dtype)
        T_vec += g_mu
        row_const -= (g_mu * mu[r0:r1]).sum(1)
    if modulated:
        T_stack = torch.cat([T_vec, g_r_q], dim=1) if need_explicit else T_vec
    return RowModulation(row_const, T_vec, T_stack, g_r, g_r_q, g_i, u)


def softmax_mean_modulation(grad_mu_rows, mu_rows) -> RowModulation:
    """softmax_mean's backward as a modulation (docs/math.md 11.2): ``T = gbar``, ``row_const = -mu . gbar``."""
    return RowModulation(row_const=-(grad_mu_rows * mu_rows).sum(1), T_vec=grad_mu_rows, T_stack=grad_mu_rows,
                         g_r=None, g_r_q=None, g_i=None, u=None)


def input_row_gradient(hc, signs, mu, var, g_r, g_i, need_explicit, need_implicit):
    """The part of grad_input that needs only the per-row globals, ``2 g_R h var + g_I sigma mu`` (docs/math.md
    4.3): every slice of a sliced head adds it alike, so it is added once, after the slices' sum."""
    out = torch.zeros_like(hc)
    if need_explicit:
        out += 2 * g_r[:, None] * hc * var
    if need_implicit:
        out += g_i[:, None] * signs * mu
    return out


# ------------------------------------------------------------------------------------------ the capped head

def softcap_derivatives(raw_logits, softcap):
    """``(z, c, z2, z3)`` elementwise for ``z = softcap tanh(raw / softcap)``: the capped logits and their first,
    second and third derivatives in the raw logits."""
    t = torch.tanh(raw_logits / softcap)
    c = 1 - t * t
    return softcap * t, c, -2 * t * c / softcap, -2 * c * (c - 2 * t * t) / (softcap * softcap)


def capped_logits(raw, softcap):
    """``(softcap tanh(raw / softcap), its derivative in raw)``; ``(raw, None)`` without a cap (docs/math.md 3.6)."""
    if softcap is None:
        return raw, None
    t = torch.tanh(raw / softcap)
    return softcap * t, 1 - t * t


def capped_slope(capped, softcap):
    """``dz/dr = 1 - t^2`` of the capped logits ``z = softcap t`` (docs/math.md 3.6)."""
    t = capped / softcap
    return 1 - t * t


class TargetValues:
    """Per row, what the capped terms need of the target class: the capped target logit ``z`` and its derivatives
    ``c``, ``z2``, ``z3`` (from the raw target logit), and the target row's products ``q_ww = sum_j h_j^2 W_yj^2``
    (explicit term) and ``u_w = u . W_y`` with ``u = sigma * h`` (implicit term; None when unused). O(N d). On a
    sliced head the slice owning the target gives ``raw``, ``q_ww`` and ``u_w`` (docs/math.md 12.6)."""

    def __init__(self, raw, q_ww, u_w, softcap):
        self.raw, self.q_ww, self.u_w = raw, q_ww, u_w
        self.z, self.c, self.z2, self.z3 = softcap_derivatives(raw, softcap)


def target_products(hc, target_row, signs, need_explicit, need_implicit):
    """``(q_ww, u_w)`` of :class:`TargetValues` from the rows' target weight rows (None where the term is off)."""
    q_ww = (hc * hc * target_row * target_row).sum(1) if need_explicit else None
    u_w = (signs * hc * target_row).sum(1) if need_implicit else None
    return q_ww, u_w


def capped_terms(hc, signs, lse, m1, m2, y, need_explicit, need_implicit):
    """Per-row ``(ce, quadratic, sign_term)`` of a capped head from its statistics (docs/math.md 3.6)."""
    ce = lse - y.z
    quadratic = sign_term = torch.zeros_like(ce)
    if need_explicit:
        quadratic = (hc * hc * (m2 - m1 * m1)).sum(1) - y.z2 * y.q_ww
    if need_implicit:
        sign_term = (signs * hc * m1).sum(1) - y.c * y.u_w
    return ce, quadratic, sign_term


def capped_backward_rows(hc, signs, m1, m2, y, upstream, grad_m1, need_explicit, need_implicit):
    """What the capped sweep needs, per row: ``(row_const, amount, T, Q)``, and the terms' own dependence on h
    (not through the logits) that involves no weight row: the part of grad_input every slice of a sliced head adds
    alike. ``upstream``: the three terms' gradients; dF/dlse = g_ce, dF/dM1 = T, dF/dM2 = Q,
    row_const = g_ce - T.M1 - Q.M2."""
    g_ce, g_r, g_i = upstream
    row_const = g_ce.clone()
    amount = g_ce * y.c  # what G loses at the target
    T_vec = Q = None
    direct_h = torch.zeros_like(hc)
    if need_explicit or need_implicit:
        T_vec = torch.zeros_like(hc) if grad_m1 is None else grad_m1.to(hc.dtype).clone()
    if need_explicit:
        Q = g_r[:, None] * hc * hc
        T_vec -= 2 * Q * m1
        row_const -= (Q * m2).sum(1)
        amount += g_r * y.z3 * y.q_ww
        direct_h += 2 * g_r[:, None] * hc * (m2 - m1 * m1)
    if need_implicit:
        T_vec += g_i[:, None] * signs * hc
        amount += g_i * y.z2 * y.u_w
        direct_h += g_i[:, None] * signs * m1
    if T_vec is not None:
        row_const -= (T_vec * m1).sum(1)
    return row_const, amount, T_vec, Q, direct_h


def capped_target_row_gradients(hc, signs, target_row, y, upstream, need_explicit, need_implicit):
    """The capped terms' own dependence on the target's weight row: ``(to grad_input, to grad_W[y])`` per row."""
    _, g_r, g_i = upstream
    to_h, to_w = torch.zeros_like(hc), torch.zeros_like(hc)
    if need_explicit:
        scaled = 2 * (g_r * y.z2)[:, None] * hc * target_row
        to_h -= scaled * target_row
        to_w -= scaled * hc
    if need_implicit:
        scaled = (g_i * y.c)[:, None] * signs
        to_h -= scaled * target_row
        to_w -= scaled * hc
    return to_h, to_w


def smoothing_upstream(omega, grad_smoothing_sum, like):
    """dF/dS per row for the capped sweep (None without smoothing; zeros when S got no gradient)."""
    if omega is None:
        return None
    return torch.zeros_like(like) if grad_smoothing_sum is None else grad_smoothing_sum.to(like.dtype)
